"""Bad input and faults, round three (issue 58): a sweep folder bound to one storage, sweep.json of the wrong
shape, a report on a folder it cannot write, dataset files that vanish or escape their folder, huge grids,
a verify that decides, and the smaller cases. Each case is met through the CLI where a user meets it;
docs/reliability.md lists them with their outcomes."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import TINY_STUDENT, make_image_folder, read_cache_table, tiny_train_config, one_line_error
from kdpipe import files
from kdpipe.errors import KdpipeError

TINY = ["--student-config", TINY_STUDENT, "--lr", "3e-3", "--precision", "fp32", "--device", "cpu"]


def _sweep(run_cli, cache, out, *extra):
    return run_cli("sweep", "--cache", cache, "--epochs", "1", "--seeds", "0", "--out", out, *TINY, *extra)


# ------------------------------------------------------------------------- 1: one sweep folder, one storage


def test_a_sweep_folder_records_only_a_storage_that_opened_and_refuses_another(run_cli, cache_dir, tmp_path):
    sw = tmp_path / "sw"
    code, text = _sweep(run_cli, cache_dir, sw, "--storage", "nonsense")
    one_line_error(code, text, "--storage nonsense: not a database URL")
    assert not (sw / "sweep.json").exists()  # before: "nonsense" recorded, and every later run bound to it
    code, text = _sweep(run_cli, cache_dir, sw)  # the journal file in the folder
    assert code == 0, text
    other = tmp_path / "other.db"
    code, text = _sweep(run_cli, cache_dir, sw, "--storage", f"sqlite:///{other}")
    one_line_error(code, text, f"--storage sqlite:///{other}", "the journal file", "study.journal")
    assert not other.exists()  # before: a second copy of the study created there, while reports read the first
    code, text = run_cli("sweep-report", sw)
    assert code == 0 and "1 complete" in text, text


# --------------------------------------------------------------------------- 2: sweep.json of the wrong shape


def _sweep_folder(tmp_path, cache_dir) -> Path:
    """A sweep folder with its sweep.json and an empty study (no trial run)."""
    from kdpipe import sweep
    from kdpipe.config import SweepConfig

    cfg = SweepConfig(train=tiny_train_config(cache=cache_dir, epochs=1), space={"alpha": "0,0.5"}, seeds=[0],
                      out=tmp_path / "sw")
    sweep.claim_folder(cfg.out_dir(), cfg.study_name(), cfg.storage, cfg.spec())
    sweep.open_study(cfg, cfg.out_dir())
    return cfg.out_dir()


@pytest.mark.parametrize("damage", ["spec is text", "lr is text", "seeds hold text", "train is a list"])
def test_a_sweep_json_of_the_wrong_shape_is_damaged_for_the_report_and_the_rerun(run_cli, cache_dir, tmp_path, damage):
    sw = _sweep_folder(tmp_path, cache_dir)
    record = json.loads((sw / "sweep.json").read_text())
    if damage == "spec is text":
        record["spec"] = "grid"
    elif damage == "lr is text":
        record["spec"]["train"]["lr"] = "fast"
    elif damage == "seeds hold text":
        record["spec"]["seeds"] = ["0"]
    else:
        record["spec"]["train"] = ["epochs"]
    (sw / "sweep.json").write_text(json.dumps(record))
    for argv in (["sweep-report", sw], ["sweep", "--cache", cache_dir, "--epochs", "1", "--seeds", "0", "--alpha",
                                        "0,0.5", "--out", sw, *TINY]):
        code, text = run_cli(*argv)
        one_line_error(code, text, "sweep.json is damaged")


def test_a_sweep_json_without_a_train_setting_reads_it_at_its_default(run_cli, cache_dir, tmp_path):
    """As a sweep started by an earlier kdpipe lacks the settings added since (config.comparable)."""
    sw = _sweep_folder(tmp_path, cache_dir)
    record = json.loads((sw / "sweep.json").read_text())
    del record["spec"]["train"]["epochs"]
    (sw / "sweep.json").write_text(json.dumps(record))
    code, text = run_cli("sweep-report", sw)  # before: KeyError traceback
    assert code == 0 and "no trials yet" in text, text


# ------------------------------------------------------------------------ 3: a report it cannot write down


def test_sweep_report_on_a_folder_it_cannot_write_prints_the_table_and_names_the_files(run_cli, cache_dir, tmp_path,
                                                                                       monkeypatch):
    """A read-only mount, simulated: the tests run as root, which permission bits do not stop."""
    sw = tmp_path / "sw"
    code, text = _sweep(run_cli, cache_dir, sw)
    assert code == 0, text
    for name in ("results.csv", "results.json"):
        (sw / name).unlink()
    real = files.replacing

    def read_only(path, *args, **kwargs):
        if Path(path).parent == sw:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files, "replacing", read_only)
    code, text = run_cli("sweep-report", sw)
    assert code == 0 and "Traceback" not in text, text  # before: an OSError traceback
    assert "1 complete" in text and "chosen on validation" in text, text  # the table and the choice
    assert "not written" in text and "results.csv" in text and "results.json" in text, text
    assert "Read-only file system" in text and "wrote" not in text, text
    assert not (sw / "results.csv").exists()


# ------------------------------------------------------------------------------------------ 6: a huge grid


def _eager_grid(cfg) -> list:
    """The grid as kdpipe built it before (every config of the product, the first of each name kept), to check
    the lazy enumeration against: same points, same order."""
    import itertools

    from kdpipe.config import applicable
    from kdpipe.sweep import Point, config_key

    names = sorted(cfg.dims)
    configs = {}
    for values in itertools.product(*(cfg.dims[n].choices for n in names)):
        c = applicable(dict(zip(names, values)), cfg.train)
        configs.setdefault(config_key(c), c)
    return [Point(c, seed) for c in configs.values() for seed in cfg.seeds]


@pytest.mark.parametrize("space, alpha", [
    ({"temperature": "1,2,5", "alpha": "0,0.5,1"}, 0.5),
    ({"temperature": "2,5", "lr": "1e-3,1e-2"}, 0.0),
    ({"alpha": "0,0.5", "loss": "kd,dkd,dist", "dkd_beta": "1,8", "standardize": "false,true", "temperature": "1,4"}, 0.5),
    ({"loss": "kd,dist", "dist_gamma": "1,2", "batch_size": "4,8"}, 0.5),
])
def test_the_grid_is_counted_without_enumerating_and_enumerated_as_before(space, alpha, tmp_path):
    from kdpipe import sweep
    from kdpipe.config import SweepConfig

    cfg = SweepConfig(train=tiny_train_config(cache=tmp_path, alpha=alpha), space=space, seeds=[0, 1])
    lazy = list(sweep.grid_points(cfg))
    assert [(p.key, p.params) for p in lazy] == [(p.key, p.params) for p in _eager_grid(cfg)]
    assert cfg.grid_trials == len(lazy)


def test_a_huge_grid_is_refused_before_anything_runs_unless_confirmed(run_cli, cache_dir, tmp_path):
    """2,000 x 100 x 50 = 10 M configs: before, the header, then 3.1 GB in 90 s and no trial."""
    import tracemalloc

    from kdpipe import sweep
    from kdpipe.config import SweepConfig

    lrs = ",".join(f"{1e-5 * (1 + i / 1000):.8g}" for i in range(2000))
    alphas = ",".join(f"{(i + 1) / 100:g}" for i in range(100))
    temps = ",".join(str(t) for t in range(1, 51))
    sw = tmp_path / "sw"
    code, text = _sweep(run_cli, cache_dir, sw, "--lr", lrs, "--alpha", alphas, "-T", temps)
    one_line_error(code, text, "10,000,000 trials", "--large-grid")
    assert not sw.exists()
    tracemalloc.start()
    cfg = SweepConfig(train=tiny_train_config(cache=cache_dir, epochs=1), seeds=[0], large_grid=True, out=sw,
                      space={"lr": lrs, "alpha": alphas, "temperature": temps})
    first = list(itertools.islice(sweep.grid_points(cfg), 3))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert cfg.grid_trials == 10_000_000 and len(first) == 3
    assert peak < 50e6, peak  # counted and started lazily: not ~12 KB per config (120 GB)



class _FirstTrial(Exception):
    pass


@pytest.mark.parametrize("hours", [None, 1.0])
def test_a_worker_starts_a_huge_grid_without_holding_it(hours, cache_dir, tmp_path, monkeypatch):
    """Before: the worker built a dict of every point (and a list of the free ones) before its first trial:
    ~1 KB per point, 200 MB here and 25 s per 100 k points; now it reads the grid only as far as the free
    points it offers, with or without --hours."""
    import tracemalloc

    from kdpipe import sweep
    from kdpipe.config import SweepConfig

    seen = []

    def first_trial(cfg, trial, params, seed, out, *args, **kwargs):
        seen.append((params, seed, tracemalloc.get_traced_memory()[1]))
        raise _FirstTrial

    monkeypatch.setattr(sweep, "run_one", first_trial)
    worker = sweep.grid_worker

    def measured_worker(*args):  # what the worker holds (loading the tiny dataset peaks higher, and is not it)
        tracemalloc.reset_peak()
        return worker(*args)

    monkeypatch.setattr(sweep, "grid_worker", measured_worker)
    space = {"lr": ",".join(f"{1e-5 * (1 + i / 1000):.8g}" for i in range(1000)),
             "alpha": ",".join(f"{(i + 1) / 100:g}" for i in range(100)), "temperature": "1,2"}
    cfg = SweepConfig(train=tiny_train_config(cache=cache_dir, epochs=1), seeds=[0], large_grid=True,
                      out=tmp_path / "sw", space=space, hours=hours)
    assert cfg.grid_trials == 200_000
    tracemalloc.start()
    try:
        with pytest.raises(_FirstTrial):
            sweep.run(cfg)
    finally:
        tracemalloc.stop()
    (params, seed, peak), = seen
    first = next(sweep.grid_points(cfg))
    assert (params, seed) == (first.params, first.seed)  # the grid's first point, as before
    assert peak < 20e6, peak

# ------------------------------------------------------------------------------ 7: a verify that decides


def _scaled_teacher(teacher_dir: Path, dst: Path) -> Path:
    """The same architecture with one layer scaled: another teacher that loads as well as the first."""
    import torch
    from transformers import AutoModelForImageClassification

    shutil.copytree(teacher_dir, dst)
    model = AutoModelForImageClassification.from_pretrained(dst)
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)
    model.save_pretrained(dst)
    return dst


def test_verify_gives_a_verdict_and_names_a_teacher_with_other_weights(run_cli, cache_dir, teacher_dir, tmp_path):
    code, text = run_cli("inspect-cache", cache_dir, "--verify", "6", "--device", "cpu")
    assert code == 0 and "verdict: the cache matches" in text and "warning" not in text, text
    other = _scaled_teacher(teacher_dir, tmp_path / "other")
    code, text = run_cli("inspect-cache", cache_dir, "--verify", "6", "--device", "cpu", "--teacher", other)
    one_line_error(code, text, "does not match this teacher", "beyond the tolerance 0.002", "--force")
    assert "weights (sha256" in text and "are not those the cache was built with" in text, text  # before: exit 0


@pytest.mark.parametrize("how", ["swapped", "edited"])
def test_inspect_cache_refuses_a_split_file_that_holds_another_split(run_cli, cache_dir, tmp_path, how):
    import pyarrow.parquet as pq

    cache = shutil.copytree(cache_dir, tmp_path / "cache")
    if how == "swapped":
        (cache / "train.parquet").rename(cache / "x.parquet")
        (cache / "test.parquet").rename(cache / "train.parquet")
        (cache / "x.parquet").rename(cache / "test.parquet")
    else:  # the split's name changed in the metadata alone (the checksum covers the columns)
        table = read_cache_table(cache / "validation.parquet")
        meta = json.loads(table.schema.metadata[b"kdpipe"])
        table = table.replace_schema_metadata({b"kdpipe": json.dumps({**meta, "split": "test"}).encode()})
        pq.write_table(table, cache / "validation.parquet")
    code, text = run_cli("inspect-cache", cache)
    one_line_error(code, text, "holds the logits of split", "rename it back")
    assert "verified" not in text  # before: "verified 3 split files"
    code, text = run_cli("train-student", "--cache", cache, "--epochs", "1", "--out", tmp_path / "run", *TINY)
    one_line_error(code, text, "holds the logits of split")


# ------------------------------------------------------------------------------------------- 8: smaller


def test_class_names_reach_the_model_card_as_text_not_html(run_cli, teacher_dir, tmp_path):
    """A class folder named like an HTML tag, trained from scratch: the card shows the name, renders no tag."""
    data = make_image_folder(tmp_path / "data", {"train": 3, "validation": 1, "test": 1})
    hostile = "<img src=x onerror=alert(1)>"
    for split in ("train", "validation", "test"):
        (data / split / "healthy").rename(data / split / hostile)
    out = tmp_path / "run"
    code, text = run_cli("train-student", "--dataset", data, "--alpha", "0", "--epochs", "1", "--out", out, *TINY)
    assert code == 0, text
    body = (out / "model" / "README.md").read_text().split("\n---\n", 1)[1]
    assert "<img" in body and "<img" not in _outside_code(body), body  # before: the tag, raw, in the labels line
    assert f"`{hostile}`" in body  # shown verbatim, as code
    from kdpipe import model_card

    run = json.loads((out / "run.json").read_text())
    run["config"]["dataset"] = "x ```\n<script>alert(1)</script>\n```"  # a fence inside the reproduce command
    body = model_card.render(run, "# <b>name</b>").split("\n---\n", 1)[1]
    assert "<script>" not in _outside_code(body) and "<b>" not in body, body


def _outside_code(markdown: str) -> str:
    """`markdown` less its code blocks and spans (CommonMark: a run of N backticks closes at the next run of N)."""
    import re

    return re.sub(r"(`+)(.+?)(?<!`)\1(?!`)", "", markdown, flags=re.S)


def test_a_full_disk_at_the_first_checkpoint_says_rerun_not_resume(cache_dir, tmp_path, monkeypatch):
    from kdpipe import train_student

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(KdpipeError) as e:
        train_student.run(tiny_train_config(cache=cache_dir, epochs=2, out=tmp_path / "run"))
    assert "run the same command again" in str(e.value) and "--resume" not in str(e.value), e.value
    assert "epoch 1" in str(e.value)


@pytest.mark.parametrize("command", ["train-student", "sweep"])
@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "a\\b"])
def test_a_name_is_a_plain_name(run_cli, cache_dir, tmp_path, command, name):
    os.chdir(tmp_path / ".")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    os.chdir(tmp_path / "deep" / "er")  # data/runs/../../x would land in tmp_path/deep/er/x: outside data/
    args = ["--seeds", "0"] if command == "sweep" else []
    code, text = run_cli(command, "--cache", cache_dir, "--epochs", "1", "--name", name, *args, *TINY)
    one_line_error(code, text, "--name", "a plain folder name")
    assert not (tmp_path / "deep" / "er" / "x").exists() and not (tmp_path / "deep" / "er" / "data").exists()


# ---------------------------------------------------------------- 5: Parquet entries that name image files


def _parquet_of_paths(root: Path, image_folder: Path, odd: dict[int, str] | None = None) -> Path:
    """A Parquet dataset (train, validation, test) whose image entries name files (no bytes): copies of the tiny
    folder's images inside `root/.images` (hidden: with more .png files than .parquet ones in sight, datasets
    would read the folder as an image folder); `odd` replaces some train entries' paths (row -> path)."""
    import datasets

    names = sorted(p.name for p in (image_folder / "train").iterdir())
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    for split in ("train", "validation", "test"):
        files_ = sorted((image_folder / split).rglob("*.png"))
        rows, labels = [], []
        for f in files_:
            copy = root / ".images" / f.relative_to(image_folder)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, copy)
            rows.append({"bytes": None, "path": str(copy)})
            labels.append(names.index(f.parent.name))
        for i, path in (odd or {}).items() if split == "train" else ():
            rows[i] = {"bytes": None, "path": path}
        datasets.Dataset.from_dict({"image": rows, "label": labels}, features=feats).to_parquet(root / f"{split}.parquet")
    return root


