"""Augmented views with a consistent teacher (cache-teacher --views K, train-student --views): stored view
parameters, exact replay for the student, view 0 = the plain cache, the live fidelity check, the guardrail."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tests.helpers import TINY_STUDENT, student_and_teacher_views, student_batch, tiny_train_config
from kdpipe import (cache_teacher, cache_verify, data, evaluate, logit_store, pixels, run_folder, teacher_inputs,
                    train_student, views)
from kdpipe.config import CacheConfig
from kdpipe.errors import KdpipeError

K = 3


def _cache(image_folder, teacher_dir, out, **kw):
    return cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), out=out,
                                         precision="fp32", workers=0, batch_size=16, views=K, **kw))


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory, image_folder, teacher_dir):
    out = tmp_path_factory.mktemp("views") / "c"
    _cache(image_folder, teacher_dir, out)
    return out


def test_view_parameters_are_stored_and_read_back(view_cache, image_folder):
    train = logit_store.read_split(view_cache / "train.parquet")
    assert train.meta["views"] == K + 1 and train.meta["augment"]["policy"] == views.ViewPolicy().to_dict()
    split = data.open_dataset(str(image_folder)).splits["train"]
    assert len(train.ids) == len(split) * (K + 1)
    for j in range(0, len(train.ids), 7):
        i = split.ids.index(train.ids[j])
        w, h = split.image(i).size
        boxes, flips = views.sample(views.ViewPolicy(), split.ids[i], w, h, K)
        np.testing.assert_array_equal(train.boxes[j], boxes[train.view[j]])
        assert train.flips[j] == flips[train.view[j]]
    zero = train.view == 0
    assert (train.boxes[zero] == [0, 0, 40, 40]).all() and not train.flips[zero].any()  # the whole image
    assert ((train.boxes[:, :2] >= 0) & (train.boxes[:, 2:] <= 40) & (train.boxes[:, 2:] > train.boxes[:, :2])).all()
    assert train.flips.any() and len({tuple(b) for b in train.boxes}) > len(split)  # really random views
    for name in ("validation", "test"):  # evaluation splits stay un-augmented
        assert logit_store.read_split(view_cache / f"{name}.parquet").meta["views"] == 1


def test_view_zero_equals_the_plain_cache(view_cache, cache_dir):
    for name in ("train", "validation", "test"):
        plain = logit_store.read_split(cache_dir / f"{name}.parquet")
        with_views = logit_store.read_split(view_cache / f"{name}.parquet").view0()
        assert with_views.ids == plain.ids
        # same code path, fp32; bit-equal at 2 threads, but the batches mix in augmented views, and at other
        # thread counts the convolution kernels sum in a batch-dependent order (seen: 3e-8 at 1 thread)
        np.testing.assert_allclose(with_views.logits, plain.logits, rtol=1e-5, atol=1e-6)


def test_the_student_sees_exactly_the_teachers_view(view_cache, image_folder, teacher_dir, tmp_path):
    s, stored, split, teacher_inputs = student_and_teacher_views(view_cache, image_folder, teacher_dir,
                                                                 tmp_path / "run", K, views.ViewPolicy())
    train = s.splits["train"]
    assert train.pixels is None and train.source is not None  # rendered when used, from decode-once originals
    for i in (0, 5, len(split) - 1):
        seen_by_teacher = teacher_inputs[i]["pixel_values"]  # (V, 3, H, W), what stage one fed the teacher
        for v in range(K + 1):
            batch = student_batch(train, i, v)
            u8 = batch["pixels"][0]  # (H, W, 3) the student's input for that view, as a training step gets it
            j = next(r for r in range(len(stored.ids)) if stored.ids[r] == split.ids[i] and stored.view[r] == v)
            np.testing.assert_array_equal(u8.numpy(), views.render(split.image(i), stored.boxes[j],
                                                                   bool(stored.flips[j]), (32, 32), 2))
            student_input = pixels.normalise(u8[None], s.inputs["mean_t"], s.inputs["std_t"])[0]
            # views 1..K: the same function on the same uint8 pixels, bit-equal; view 0 came from the
            # teacher's processor (PIL resize, then its float rescale/normalise): equal to 1e-6
            atol = 0 if v else 1e-6
            torch.testing.assert_close(student_input, seen_by_teacher[v], atol=atol, rtol=0)
            np.testing.assert_array_equal(batch["teacher_logits"][0].numpy(), stored.logits[j])


def test_a_student_at_its_own_resolution_sees_the_teachers_box_and_flip(view_cache, image_folder, tmp_path):
    """The teacher saw each view at 32 px; a 24 px student gets the same box and flip resampled to 24 px, and
    with --eval-size 32 is validated, tested and saved at 32 px (train low, test higher)."""
    cfg = tiny_train_config(cache=view_cache, views=True, out=tmp_path / "r", epochs=1, eval_size=32,
                            student_config={"image_size": 24, "depth_multiplier": 0.35})
    s = train_student.setup(cfg)
    stored = logit_store.read_split(view_cache / "train.parquet")
    split = data.open_dataset(str(image_folder)).splits["train"]
    train = s.splits["train"]
    for i in (1, 7):
        for v in range(K + 1):
            j = next(r for r in range(len(stored.ids)) if stored.ids[r] == split.ids[i] and stored.view[r] == v)
            np.testing.assert_array_equal(student_batch(train, i, v)["pixels"][0].numpy(), views.render(
                split.image(i), stored.boxes[j], bool(stored.flips[j]), (24, 24), 2))
    assert s.splits["validation"].pixels.shape[1:] == (32, 32, 3) and s.splits["test"].pixels.shape[1:] == (32, 32, 3)
    s.cfg.resume = True  # the setup above claimed the folder; run it from there
    report = train_student.run(s.cfg)
    inputs = run_folder.load_report(tmp_path / "r").run["student"]["inputs"]  # as run.json holds them
    assert inputs["size"] == [32, 32] and inputs["train_size"] == [24, 24] and report.run["config"]["eval_size"] == 32
    saved = json.loads((tmp_path / "r" / "model" / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 32, "width": 32}  # what the saved student is evaluated at
    again = evaluate.saved(tmp_path / "r", split="test", device="cpu")  # reloaded: inputs at 32 px
    assert again["accuracy"] == pytest.approx(report.test["accuracy"])
    with pytest.raises(KdpipeError, match="--eval-size"):
        tiny_train_config(cache=view_cache, eval_size=0)


def test_each_image_walks_through_all_its_views_before_repeating():
    seen = np.stack([views.epoch_views(50, 4, e, seed=1) for e in range(8)])  # (epochs, images)
    for start in (0, 4):
        assert (np.sort(seen[start:start + 4], axis=0) == np.arange(4)[:, None]).all()
    assert not (seen[0] == seen[1]).all()  # images do not move in lockstep
    np.testing.assert_array_equal(views.epoch_views(50, 4, 5, seed=1), seen[5])  # a pure function: resumable


def test_a_student_trains_on_views(view_cache, tmp_path, run_cli):
    code, out = run_cli("train-student", "--cache", view_cache, "--views", "--epochs", "2", "--student-config",
                        TINY_STUDENT, "--lr", "3e-3", "--precision", "fp32", "--device", "cpu", "--out", tmp_path / "r")
    assert code == 0, out
    run = run_folder.load_report(tmp_path / "r").run
    assert run["consistency"]["views"] and run["consistency"]["consistent"]
    assert run["consistency"]["stored_views"]["views"] == K


def test_inspect_cache_verify_replays_the_teacher_exactly(view_cache, run_cli):
    code, out = run_cli("inspect-cache", view_cache, "--verify", "24", "--device", "cpu")
    assert code == 0, out
    diff = float(re.search(r"max \|Δlogit\| (\S+),", out).group(1))
    assert diff < 1e-4 and "agreement 100.00%" in out and "augmented views" in out


def test_the_fidelity_check_catches_views_rendered_other_than_stored(image_folder, teacher_dir, tmp_path,
                                                                     monkeypatch):
    real = views.render
    monkeypatch.setattr(views, "render", lambda image, box, flip, size, resample: real(image, box, False, size,
                                                                                       resample))  # drops flips
    _cache(image_folder, teacher_dir, tmp_path / "c", view_splits=["train", "validation", "test"])
    monkeypatch.undo()
    r = cache_verify.replay(tmp_path / "c", 60, device="cpu")
    assert r["augmented_views"] > 0 and r["max_abs_diff"] > 1e-3


def test_the_teacher_forward_takes_at_most_batch_size_views(image_folder, teacher_dir, tmp_path, monkeypatch):
    """An image's K + 1 views arrive together; the forward still sees --batch-size inputs at most (one forward
    over all 300 views of an image ran 2.55x slower per input than forwards of 16 on a CPU)."""
    seen, forward = [], teacher_inputs.teacher_logits

    def spy(teacher, pixel_values, batch_size):
        def count(_module, _args, kwargs):
            seen.append(len(kwargs["pixel_values"]))

        with teacher.model.register_forward_pre_hook(count, with_kwargs=True):
            return forward(teacher, pixel_values, batch_size)

    monkeypatch.setattr(teacher_inputs, "teacher_logits", spy)
    cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), out=tmp_path / "c",
                                  precision="fp32", workers=0, batch_size=K, views=K, splits=["train"]))
    assert max(seen) == K and sum(seen) == len(data.open_dataset(str(image_folder)).splits["train"]) * (K + 1)


def test_training_on_views_needs_a_cache_with_views(cache_dir, tmp_path, run_cli):
    common = ["--epochs", "1", "--student-config", TINY_STUDENT, "--precision", "fp32", "--device", "cpu"]
    code, out = run_cli("train-student", "--cache", cache_dir, "--views", *common, "--out", tmp_path / "b")
    assert code == 1 and "cache-teacher --views K" in out and "Traceback" not in out


def test_views_need_a_processor_that_can_be_replayed():
    with pytest.raises(KdpipeError, match="centre-crops"):
        views.processor_inputs({"size": {"height": 8, "width": 8}, "do_center_crop": True}, "--teacher t")
    with pytest.raises(KdpipeError, match="fixed height"):
        views.processor_inputs({"size": {"shortest_edge": 8}}, "--teacher t")
    with pytest.raises(KdpipeError, match="--view-scale"):
        views.ViewPolicy(scale=(0.5, 2.0))


# ------------------------------------------------------------------ stage one over N x K views: resumable


def _chunks(out):
    return sorted((out / ".journal" / "train.r0of1").glob("*.parquet"))


@pytest.mark.slow  # a whole cache-teacher command in a subprocess, killed for real
def test_a_teacher_pass_killed_mid_split_resumes_losing_only_the_batch_in_flight(teacher_dir, tmp_path):
    import time

    from tests.helpers import make_image_folder, spawn_kdpipe

    folder = make_image_folder(tmp_path / "ds", {"train": 4})  # 12 images x (20 + 1) views
    teacher = teacher_dir
    cfg = dict(teacher=str(teacher), dataset=str(folder), splits=["train"], views=20, precision="fp32",
               device="cpu", workers=0, batch_size=16)  # a batch: one image's 21 views
    out = tmp_path / "killed"
    p = spawn_kdpipe("cache-teacher", "--teacher", teacher, "--dataset", folder, "--splits", "train", "--views", "20",
                     "--precision", "fp32", "--device", "cpu", "--workers", "0", "--batch-size", "16", "--out", out,
                     cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not _chunks(out) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.kill()  # SIGKILL: no handler runs
    p.wait()
    assert not (out / "train.parquet").exists(), "the pass ended before it could be killed"
    committed = int(_chunks(out)[-1].stem.split("-")[1])  # images whose teacher outputs are on disk
    assert 1 <= committed < 12
    [report] = cache_teacher.run(CacheConfig(out=out, **cfg))  # the rerun
    assert report.resumed_images == committed  # everything committed was kept: only the batch in flight was lost
    assert report.seconds > 0 and report.images_per_s > 0 and not (out / ".journal").exists()
    resumed = logit_store.read_split(out / "train.parquet")
    assert resumed.meta["resumed_images"] == committed
    cache_teacher.run(CacheConfig(out=tmp_path / "whole", **cfg))  # the same pass, never interrupted
    whole = logit_store.read_split(tmp_path / "whole" / "train.parquet")
    assert resumed.ids == whole.ids and len(whole.ids) == 12 * 21
    for f in ("view", "labels", "boxes", "flips"):
        np.testing.assert_array_equal(getattr(resumed, f), getattr(whole, f))
    np.testing.assert_allclose(resumed.logits, whole.logits, rtol=1e-5, atol=1e-6)  # same batches, fp32


def test_a_damaged_chunk_is_recomputed_with_everything_after_it(image_folder, teacher_dir, tmp_path):
    class Stop(Exception):
        pass

    def stop_after(n):
        def progress(split, done, total):
            if done >= n:
                raise Stop
        return progress

    cfg = CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), splits=["train"], views=K, precision="fp32",
                      workers=0, batch_size=8, out=tmp_path / "c")  # two images (of 36) per batch
    with pytest.raises(Stop):
        cache_teacher.run(cfg, progress=stop_after(6))  # a Python exception: the final file is never written
    chunks = _chunks(tmp_path / "c")
    assert [c.stem for c in chunks] == ["0000000000-0000000002", "0000000002-0000000004"]
    chunks[1].write_bytes(chunks[1].read_bytes()[:100])  # damaged (e.g. a power cut before the OS wrote it)
    [report] = cache_teacher.run(cfg)
    assert report.resumed_images == 2 and logit_store.read_split(report.path).meta["rows"] == 36 * (K + 1)
    with pytest.raises(Stop):  # another key (another view seed) never reuses a journal
        cache_teacher.run(CacheConfig(**{**cfg.to_dict(), "out": tmp_path / "d", "augment": cfg.augment}),
                          progress=stop_after(4))
    [other] = cache_teacher.run(CacheConfig(**{**cfg.to_dict(), "out": tmp_path / "d",
                                               "augment": views.ViewPolicy(seed=1)}))
    assert other.resumed_images == 0


def test_one_type_owns_the_row_layout_of_views():
    layout = views.ViewRows(images=4, per_image=3)  # K = 2 augmented views + the image itself
    rows = np.arange(len(layout))
    assert len(layout) == 12 and layout.row(2, 1) == 7 and layout.row(torch.tensor([0, 3]), 2).tolist() == [2, 11]
    assert layout.image(rows).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert layout.view(rows).tolist() == [0, 1, 2] * 4
    assert (layout.row(layout.image(rows), layout.view(rows)) == rows).all()
    assert layout.grid(np.arange(24).reshape(12, 2)).shape == (4, 3, 2)
    assert views.ViewRows(5).row(np.arange(5)).tolist() == list(range(5))  # no views: row = image
