"""Faults injected for real: kill -9, two writers, a full disk, flipped bytes, hostile files.
What is checked each time: a clear one-line error (no traceback), nothing valid lost, never wrong logits.
docs/reliability.md lists every case and its outcome."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import (CLASSES, TINY_STUDENT, make_image_folder, make_teacher, one_line_error, parquet_dataset,
                           read_cache_table, spawn_kdpipe, tiny_train_config)
from kdpipe import cache_teacher, locking, logit_store, run_folder, train_student
from kdpipe.config import CacheConfig
from kdpipe.errors import KdpipeError

TINY = ["--student-config", TINY_STUDENT, "--lr", "3e-3", "--batch-size", "8", "--precision", "fp32", "--device", "cpu"]


def _cache(folder, teacher, out, **kw):
    return cache_teacher.run(CacheConfig(teacher=str(teacher), dataset=str(folder), out=out, precision="fp32",
                                         workers=0, batch_size=4, **kw))


def _contents(cache: Path) -> dict:
    return {name: (s.ids, s.logits) for name, s in
            ((n, logit_store.read_split(p)) for n, p in logit_store.cache_splits(cache).items())}


def _assert_same_cache(a: Path, b: Path) -> None:
    ca, cb = _contents(a), _contents(b)
    assert ca.keys() == cb.keys()
    for name in ca:
        assert ca[name][0] == cb[name][0]
        # fp32 on CPU, but the batch size and thread count may differ from the reference (summation order)
        np.testing.assert_allclose(ca[name][1], cb[name][1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- kill -9


@pytest.fixture(scope="module")
def bigger_folder(tmp_path_factory):
    """Enough images that a kill lands mid-way (tens of batches per split)."""
    return make_image_folder(tmp_path_factory.mktemp("big") / "beans", {"train": 60, "validation": 20, "test": 20})


@pytest.mark.slow
@pytest.mark.parametrize("files_before_kill", [0, 1, 2])
def test_cache_teacher_killed_mid_way_resumes_to_the_same_cache(bigger_folder, teacher_dir, tmp_path,
                                                                files_before_kill):
    reference = tmp_path / "reference"
    _cache(bigger_folder, teacher_dir, reference)
    out = tmp_path / "killed"
    args = ["cache-teacher", "--teacher", teacher_dir, "--dataset", bigger_folder, "--out", out, "--precision", "fp32",
            "--workers", "0", "--batch-size", "4"]
    proc = spawn_kdpipe(*args, cwd=tmp_path)
    seen, deadline = set(), time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        for path in out.glob("*.parquet"):  # a file under its final name is always complete and valid
            logit_store.read_split(path)
            seen.add(path.name)
        started = (out / locking.LOCK_NAME).exists()
        if started and len(seen) >= files_before_kill:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and len(seen) < 3, "the writer finished before it was killed"
    _cache(bigger_folder, teacher_dir, out)  # the rerun completes, reusing the splits already valid
    _assert_same_cache(reference, out)
    assert not list(out.glob(".*.tmp-*"))  # what the killed writer left was cleaned up


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_train_student_killed_mid_way_resumes_to_the_same_result(cache_dir, tmp_path, delay):
    """Killed as its first checkpoint lands, or a moment later (in a later epoch or checkpoint write)."""
    reference = train_student.run(tiny_train_config(cache=cache_dir, epochs=6, out=tmp_path / "reference"))
    out = tmp_path / "killed"
    args = ["train-student", "--cache", cache_dir, "--epochs", "6", "--batch-size", "8", "--out", out, *TINY]
    proc = spawn_kdpipe(*args, cwd=tmp_path)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint.pt").exists() and not (out / "run.json").exists(), "killed too late"
    resumed = train_student.run(tiny_train_config(cache=cache_dir, epochs=6, out=out, resume=True))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert [r["train"]["loss"] for r in resumed.history] == pytest.approx([r["train"]["loss"] for r in reference.history],
                                                                        rel=1e-5)
    assert resumed.test == reference.test
    assert not list(out.glob(".*.tmp-*"))


# ------------------------------------------------------------------------------------- two writers


def test_a_second_writer_of_a_cache_is_refused_and_the_cache_stays_valid(run_cli, image_folder, teacher_dir, tmp_path):
    out = tmp_path / "cache"
    _cache(image_folder, teacher_dir, out)
    before = _contents(out)
    with locking.exclusive(out):  # another process is writing this folder
        code, text = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--out", out,
                             "--force")
    one_line_error(code, text, "being written by another kdpipe process")
    after = _contents(out)
    assert after.keys() == before.keys() and all(np.array_equal(after[k][1], before[k][1]) for k in before)


def test_a_second_writer_of_a_run_folder_is_refused(run_cli, cache_dir, tmp_path):
    out = tmp_path / "run"
    with locking.exclusive(out):
        code, text = run_cli("train-student", "--cache", cache_dir, "--epochs", "1", "--out", out, *TINY)
    one_line_error(code, text, "being written by another kdpipe process")
    code, text = run_cli("train-student", "--cache", cache_dir, "--epochs", "1", "--out", out, *TINY)
    assert code == 0 and "  nll " in text and "NLL" in text, text  # the epoch's line and the final table


@pytest.mark.slow
def test_two_cache_processes_at_once_leave_one_valid_cache(image_folder, teacher_dir, tmp_path):
    out = tmp_path / "cache"
    args = ["cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--out", out, "--precision", "fp32",
            "--workers", "0"]
    procs = [spawn_kdpipe(*args, cwd=tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outputs):  # each either wrote/reused the cache or was refused cleanly
        assert p.returncode == 0 or (p.returncode == 1 and "being written by another" in text), text
    reference = tmp_path / "reference"
    _cache(image_folder, teacher_dir, reference)
    _assert_same_cache(reference, out)


# ------------------------------------------------------------------------------------------ disk full


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_a_cache_keeps_the_previous_one(run_cli, image_folder, teacher_dir, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "cache"
    _cache(image_folder, teacher_dir, out)
    before = _contents(out)
    monkeypatch.setattr(logit_store.pq.ParquetWriter, "write_table", _enospc)
    code, text = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--out", out, "--force",
                         "--precision", "fp32", "--workers", "0")
    one_line_error(code, text, "No space left on device")
    assert "train.parquet" in text or "/.journal/train." in text, text  # the split's file, or its resume journal
    monkeypatch.undo()
    after = _contents(out)
    assert all(np.array_equal(after[k][1], before[k][1]) for k in before)
    assert not list(out.glob(".*.tmp-*"))


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync_fails_on_the_second_checkpoint(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            _enospc()
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_on_the_second_checkpoint)
    with pytest.raises(KdpipeError, match="No space left on device.*--resume"):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=out))
    monkeypatch.undo()
    assert not list(out.glob(".checkpoint.pt.tmp-*"))
    state = run_folder.read_checkpoint(out / "checkpoint.pt")  # the epoch-1 checkpoint, intact
    assert len(json.loads(state["history"])) == 1
    report = train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=out, resume=True))
    assert [r["epoch"] for r in report.history] == [1, 2, 3]


def test_a_real_full_filesystem(run_cli, image_folder, teacher_dir, tmp_path):
    """A 64 KiB tmpfs (needs mount rights; skipped without them): the write that overflows it fails cleanly;
    any split file already finished is whole, no temporary is left."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "filler").write_bytes(b"\0" * 60_000)
        code, text = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--out", mnt / "c",
                             "--precision", "fp32", "--workers", "0")
        one_line_error(code, text, "No space left on device")
        finished = sorted((mnt / "c").glob("*.parquet"))
        assert len(finished) < 3 and not list((mnt / "c").glob(".*.tmp-*"))
        for path in finished:
            logit_store.read_split(path)  # complete and verified
    finally:
        subprocess.run(["umount", "-l", str(mnt)])  # lazy: a failed writer's handle may still be open