def test_parquet_entries_naming_files_inside_the_dataset_are_read(run_cli, image_folder, teacher_dir, tmp_path):
    data = _parquet_of_paths(tmp_path / "pq", image_folder)
    code, text = run_cli("cache-teacher", "--dataset", data, "--teacher", teacher_dir, "--out", tmp_path / "c",
                         "--precision", "fp32", "--workers", "0")
    assert code == 0, text


@pytest.mark.parametrize("entry, message", [
    ("/dev/zero", "outside the dataset's folder"),  # before: read without bound (4.3 GB after 15 s)
    ("/etc/hostname", "outside the dataset's folder"),  # before: opened, then named as an undecodable image
    ("TEST", "outside the dataset's folder"),  # before: a test image read into training silently
    ("ESCAPE", "outside the dataset's folder"),  # <dataset>/../escape.png
])
def test_parquet_entries_naming_files_outside_the_dataset_are_refused(run_cli, image_folder, teacher_dir, tmp_path,
                                                                      entry, message):
    test_image = str(next((image_folder / "test").rglob("*.png")))
    shutil.copy(test_image, tmp_path / "escape.png")
    entry = {"TEST": test_image, "ESCAPE": f"{tmp_path / 'pq'}/../escape.png"}.get(entry, entry)
    data = _parquet_of_paths(tmp_path / "pq", image_folder, {2: entry})
    code, text = run_cli("cache-teacher", "--dataset", data, "--teacher", teacher_dir, "--out", tmp_path / "c",
                         "--precision", "fp32", "--workers", "0")
    one_line_error(code, text, message, "row 2 of split 'train'", "--allow-outside-images")
    assert not (tmp_path / "c").exists()
    code, text = run_cli("train-student", "--dataset", data, "--alpha", "0", "--epochs", "1", "--out", tmp_path / "r",
                         *TINY)
    one_line_error(code, text, message)


