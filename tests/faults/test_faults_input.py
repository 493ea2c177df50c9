"""Bad input and faults, round two (issue 26): changed data, non-finite numbers, files where folders belong,
resuming finished runs, dead sweep workers, mixed caches, and the smaller cases a clumsy user meets.
Each case is met through the CLI, as a user would; docs/reliability.md lists them with their outcomes."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import (TINY_STUDENT, make_image_folder, one_line_error, parquet_dataset, spawn_kdpipe,
                           tiny_train_config, write_split)
from kdpipe import files, locking, logit_store, train_student
from kdpipe.errors import KdpipeError

TINY = ["--student-config", TINY_STUDENT, "--lr", "3e-3", "--batch-size", "8", "--precision", "fp32", "--device", "cpu"]


def _train(run_cli, cache, out, *extra):
    return run_cli("train-student", "--cache", cache, "--epochs", "1", "--out", out, *TINY, *extra)


# ------------------------------------------------------------------- 2: changed contents under the same id


def _changed_copy(image_folder: Path, dst: Path, *names: str) -> Path:
    """The dataset with the pixels of `names` (paths relative to its root) replaced, ids unchanged."""
    shutil.copytree(image_folder, dst)
    for name in names:
        path = dst / name
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).rotate(90).save(path)
    return dst


def test_images_changed_under_the_same_id_are_refused_unless_accepted(run_cli, cache_dir, image_folder, tmp_path):
    changed = ["train/healthy/healthy_0.png", "train/bean_rust/bean_rust_3.png"]
    data = _changed_copy(image_folder, tmp_path / "changed", *changed)
    out = tmp_path / "run"
    code, text = _train(run_cli, cache_dir, out, "--dataset", data)
    one_line_error(code, text, "2 examples", "'train': 2 of 36", "--allow-changed-data")
    assert any(f"e.g. {name}" in text for name in changed), text  # one of them, by its path
    assert not out.exists()  # refused before anything was written
    code, text = _train(run_cli, cache_dir, out, "--dataset", data, "--allow-changed-data")
    assert code == 0, text
    run = json.loads((out / "run.json").read_text())
    assert run["cache_matches_dataset_contents"] is False
    assert run["changed_data"]["accepted"] is True
    assert run["changed_data"]["splits"]["train"]["examples"] == 2
    assert run["changed_data"]["splits"]["train"]["example"] in changed
    assert "changed" in text and "--allow-changed-data" in text  # the acceptance is shown, not only recorded


def test_the_same_images_in_another_folder_train_without_the_flag(run_cli, cache_dir, image_folder, tmp_path):
    moved = shutil.copytree(image_folder, tmp_path / "moved")
    code, text = _train(run_cli, cache_dir, tmp_path / "run", "--dataset", moved)
    assert code == 0, text
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["cache_matches_dataset_contents"] is True and "changed_data" not in run


# ------------------------------------------------------------------------------- 3: non-finite numbers


@pytest.mark.parametrize("flag, value", [("-T", "inf"), ("--lr", "nan"), ("--alpha", "nan"), ("--weight-decay", "inf"),
                                         ("--warmup-ratio", "nan"), ("--bn-momentum", "nan"), ("--dkd-beta", "inf"),
                                         ("--lr", "-inf")])
def test_non_finite_train_flags_are_refused(run_cli, cache_dir, tmp_path, flag, value):
    out = tmp_path / "run"
    code, text = _train(run_cli, cache_dir, out, flag, value)
    one_line_error(code, text, "finite", "-T" if flag == "-T" else flag)
    assert not out.exists()


@pytest.mark.parametrize("args", [["--view-flip", "nan"], ["--views", "1", "--view-mixup", "inf"],
                                  ["--views", "1", "--view-mixup", "1", "--view-mixup-p", "nan"]])
def test_non_finite_cache_flags_are_refused(run_cli, image_folder, teacher_dir, tmp_path, args):
    code, text = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--out", tmp_path / "c",
                         *args)
    one_line_error(code, text, args[-2])
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("args", [["-T", "1,inf"], ["--lr", "nan"], ["--stale-after", "inf"],
                                  ["--sampler", "tpe", "--trials", "2", "--lr", "1e-5:inf:log"],
                                  ["--sampler", "tpe", "--trials", "2", "--lr", "nan:1e-2"]])
def test_non_finite_sweep_flags_are_refused(run_cli, cache_dir, tmp_path, args):
    code, text = run_cli("sweep", "--cache", cache_dir, "--epochs", "1", "--seeds", "0", "--out", tmp_path / "sw",
                         *TINY[:2], *args)
    flag = next(a for a in args if a in ("-T", "--lr", "--stale-after"))
    one_line_error(code, text, flag, "finite")
    assert not (tmp_path / "sw").exists()


def test_a_loss_that_turns_non_finite_stops_the_run_naming_epoch_step_and_term(run_cli, cache_dir, tmp_path):
    """T = 1e-40 is finite and positive, but s / T overflows float32: the KD term is inf - inf at the first
    step while CE stays finite."""
    out = tmp_path / "run"
    code, text = _train(run_cli, cache_dir, out, "-T", "1e-40")
    one_line_error(code, text, "non-finite", "epoch 1, step 1 of 5", "(term: kd)")  # CE stayed finite
    assert not out.exists()  # stopped in its first epoch: no model, run.json, checkpoint, metrics, events, folder
    code, text = _train(run_cli, cache_dir, out)  # the folder is free for a corrected run
    assert code == 0, text


def test_a_run_that_diverges_after_a_checkpoint_keeps_it_and_writes_no_nan(cache_dir, tmp_path, monkeypatch):
    """Training goes well for an epoch, then the loss turns NaN mid-way through epoch 2 (as a too-large
    learning rate would make it): the error names epoch 2, the epoch-1 checkpoint and metrics stay, every
    line of metrics.jsonl is JSON, and no model is saved."""
    real = train_student.student_inputs
    calls = {"n": 0}
    steps_per_epoch = 5  # 36 training images in batches of 8

    def poisoned(s, batch):
        calls["n"] += 1
        x = real(s, batch)
        return x * float("nan") if calls["n"] == steps_per_epoch + 3 else x

    monkeypatch.setattr(train_student, "student_inputs", poisoned)
    out = tmp_path / "run"
    with pytest.raises(KdpipeError, match=r"epoch 2, step 3 of 5 \(terms: ce, kd\)"):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=out))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]  # strict JSON: NaN would not parse back as such
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    assert (out / "checkpoint.pt").exists() and not (out / "model").exists() and not (out / "run.json").exists()


def test_metrics_are_written_as_strict_json_even_when_a_metric_is_not_finite(tmp_path):
    files.write_json(tmp_path / "m.json", {"kl": float("nan"), "a": [1.0, float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"kl": None, "a": [1.0, None]}


# ------------------------------------------------------------------------ 4: tracebacks for files and folders


@pytest.mark.parametrize("command", ["cache-teacher", "train-student", "sweep"])
def test_an_out_that_is_an_existing_file_is_one_line(run_cli, cache_dir, image_folder, teacher_dir, tmp_path, command):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    args = {"cache-teacher": ["--teacher", teacher_dir, "--dataset", image_folder],
            "train-student": ["--cache", cache_dir, "--epochs", "1", *TINY],
            "sweep": ["--cache", cache_dir, "--epochs", "1", "--seeds", "0", *TINY]}[command]
    code, text = run_cli(command, *args, "--out", target)
    one_line_error(code, text, str(target), "is a file")
    assert target.read_text() == "keep me\n"


def test_evaluate_on_a_run_without_its_weights_file_is_one_line(run_cli, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert _train(run_cli, cache_dir, out)[0] == 0
    (out / "model" / "model.safetensors").unlink()
    code, text = run_cli("evaluate", out)
    one_line_error(code, text, "model.safetensors", "missing")


# --------------------------------------------------------------------------- 5: --resume on a finished run


def test_resume_with_other_settings_on_a_finished_run_is_refused(run_cli, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert _train(run_cli, cache_dir, out)[0] == 0
    before = (out / "run.json").read_text()
    code, text = run_cli("train-student", "--cache", cache_dir, "--epochs", "2", "--out", out, "--resume", *TINY)
    one_line_error(code, text, "--resume", "other settings", "epochs")
    assert (out / "run.json").read_text() == before
    code, text = _train(run_cli, cache_dir, out, "--resume")  # the same settings: its saved report
    assert code == 0 and "best epoch 1" in text, text


# ------------------------------------------------------------------------- 6: a dead sweep worker's trial


def _sweep_with_a_running_trial(tmp_path, cache_dir, owner: dict) -> tuple[Path, Path]:
    """A sweep folder whose study holds one RUNNING trial claimed by `owner`, and that trial's run folder."""
    from kdpipe import sweep
    from kdpipe.config import SweepConfig

    cfg = SweepConfig(train=tiny_train_config(cache=cache_dir, epochs=1), space={"alpha": "0,0.5"}, seeds=[0],
                      out=tmp_path / "sw")
    sweep.claim_folder(cfg.out_dir(), cfg.study_name(), cfg.storage, cfg.spec())
    study = sweep.open_study(cfg, cfg.out_dir())
    trial = study.ask()
    for key, value in {"point": "a0.5-seed0", "config": "a0.5", "owner": owner}.items():
        trial.set_user_attr(key, value)
    run_dir = cfg.out_dir() / "runs" / "a0.5-seed0"
    with locking.exclusive(run_dir):  # the worker started its run, then died: its lock was released
        (run_dir / "checkpoint.pt").write_bytes(b"")
    return cfg.out_dir(), run_dir