# ----------------------------------------------------------------------------------------- corruption


def test_flipped_bytes_in_a_cache_file_are_detected_or_harmless(cache_dir, tmp_path):
    """Flip one byte at 300 random offsets: every read either refuses with the file's name, or returns
    exactly the original ids and logits. Never silently different logits."""
    path = logit_store.split_path(cache_dir, "train")
    original = logit_store.read_split(path)
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    refused = 0
    for offset in rng.sample(range(len(data)), 300):
        bad = bytearray(data)
        bad[offset] ^= 0xFF
        target = tmp_path / "train.parquet"
        target.write_bytes(bytes(bad))
        try:
            got = logit_store.read_split(target)
        except KdpipeError as e:
            assert str(target) in str(e)
            refused += 1
            continue
        assert got.ids == original.ids and np.array_equal(got.logits, original.logits)
        assert np.array_equal(got.labels, original.labels)
    assert refused > 200  # most bytes matter


def test_a_corrupted_cache_is_never_trained_on(run_cli, cache_dir, tmp_path):
    bad = tmp_path / "cache"
    shutil.copytree(cache_dir, bad)
    path = bad / "train.parquet"
    table = read_cache_table(path)
    logits = table.column("logits").combine_chunks().values.to_numpy().copy()
    logits[0] += 1.0  # a plausible, wrong logit with a valid Parquet structure
    import pyarrow as pa

    fixed = table.set_column(3, "logits", pa.FixedSizeListArray.from_arrays(pa.array(logits), len(CLASSES)))
    logit_store.pq.write_table(fixed.replace_schema_metadata(table.schema.metadata), path)
    code, text = run_cli("train-student", "--cache", bad, "--epochs", "1", "--out", tmp_path / "run", *TINY)
    one_line_error(code, text, "train.parquet", "checksum")