def test_outside_images_allowed_by_the_flag_are_recorded_and_devices_still_refused(run_cli, image_folder, teacher_dir,
                                                                                   tmp_path):
    test_image = str(next((image_folder / "test" / "angular_leaf_spot").glob("*.png")))  # train row 2's class
    data = _parquet_of_paths(tmp_path / "pq", image_folder, {2: test_image})
    cache = tmp_path / "c"
    code, text = run_cli("cache-teacher", "--dataset", data, "--teacher", teacher_dir, "--out", cache,
                         "--precision", "fp32", "--workers", "0", "--allow-outside-images")
    assert code == 0, text
    meta = json.loads(read_cache_table(cache / "train.parquet").schema.metadata[b"kdpipe"])
    assert meta["dataset"]["outside_images"] is True
    code, text = run_cli("train-student", "--cache", cache, "--epochs", "1", "--out", tmp_path / "r", *TINY)
    assert code == 0, text  # the cache's permission goes with it
    assert "also in another split" in text  # and the test image now in training is said
    assert json.loads((tmp_path / "r" / "run.json").read_text())["dataset"]["outside_images"] is True
    device = _parquet_of_paths(tmp_path / "pq2", image_folder, {1: "/dev/zero"})
    code, text = run_cli("cache-teacher", "--dataset", device, "--teacher", teacher_dir, "--out", tmp_path / "c2",
                         "--precision", "fp32", "--workers", "0", "--allow-outside-images")
    one_line_error(code, text, "/dev/zero", "not a regular file")