def test_sweep_report_shows_a_dead_workers_trial_by_its_free_lock(run_cli, cache_dir, tmp_path):
    owner = {"host": "another-host", "pid": 1, "alive_at": time.time()}  # silent for seconds only: not stale yet
    sw, run_dir = _sweep_with_a_running_trial(tmp_path, cache_dir, owner)
    code, text = run_cli("sweep-report", sw)
    assert code == 0, text
    assert "1 interrupted" in text and "running" not in text, text
    assert "a0.5-seed0" in text  # which run folder a rerun will continue
    with locking.exclusive(run_dir):  # a live worker holds it
        code, text = run_cli("sweep-report", sw)
    assert code == 0 and "1 running" in text and "interrupted" not in text, text


def test_sweep_report_on_the_same_host_believes_a_dead_pid(run_cli, cache_dir, tmp_path):
    proc = spawn_kdpipe("--help", cwd=tmp_path)
    proc.communicate(timeout=120)  # a pid that existed and is gone
    sw, _ = _sweep_with_a_running_trial(tmp_path, cache_dir,
                                        {"host": socket.gethostname(), "pid": proc.pid, "alive_at": time.time()})
    shutil.rmtree(sw / "runs")  # it died before its run folder existed
    code, text = run_cli("sweep-report", sw)
    assert code == 0 and "1 interrupted" in text and "running" not in text, text