def test_a_corrupted_checkpoint_is_refused_by_resume(cache_dir, tmp_path):
    out = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    with pytest.raises(Stop):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=2, out=out), on_epoch=stop)
    data = bytearray((out / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(KdpipeError, match="checkpoint.pt does not match its checksum"):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=2, out=out, resume=True))


def test_a_corrupted_saved_student_is_refused_by_evaluate(run_cli, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train-student", "--cache", cache_dir, "--epochs", "1", "--out", out, *TINY)[0] == 0
    code, text = run_cli("evaluate", out)
    assert code == 0 and "NLL" in text, text  # intact, it evaluates
    weights = out / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # inside a tensor: safetensors itself would not notice
    weights.write_bytes(bytes(data))
    code, text = run_cli("evaluate", out)
    one_line_error(code, text, "model.safetensors", "checksum")


def test_a_cache_from_a_future_format_is_refused(run_cli, cache_dir, tmp_path):
    bad = tmp_path / "cache"
    shutil.copytree(cache_dir, bad)
    path = bad / "train.parquet"
    table = read_cache_table(path)
    meta = json.loads(table.schema.metadata[logit_store.META_KEY])
    meta["format_version"] = logit_store.FORMAT_VERSION + 1
    logit_store.pq.write_table(table.replace_schema_metadata({logit_store.META_KEY: json.dumps(meta)}), path)
    code, text = run_cli("inspect-cache", bad)
    one_line_error(code, text, "newer kdpipe")


# ----------------------------------------------------------------------------------- hostile inputs


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header; no need to build its pixels)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name, payload, message", [
    ("empty.jpg", b"", "is empty (0 bytes)"),
    ("notes.jpg", b"this is a text file, not an image\n", "cannot decode image"),
    ("bomb.png", _png_header_only(40_000, 40_000), "too large to decode safely"),
])
def test_broken_and_hostile_images_are_reported_by_name(run_cli, teacher_dir, tmp_path, name, payload, message):
    folder = make_image_folder(tmp_path / "data", {"train": 2, "validation": 1, "test": 1})
    (folder / "train" / "healthy" / name).write_bytes(payload)
    code, text = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", folder, "--out", tmp_path / "c",
                         "--workers", "0")
    one_line_error(code, text, message, name)
    for path in (tmp_path / "c").glob("*.parquet"):  # splits cached before the bad one stay valid
        logit_store.read_split(path)


def test_unicode_spaces_and_odd_characters_in_class_names_and_paths_work(run_cli, tmp_path):
    names = ["feuille tachée", "rouille/brune", "在 健康"]  # a slash cannot be a folder name: Parquet carries it
    root = tmp_path / "données du projet"
    folder = make_image_folder(root / "images à voir", {"train": 6, "validation": 2, "test": 2})
    for split in ("train", "validation", "test"):
        for old, new in zip(CLASSES, ["feuille tachée", "rouille brune", "在 健康"]):
            (folder / split / old).rename(folder / split / new)
    teacher = make_teacher(root / "professeur ü", label_names=["feuille tachée", "rouille brune", "在 健康"])
    code, text = run_cli("cache-teacher", "--teacher", teacher, "--dataset", folder, "--out", root / "cache ✓",
                         "--workers", "0")
    assert code == 0, text
    code, text = run_cli("train-student", "--cache", root / "cache ✓", "--epochs", "1", "--out", root / "run ✓", *TINY)
    assert code == 0, text
    run = json.loads((root / "run ✓" / "run.json").read_text())
    assert run["label_names"] == ["feuille tachée", "rouille brune", "在 健康"]
    assert names[1] not in run["label_names"]