def test_an_image_file_larger_than_any_image_is_not_read(tmp_path, monkeypatch):
    from kdpipe import data

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 4096)
    monkeypatch.setattr(data, "MAX_IMAGE_BYTES", 1024)
    with pytest.raises(KdpipeError, match="more than any image kdpipe reads"):
        data.read_image_file(str(big), str(tmp_path), (str(tmp_path),), "row 0")


# ------------------------------------------------------------- 4: files that silently drop out of a folder


def _folder(tmp_path: Path, name: str = "data") -> Path:
    return make_image_folder(tmp_path / name, {"train": 2, "validation": 1, "test": 1})


def test_every_file_of_an_image_folder_is_used_or_named(run_cli, teacher_dir, tmp_path):
    data = _folder(tmp_path)
    (data / "train" / "healthy" / "healthy_0.png").rename(data / "train" / "healthy" / "heal\nthy_0.png")
    (data / "README.txt").write_text("notes")
    (data / "train" / "empty_class").mkdir()
    shutil.copytree(data / "train" / "healthy", data / "train" / ".hidden")  # a class datasets does not see
    cache = tmp_path / "c"
    code, text = run_cli("cache-teacher", "--dataset", data, "--teacher", teacher_dir, "--out", cache,
                         "--precision", "fp32", "--workers", "0")
    assert code == 0, text
    for name in ('"train/healthy/heal\\nthy_0.png"', '"train/.hidden/healthy_1.png"', '"README.txt"',
                 '"train/empty_class/"', "image(s) the loader skips", "empty folder(s)", "not images"):
        assert name in " ".join(text.split()), (name, text)  # before: 5 rows of 6 images, not a word
    meta = json.loads(read_cache_table(cache / "train.parquet").schema.metadata[b"kdpipe"])
    assert meta["dataset_left_out_count"] == 5 and "train/healthy/heal\nthy_0.png" in meta["dataset_left_out"]
    code, text = run_cli("train-student", "--cache", cache, "--epochs", "1", "--out", tmp_path / "r", *TINY)
    assert code == 0 and "not used from" in text, text
    assert json.loads((tmp_path / "r" / "run.json").read_text())["dataset_left_out"]["count"] == 5