# ---------------------------------------------------------------------- 7: a cache folder of two datasets


def test_a_cache_folder_of_another_dataset_is_refused_or_rebuilt_whole(run_cli, cache_dir, teacher_dir, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)  # the tiny dataset's train, validation and test
    other = make_image_folder(tmp_path / "other", {"train": 2, "validation": 1}, seed=1)
    args = ["cache-teacher", "--teacher", teacher_dir, "--dataset", other, "--out", out, "--workers", "0",
            "--precision", "fp32"]
    code, text = run_cli(*args)
    one_line_error(code, text, "test.parquet", "another dataset", "--force")
    assert sorted(p.name for p in out.glob("*.parquet")) == ["test.parquet", "train.parquet", "validation.parquet"]
    logit_store.read_split(out / "train.parquet")
    assert logit_store.read_meta(out / "train.parquet")["rows"] == 36  # untouched
    code, text = run_cli(*args, "--force")  # rebuilt whole: only the new dataset's splits remain
    assert code == 0, text
    assert sorted(p.name for p in out.glob("*.parquet")) == ["train.parquet", "validation.parquet"]
    code, text = run_cli("inspect-cache", out)
    assert code == 0, text


def test_inspect_cache_refuses_splits_that_disagree(run_cli, cache_dir, teacher_dir, tmp_path):
    other = make_image_folder(tmp_path / "other", {"test": 1}, seed=1)
    second = tmp_path / "second"
    assert run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", other, "--out", second, "--workers", "0",
                   "--precision", "fp32")[0] == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(cache_dir, mixed)
    shutil.copy(second / "test.parquet", mixed / "test.parquet")  # valid on its own, from another dataset
    code, text = run_cli("inspect-cache", mixed)
    one_line_error(code, text, "test", "another dataset")
    assert "verified" not in text
    code, text = _train(run_cli, mixed, tmp_path / "run")
    one_line_error(code, text, "test", "another dataset")