def test_a_split_with_zero_rows_is_refused(run_cli, teacher_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 60, 60)).save(buf, format="PNG")
    folder = tmp_path / "pq"
    folder.mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": buf.getvalue(), "path": "a.png"}], image_type),
                             "label": pa.array([0], pa.int64())}), folder / "train.parquet")
    pq.write_table(pa.table({"image": pa.array([], image_type), "label": pa.array([], pa.int64())}),
                   folder / "test.parquet")
    code, text = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", folder, "--out", tmp_path / "c")
    assert code == 1 and "Traceback" not in text, text
    assert "no rows" in text and "test" in text, text


def test_a_teacher_with_only_a_pickle_checkpoint_is_never_executed(run_cli, image_folder, tmp_path):
    teacher = make_teacher(tmp_path / "teacher")
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    (teacher / "model.safetensors").unlink()
    torch.save({"vit.embeddings.cls_token": Payload()}, teacher / "pytorch_model.bin")
    code, text = run_cli("cache-teacher", "--teacher", teacher, "--dataset", image_folder, "--out", tmp_path / "c")
    one_line_error(code, text, "pickle checkpoint holds more than tensors")
    assert not marker.exists()


def test_a_plain_pickle_teacher_with_only_tensors_loads_with_weights_only(run_cli, image_folder, tmp_path):
    from transformers import ViTForImageClassification

    teacher = make_teacher(tmp_path / "teacher")
    state = ViTForImageClassification.from_pretrained(teacher).state_dict()
    (teacher / "model.safetensors").unlink()
    torch.save(state, teacher / "pytorch_model.bin")
    code, text = run_cli("cache-teacher", "--teacher", teacher, "--dataset", image_folder, "--out", tmp_path / "c",
                         "--workers", "0")
    assert code == 0, text


def test_remote_code_is_never_trusted_implicitly(run_cli, image_folder, tmp_path):
    teacher = make_teacher(tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    config.update(model_type="kdpipe-evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                                      "AutoModelForImageClassification": "evil.EvilModel"})
    (teacher / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "PWNED"
    (teacher / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    code, text = run_cli("cache-teacher", "--teacher", teacher, "--dataset", image_folder, "--out", tmp_path / "c")
    assert code == 1 and "Traceback" not in text, text
    assert "trust-remote-code" in text, text
    assert not marker.exists()


def test_a_huge_label_set_with_slashes_and_unicode_in_names(run_cli, tmp_path):
    names = [f"class/{i} ✓ é" for i in range(300)]
    data = parquet_dataset(tmp_path / "pq", names)
    teacher = make_teacher(tmp_path / "teacher", label_names=names[::-1])  # same names, another order
    code, text = run_cli("cache-teacher", "--teacher", teacher, "--dataset", data, "--out", tmp_path / "c", "--workers", "0")
    assert code == 0, text
    split = logit_store.read_split(tmp_path / "c" / "train.parquet")
    assert split.meta["label_names"] == names and split.logits.shape == (300, 300)
    other = make_teacher(tmp_path / "other", label_names=names[:-1] + ["class/300 ✓ é"])
    code, text = run_cli("cache-teacher", "--teacher", other, "--dataset", data, "--out", tmp_path / "c2")
    one_line_error(code, text, "only the teacher has ['class/300 ✓ é']", "only the dataset has ['class/299 ✓ é']")
    assert len(text) < 600  # the 300 names are not dumped into the message


def test_names_that_differ_only_in_separators_are_matched_exactly():
    from kdpipe.teacher import label_mapping

    assert label_mapping(["leaf spot", "leaf_spot", "rust"], ["leaf_spot", "rust", "leaf spot"]).tolist() == [1, 2, 0]
    assert label_mapping(["Leaf Spot", "rust"], ["rust", "leaf_spot"]).tolist() == [1, 0]