def test_a_folder_whose_classes_the_loader_cannot_see_names_the_files_not_the_label_column(run_cli, tmp_path):
    data = _folder(tmp_path)
    (data / "train" / "healthy" / "healthy_0.png").rename(data / "train" / "healthy" / "heal\\thy_0.png")
    code, text = run_cli("train-student", "--dataset", data, "--alpha", "0", "--epochs", "1", "--out", tmp_path / "r",
                         *TINY)
    one_line_error(code, text, "no class folders found", '"train/healthy/heal\\\\thy_0.png"', "move or rename")
    assert "--label-column" not in text  # before: "cannot tell which column ...; pass --label-column"
    data2 = _folder(tmp_path, "data2")
    shutil.copy(data2 / "train" / "healthy" / "healthy_0.png", data2 / "train" / "stray.png")  # not in a class
    code, text = run_cli("train-student", "--dataset", data2, "--alpha", "0", "--epochs", "1", "--out", tmp_path / "r",
                         *TINY)
    one_line_error(code, text, "no class folders found", '"train/stray.png"')


@pytest.mark.parametrize("case", ["no training images", "one image, two labels"])
def test_label_issues_are_refused_unless_accepted_and_then_recorded(run_cli, tmp_path, case):
    data = _folder(tmp_path)
    if case == "no training images":
        shutil.rmtree(data / "train" / "healthy")
        expected = "1 class(es) with no image in --train-split train (healthy)"
    else:
        shutil.copy(data / "train" / "healthy" / "healthy_0.png", data / "train" / "bean_rust" / "copy.png")
        expected = "1 identical image(s) under two labels"
    out = tmp_path / "r"
    args = ["--dataset", data, "--alpha", "0", "--epochs", "1", *TINY]
    code, text = run_cli("train-student", *args, "--out", out)
    one_line_error(code, text, expected, "--allow-label-issues")  # before: trained without a word
    assert not out.exists()
    code, text = run_cli("sweep", *args, "--seeds", "0", "--lr", "1e-3,3e-3", "--out", tmp_path / "sw")
    one_line_error(code, text, expected)
    assert not (tmp_path / "sw").exists()
    code, text = run_cli("train-student", *args, "--out", out, "--allow-label-issues")
    assert code == 0 and "trained with --allow-label-issues" in text, text
    run = json.loads((out / "run.json").read_text())
    assert run["label_issues"]["accepted"] is True and run["config"]["allow_label_issues"] is True