# --------------------------------------------------------------------------------- 8: the smaller items


@pytest.mark.parametrize("flag", ["--train-split", "--val-split", "--test-split"])
def test_a_missing_split_names_its_own_flag_and_leaves_no_folder(run_cli, cache_dir, tmp_path, flag):
    out = tmp_path / "deep" / "run"
    code, text = _train(run_cli, cache_dir, out, flag, "nope")
    one_line_error(code, text, f"{flag} nope")
    assert "--splits" not in text
    assert not (tmp_path / "deep").exists()  # neither the folder nor the parents it would have made


def test_a_refused_cache_teacher_leaves_no_folder(run_cli, image_folder, teacher_dir, tmp_path):
    code, text = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--splits", "nope",
                         "--out", tmp_path / "c")
    one_line_error(code, text, "--splits", "nope")
    assert not (tmp_path / "c").exists()


def test_a_full_disk_at_the_first_checkpoint_leaves_no_orphan_digest(cache_dir, tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    out = tmp_path / "run"
    with pytest.raises(KdpipeError, match="No space left on device"):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=1, out=out))
    monkeypatch.undo()
    assert not (out / "checkpoint.sha256").exists() and not (out / "checkpoint.pt").exists()
    assert not list(out.glob(".*.tmp-*"))
    assert train_student.run(tiny_train_config(cache=cache_dir, epochs=1, out=out, resume=True)).best_epoch == 1


@pytest.mark.parametrize("spec", ["./no/such/teacher", "/no/such/teacher", "~/no-such-teacher"])
def test_a_teacher_folder_that_does_not_exist_is_reported_as_a_missing_folder(run_cli, image_folder, tmp_path, spec):
    code, text = run_cli("cache-teacher", "--teacher", spec, "--dataset", image_folder, "--out", tmp_path / "c")
    one_line_error(code, text, f"--teacher {spec}", "no such folder")
    assert "could not load it from the Hugging Face Hub" not in text and "Repo id" not in text


def test_a_hub_like_teacher_name_that_is_not_found_mentions_both_places(run_cli, image_folder, tmp_path):
    code, text = run_cli("cache-teacher", "--teacher", "no-such-teacher", "--dataset", image_folder, "--out",
                         tmp_path / "c")
    one_line_error(code, text, "--teacher no-such-teacher", "Hub", "no local folder")


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 48, "its weights have other shapes than the model its config.json describes"),  # was a traceback
    ("image_size", "big", "Field 'image_size' with value 'big'"),  # a strict-config error: was a traceback
])
def test_a_teacher_config_that_does_not_fit_is_one_line(run_cli, image_folder, tmp_path, field, value, message):
    import json

    from tests.helpers import make_teacher

    teacher = make_teacher(tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, field: value}))
    code, text = run_cli("cache-teacher", "--teacher", teacher, "--dataset", image_folder, "--out", tmp_path / "c")
    one_line_error(code, text, f"--teacher {teacher}", message)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", ["cache-teacher", "train-student", "sweep"])
def test_a_refusal_prints_its_error_line_alone(run_cli, tmp_path, command):
    """Nothing but the error (a sweep names itself first): the progress display, started before the refusal,
    used to leave a blank line."""
    alpha = [] if command == "cache-teacher" else ["--alpha", "0"]
    code, text = run_cli(command, "--dataset", tmp_path / "missing", *alpha, "--out", tmp_path / "out")
    lines = text.splitlines()
    assert code == 1 and lines[-1].startswith("error: --dataset") and "" not in lines, repr(text)
    assert len(lines) == 1 + (command == "sweep") and not (tmp_path / "out").exists()


def test_a_recorded_dataset_that_is_gone_names_the_flag_that_replaces_it(run_cli, image_folder, tmp_path):
    """It used to read `--dataset …: no such file or folder`, naming a flag the user had not passed."""
    data = shutil.copytree(image_folder, tmp_path / "data")
    out = tmp_path / "run"
    code, text = run_cli("train-student", "--dataset", data, "--alpha", "0", "--epochs", "1", "--out", out, *TINY)
    assert code == 0, text
    data.rename(tmp_path / "moved")
    code, text = run_cli("evaluate", out)
    one_line_error(code, text, f"--dataset: the recorded dataset {data} is gone", "pass --dataset PATH")
    code, text = run_cli("evaluate", out, "--dataset", tmp_path / "moved")
    assert code == 0 and "accuracy" in text, text


def test_verify_with_a_recorded_teacher_that_is_gone_names_the_flag(run_cli, image_folder, teacher_dir, tmp_path):
    """A local teacher's folder, moved: it was tried as a Hub id (a name with no slash looks like one)."""
    teacher = shutil.copytree(teacher_dir, tmp_path / "teacher")
    code, text = run_cli("cache-teacher", "--teacher", teacher, "--dataset", image_folder, "--out", tmp_path / "c",
                         "--workers", "0")
    assert code == 0, text
    teacher.rename(tmp_path / "moved")
    code, text = run_cli("inspect-cache", tmp_path / "c", "--verify", "2")
    one_line_error(code, text, "--teacher: the recorded teacher folder", "is gone", "pass --teacher PATH")
    code, text = run_cli("inspect-cache", tmp_path / "c", "--verify", "2", "--teacher", tmp_path / "moved")
    assert code == 0 and "argmax agreement 100.00%" in text.replace("\n", " "), text


def test_a_val_split_of_test_is_named_test_in_the_results(run_cli, cache_dir, tmp_path):
    code, text = _train(run_cli, cache_dir, tmp_path / "run", "--val-split", "test", "--test-split", "")
    assert code == 0, text
    assert "chosen on test" in text and "validation" not in text, text


def test_refusing_a_pickle_prints_only_the_error_line(image_folder, tmp_path):
    """A raw pickle (protocol 4) makes torch's weights-only unpickler warn before it refuses: no warning
    may precede the error line (run in a subprocess: pytest would swallow warnings in-process)."""
    from tests.helpers import make_teacher

    teacher = make_teacher(tmp_path / "teacher")
    (teacher / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch '{tmp_path / 'PWNED'}'",))

    (teacher / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}, protocol=4))
    proc = spawn_kdpipe("cache-teacher", "--teacher", teacher, "--dataset", image_folder, "--out", tmp_path / "c",
                        cwd=tmp_path)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, text
    assert [line for line in text.splitlines() if line.strip()] == [next(
        line for line in text.splitlines() if line.startswith("error:"))], text
    assert "pickle checkpoint holds more than tensors" in text and not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------- further: what a clumsy user tries next