def test_an_image_in_train_and_test_is_a_recorded_warning(run_cli, tmp_path):
    data = _folder(tmp_path)
    shutil.copy(data / "train" / "healthy" / "healthy_0.png", data / "test" / "healthy" / "again.png")
    out = tmp_path / "r"
    code, text = run_cli("train-student", "--dataset", data, "--alpha", "0", "--epochs", "1", "--out", out, *TINY)
    assert code == 0 and "also in another split" in text, text
    overlap = json.loads((out / "run.json").read_text())["split_overlap"]
    assert overlap["pairs"] == 1 and "test/healthy/again.png" in overlap["example"]


# ---------------------------------------------------------------------- the next steps a user would take


@pytest.mark.parametrize("path", [None, "", "x\0.png"])
def test_an_entry_with_neither_bytes_nor_a_usable_path_is_one_line(tmp_path, path):
    """A null path, an empty one, a NUL inside: before, a TypeError / ValueError traceback (the empty one
    named the dataset folder as "not a regular file")."""
    from kdpipe import data

    with pytest.raises(KdpipeError, match="holds no image: neither its bytes nor a usable file path"):
        data.image_file(path, str(tmp_path), (str(tmp_path),), "row 1 of split 'train'")


def test_a_file_name_that_is_not_utf8_is_named(run_cli, tmp_path):
    data = _folder(tmp_path)
    os.rename(data / "train" / "healthy" / "healthy_0.png", os.fsencode(data / "train" / "healthy") + b"/bad\xff.png")
    code, text = run_cli("train-student", "--dataset", data, "--alpha", "0", "--epochs", "1", "--out", tmp_path / "r",
                         *TINY)
    one_line_error(code, text, "is not UTF-8", "bad\\udcff.png", "rename it")  # before: "An error occurred while
    # generating the dataset", naming nothing


@pytest.mark.parametrize("url", ["sqlite:///relative.db", "sqlite:///:memory:"])
def test_a_new_sweep_refuses_an_sqlite_file_that_depends_on_the_working_folder(run_cli, cache_dir, tmp_path, url):
    code, text = _sweep(run_cli, cache_dir, tmp_path / "sw", "--storage", url)
    one_line_error(code, text, "absolute path", "four slashes")
    assert not (tmp_path / "sw").exists() and not (tmp_path / "relative.db").exists()


def test_a_full_disk_when_the_student_is_saved_keeps_the_checkpoint_for_resume(cache_dir, tmp_path, monkeypatch):
    from kdpipe import train_student

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "run"
    monkeypatch.setattr(train_student, "save_student", no_space)
    with pytest.raises(KdpipeError, match="cannot write the trained student .* --resume"):  # before: OSError traceback
        train_student.run(tiny_train_config(cache=cache_dir, epochs=1, out=out))
    monkeypatch.undo()
    assert (out / "checkpoint.pt").exists() and not (out / "model").exists()
    report = train_student.run(tiny_train_config(cache=cache_dir, epochs=1, out=out, resume=True))
    assert report.best_epoch == 1 and (out / "model" / "model.safetensors").exists()