def test_a_cache_written_before_image_digests_is_still_refused_when_its_images_changed(run_cli, cache_dir,
                                                                                      image_folder, tmp_path):
    old = shutil.copytree(cache_dir, tmp_path / "old")
    for path in old.glob("*.parquet"):  # as format 2 wrote it: no image_sha256 column
        s = logit_store.read_split(path)
        meta = {k: v for k, v in s.meta.items() if k not in ("format", "rows", "num_classes", "content_sha256")}
        write_split(path, s.ids, s.labels, s.logits, meta)
    data = _changed_copy(image_folder, tmp_path / "changed", "validation/healthy/healthy_1.png")
    code, text = _train(run_cli, old, tmp_path / "run", "--dataset", data)
    one_line_error(code, text, "'validation'", "predates per-image digests", "--allow-changed-data")


def test_resume_into_a_folder_of_another_kind_is_refused(run_cli, cache_dir, tmp_path):
    cache = shutil.copytree(cache_dir, tmp_path / "cache")
    before = sorted(p.name for p in cache.iterdir())
    code, text = _train(run_cli, cache_dir, cache, "--resume")
    one_line_error(code, text, "not a train-student run folder", "train.parquet")
    assert sorted(p.name for p in cache.iterdir()) == before
    code, text = run_cli("sweep", "--cache", cache_dir, "--epochs", "1", "--seeds", "0", "--out", cache, *TINY)
    one_line_error(code, text, "not a sweep")
    assert sorted(p.name for p in cache.iterdir()) == before


def test_cache_teacher_refuses_an_out_inside_the_dataset_or_in_a_run(run_cli, image_folder, teacher_dir, cache_dir,
                                                                     tmp_path):
    data = shutil.copytree(image_folder, tmp_path / "data")
    for out in (data, data / "cache"):
        code, text = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", data, "--out", out)
        one_line_error(code, text, "inside --dataset")
    assert sorted(p.name for p in data.iterdir()) == ["test", "train", "validation"]  # not even a lock file
    run = tmp_path / "run"
    assert _train(run_cli, cache_dir, run)[0] == 0
    code, text = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--out", run)
    one_line_error(code, text, "not a cache")
    assert not list(run.glob("*.parquet"))


@pytest.mark.parametrize("kind", ["link to a file", "broken link", "under a file", "unwritable"])
def test_an_out_that_cannot_be_a_folder_is_one_line(run_cli, cache_dir, tmp_path, monkeypatch, kind):
    (tmp_path / "notes.txt").write_text("keep me\n")
    out = {"link to a file": tmp_path / "link", "broken link": tmp_path / "broken",
           "under a file": tmp_path / "notes.txt" / "run", "unwritable": tmp_path / "locked" / "run"}[kind]
    if kind == "link to a file":
        out.symlink_to(tmp_path / "notes.txt")
    if kind == "broken link":
        out.symlink_to(tmp_path / "nowhere")
    if kind == "unwritable":  # as a read-only place answers (root ignores permission bits, so it is simulated)
        real = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self == out:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    code, text = _train(run_cli, cache_dir, out)
    one_line_error(code, text, "--out")
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"


def test_evaluate_on_damaged_runs_and_missing_splits_is_one_line(run_cli, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert _train(run_cli, cache_dir, out)[0] == 0
    code, text = run_cli("evaluate", out, "--split", "nope")
    one_line_error(code, text, "--split nope", "not in dataset")
    def bad_field(run):  # a strict-config error (transformers 5): was a traceback
        config = run / "model" / "config.json"
        config.write_text(config.read_text().replace('"depth_multiplier": 0.35', '"depth_multiplier": -1'))

    for name, damage in [("config", lambda r: (r / "model" / "config.json").unlink()), ("config-field", bad_field),
                         ("run.json", lambda r: (r / "run.json").write_text('{"best_epoch": 1,'))]:
        broken = shutil.copytree(out, tmp_path / name)
        damage(broken)
        code, text = run_cli("evaluate", broken)
        one_line_error(code, text, str(broken))
    code, text = _train(run_cli, cache_dir, tmp_path / "run.json", "--resume")  # resuming the damaged finished run
    one_line_error(code, text, "run.json", "damaged")


def test_a_teacher_that_outputs_nan_is_refused_and_nothing_is_written(run_cli, image_folder, tmp_path):
    import torch
    from transformers import ViTForImageClassification

    from tests.helpers import make_teacher

    teacher = make_teacher(tmp_path / "teacher")
    model = ViTForImageClassification.from_pretrained(teacher)
    with torch.no_grad():
        model.classifier.bias[1] = float("nan")  # as an fp16 overflow would make a logit
    model.save_pretrained(teacher)
    code, text = run_cli("cache-teacher", "--teacher", teacher, "--dataset", image_folder, "--out", tmp_path / "c",
                         "--workers", "0", "--precision", "fp32")
    one_line_error(code, text, "non-finite logits", "--precision fp32")
    assert not list((tmp_path / "c").glob("*.parquet"))


@pytest.mark.parametrize("args, message", [
    (["--student-config", TINY_STUDENT.replace("image_size=32", "image_size=0")], "at least 1 pixel"),
    (["--student-config", "depth_multiplier=nan"], "not a finite number"),
    (["--train-split", "validation"], "--val-split validation is also --train-split"),  # was accepted: chosen on train
    (["--test-split", "train"], "--test-split train is also --train-split"),
    (["--student-config", "depth_multipler=0.35"], "--student-config depth_multipler: not a field of MobileNetV2Config; "
                                                   "did you mean depth_multiplier?"),  # was ignored: trained 1.0
    (["--student-config", "no_such_field=3"], "not a field of MobileNetV2Config; its fields: architectures"),
    (["--student-config", "depth_multiplier=-1"], "depth_multiplier"),  # was a traceback (a strict-config error)
    (["--cache-file"], "a file; pass the folder"),
])
def test_other_hostile_train_values_are_one_line(run_cli, cache_dir, tmp_path, args, message):
    if args == ["--cache-file"]:
        code, text = _train(run_cli, cache_dir / "train.parquet", tmp_path / "run")
    else:
        code, text = run_cli("train-student", "--cache", cache_dir, "--epochs", "1", "--out", tmp_path / "run",
                             "--precision", "fp32", *args)
    one_line_error(code, text, message)
    assert not (tmp_path / "run").exists()


def test_other_hostile_cache_values_are_one_line(run_cli, image_folder, teacher_dir, cache_dir, tmp_path):
    code, text = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--out", tmp_path / "c",
                         "--workers", str(4 * (os.cpu_count() or 1) + 1))
    one_line_error(code, text, "--workers")
    code, text = run_cli("cache-teacher", "--teacher", teacher_dir / "config.json", "--dataset", image_folder, "--out",
                         tmp_path / "c")
    one_line_error(code, text, "a file")
    code, text = run_cli("inspect-cache", cache_dir, "--verify", "-1")
    one_line_error(code, text, "--verify")
    assert not (tmp_path / "c").exists()


def test_a_truncated_parquet_dataset_file_is_named(run_cli, teacher_dir, tmp_path):
    data = parquet_dataset(tmp_path / "pq", ["angular_leaf_spot", "bean_rust", "healthy"])
    raw = (data / "test.parquet").read_bytes()
    (data / "test.parquet").write_bytes(raw[:len(raw) // 2])
    code, text = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", data, "--out", tmp_path / "c")
    one_line_error(code, text, "test.parquet", "not a readable Parquet file")
