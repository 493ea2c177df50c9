"""`kdpipe sweep` and `kdpipe sweep-report` on tiny generated data (1-2 epoch trials)."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import statistics
import time
from pathlib import Path

import pytest

from tests.helpers import TINY_STUDENT, make_image_folder, make_teacher, spawn_kdpipe
from kdpipe import run_folder, sweep, sweep_report
from kdpipe.config import SweepConfig
from kdpipe.errors import KdpipeError
from kdpipe.stats import welch

TINY = ["--student-config", TINY_STUDENT, "--lr", "3e-3", "--precision", "fp32", "--device", "cpu"]


def _trials(out: Path):
    from optuna.trial import TrialState

    record = sweep.load_spec(out)
    import optuna

    study = optuna.load_study(study_name=record["study_name"], storage=sweep.open_storage(record["storage"], out))
    done = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return study.get_trials(), done


def test_a_two_by_two_grid_writes_runs_table_files_and_heatmap(run_cli, cache_dir, tmp_path):
    code, out = run_cli("sweep", "--cache", cache_dir, "--temperature", "2,5", "--alpha", "0.25,0.75", "--epochs", "1",
                        "--seeds", "0,1", "--out", tmp_path / "sw", *TINY)
    assert code == 0, out
    sw = tmp_path / "sw"
    runs = sorted(p.name for p in (sw / "runs").iterdir())
    assert runs == sorted(f"T{t}-a{a}-seed{s}" for t in (2, 5) for a in (0.25, 0.75) for s in (0, 1))
    assert all((sw / "runs" / r / "run.json").exists() and (sw / "runs" / r / "model").is_dir() for r in runs)
    kept = [run_folder.read_predictions(sw / "runs" / r, split) for r in runs for split in ("validation", "test")]
    assert len(kept) == 16 and all(len(p.ids) == 12 for p in kept)  # every run keeps its predictions per image
    rows = list(csv.DictReader((sw / "results.csv").open()))
    assert len(rows) == 4 and all(r["seeds"] == "2" for r in rows)
    means = [float(r["val_mean"]) for r in rows]
    assert means == sorted(means, reverse=True)  # best first
    assert [r["chosen"] for r in rows] == ["1", "0", "0", "0"] and rows[0]["test_mean"] != ""
    assert all(r["test_mean"] == "" for r in rows[1:])  # test is read for the chosen config only
    result = json.loads((sw / "results.json").read_text())
    chosen = result["best"]
    assert chosen["chosen_on"].startswith("validation") and len(chosen["test_accuracy"]) == 2
    per_run = {json.loads((sw / "runs" / f"{chosen['config']}-seed{s}" / "run.json").read_text())["validation"]["accuracy"]
               for s in (0, 1)}
    assert set(chosen["validation_accuracy"]) == per_run  # the table is built from the runs' own results
    assert (sw / "heatmap.png").stat().st_size > 1000
    assert "chosen on validation" in out and "test accuracy, reported not used" in out


def test_the_report_is_rebuilt_from_storage(run_cli, cache_dir, tmp_path):
    sw = tmp_path / "sw"
    assert run_cli("sweep", "--cache", cache_dir, "--alpha", "0,0.5", "--epochs", "1", "--seeds", "0", "--out", sw,
                   *TINY)[0] == 0
    before = json.loads((sw / "results.json").read_text())
    for name in ("results.csv", "results.json"):
        (sw / name).unlink()
    code, out = run_cli("sweep-report", sw)
    assert code == 0, out
    assert json.loads((sw / "results.json").read_text()) == before
    assert (sw / "results.csv").exists() and not (sw / "heatmap.png").exists()  # T is not varied: no heatmap


def test_the_teacher_is_never_loaded(run_cli, image_folder, tmp_path):
    from kdpipe import cache_teacher
    from kdpipe.config import CacheConfig

    teacher = make_teacher(tmp_path / "teacher")
    cache_teacher.run(CacheConfig(teacher=str(teacher), dataset=str(image_folder), out=tmp_path / "cache",
                                  precision="fp32", workers=0))
    shutil.rmtree(teacher)
    code, out = run_cli("sweep", "--cache", tmp_path / "cache", "--temperature", "1,4", "--epochs", "1", "--seeds", "0",
                        "--out", tmp_path / "sw", *TINY)
    assert code == 0, out
    assert len(list((tmp_path / "sw" / "runs").glob("*/run.json"))) == 2


@pytest.mark.slow
def test_two_workers_started_at_once_run_every_point_exactly_once(cache_dir, tmp_path):
    args = ["sweep", "--cache", cache_dir, "--temperature", "2,5", "--alpha", "0.25,0.75", "--epochs", "1",
            "--seeds", "0,1", "--out", tmp_path / "sw", *TINY]
    workers = [spawn_kdpipe(*args, cwd=tmp_path) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    _, done = _trials(tmp_path / "sw")
    points = [t.user_attrs["point"] for t in done]
    assert sorted(points) == sorted(set(points)) and len(points) == 8  # every point, once
    for run in (tmp_path / "sw" / "runs").iterdir():  # no run folder was trained twice
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("when", ["mid-trial", "as a trial finishes"])
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(run_cli, cache_dir, tmp_path, when):
    sw = tmp_path / "sw"
    args = ["sweep", "--cache", cache_dir, "--alpha", "0,0.5", "--epochs", "3", "--seeds", "0,1", "--out", sw, *TINY]
    worker = spawn_kdpipe(*args, cwd=tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline:  # mid-trial: one trial done, another's checkpoint exists but not its run.json
        finished = list(sw.glob("runs/*/run.json"))
        midway = [p for p in sw.glob("runs/*/checkpoint.pt") if not (p.parent / "run.json").exists()]
        if finished and (midway or when == "as a trial finishes"):
            break
        time.sleep(0.002)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in sw.glob("runs/*/run.json")}
    assert finished and len(finished) < 4, "the sweep finished before it could be killed"
    code, out = run_cli(*args)
    assert code == 0, out
    trials, done = _trials(sw)
    assert sorted(t.user_attrs["point"] for t in done) == sorted(f"a{a}-seed{s}" for a in (0, 0.5) for s in (0, 1))
    failed = [t.user_attrs.get("failed") for t in trials if t.state.name == "FAIL"]
    assert failed == ["worker died"] if when == "mid-trial" else failed in ([], ["worker died"])
    for name, mtime in finished.items():  # finished trials were not rerun
        assert (sw / "runs" / name / "run.json").stat().st_mtime_ns == mtime
    for run in (sw / "runs").iterdir():  # the killed trial continued from its checkpoint: 3 epochs, once each
        assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_median_pruning_stops_hopeless_trials(cache_dir, tmp_path):
    from kdpipe.config import TrainConfig

    train = TrainConfig(cache=cache_dir, epochs=4, precise_bn=True, alpha=0.0, precision="fp32", device="cpu",
                        student_config={"image_size": 32, "depth_multiplier": 0.35, "classifier_dropout_prob": 0.0})
    cfg = SweepConfig(train=train, space={"lr": "3e-3,1e-9"}, seeds=[0, 1, 2], prune="median", out=tmp_path / "sw")
    sweep.run(cfg)
    s = sweep_report.build(tmp_path / "sw")
    assert s.counts.get("pruned", 0) >= 1 and s.epochs["run"] < s.epochs["planned"] == 24
    assert s.best.params == {"lr": 3e-3} and s.counts["complete"] + s.counts["pruned"] == 6


def test_tpe_samples_the_requested_number_of_configs(cache_dir, tmp_path):
    from kdpipe.config import TrainConfig

    train = TrainConfig(cache=cache_dir, epochs=1, precision="fp32", device="cpu",
                        student_config={"image_size": 32, "depth_multiplier": 0.35, "classifier_dropout_prob": 0.0})
    cfg = SweepConfig(train=train, space={"lr": "1e-4:1e-2:log", "temperature": "1,5"}, seeds=[0, 1],
                      sampler="tpe", trials=3, out=tmp_path / "sw")
    sweep.run(cfg)
    s = sweep_report.build(tmp_path / "sw")
    assert s.counts == {"complete": 3} and all(len(r.seeds) == 2 for r in s.rows)
    assert all(1e-4 <= r.params["lr"] <= 1e-2 and r.params["temperature"] in (1.0, 5.0) for r in s.rows)
    sweep.run(cfg)  # rerun: the budget is spent, nothing new starts
    assert sweep_report.build(tmp_path / "sw", write=False).counts == {"complete": 3}


@pytest.mark.parametrize("flags, message", [
    (["--lr", ""], "--lr: empty search space"),
    (["--lr", "a,b"], "--lr: cannot read 'a,b'"),
    (["--lr", "1e-5:1e-2:log"], "ranges need --sampler tpe"),
    (["--temperature", "2,2"], "repeated value"),
    (["--alpha", "0.5,1.5"], "--alpha must be in [0, 1]"),
    (["--sampler", "tpe", "--lr", "1e-5:1e-2"], "needs --trials"),
    (["--seeds", "0,x"], "--seeds: expected integers"),
    (["--prune", "sometimes"], "--prune must be one of"),
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "--storage postgresql://nobody@127.0.0.1:1/none: "),  # tests/unit/test_sweep_storage.py
])
def test_bad_search_spaces_and_storages_get_one_line_errors(run_cli, cache_dir, tmp_path, flags, message):
    code, out = run_cli("sweep", "--cache", cache_dir, "--epochs", "1", "--out", tmp_path / "sw", *flags)
    assert code == 1 and message in out and "Traceback" not in out, out


def test_a_misspelt_student_field_is_refused_before_the_sweep_folder_exists(run_cli, cache_dir, tmp_path):
    """Checked before any trial: a refusal inside the first trial left a sweep folder whose settings then
    refused the corrected command at the same --out."""
    code, out = run_cli("sweep", "--cache", cache_dir, "--temperature", "2,5", "--epochs", "1", "--seeds", "0",
                        "--out", tmp_path / "sw", "--student-config", "image_size=32,depth_multipler=0.35")
    assert code == 1 and "did you mean depth_multiplier?" in out and "Traceback" not in out, out
    assert not (tmp_path / "sw").exists()


def test_views_and_resolution_are_checked_before_the_sweep_folder_exists(run_cli, cache_dir, tmp_path):
    for flags, message in [(["--views"], "holds no augmented views"),
                           (["--student-config", "image_size=0"], "must be at least 1 pixel")]:
        code, out = run_cli("sweep", "--cache", cache_dir, "--epochs", "1", "--seeds", "0", "--out", tmp_path / "sw",
                            *TINY, *flags)
        assert code == 1 and message in out and "Traceback" not in out, out
        assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("kind, flags, message", [
    ("topk", ["--loss", "kd,dist"], "--loss dist: DIST's intra-class relation"),
    ("mixed", ["--views", "--loss", "kd,dkd"], "--loss dkd needs one target class per example"),
])
def test_a_searched_loss_the_cache_cannot_serve_is_refused_before_the_sweep_folder_exists(
        run_cli, image_folder, teacher_dir, tmp_path, kind, flags, message):
    """Each value of a searched --loss is checked against the cached targets first: the first trial's refusal
    used to leave a folder that refused the corrected command (e.g. --loss kd alone) at the same --out."""
    from kdpipe import cache_teacher
    from kdpipe.config import CacheConfig
    from kdpipe.views import ViewPolicy

    cache = tmp_path / kind
    extra = {"topk": 2} if kind == "topk" else {"views": 2, "augment": ViewPolicy(mixup=1.0)}
    cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), out=cache, precision="fp32",
                                  workers=0, batch_size=16, **extra))
    code, out = run_cli("sweep", "--cache", cache, "--epochs", "1", "--seeds", "0", "--out", tmp_path / "sw",
                        *flags, *TINY)
    assert code == 1 and message in out and "Traceback" not in out, out
    assert not (tmp_path / "sw").exists()
    flags[flags.index("--loss") + 1] = "kd"  # the corrected command starts at the same --out
    code, out = run_cli("sweep", "--cache", cache, "--epochs", "1", "--seeds", "0", "--out", tmp_path / "sw",
                        *flags, *TINY)
    assert code == 0, out


def test_a_trial_refused_inside_the_sweep_is_failed_and_rerun_once_the_data_is_fixed(run_cli, cache_dir, image_folder,
                                                                                    tmp_path):
    """What only a run can see (an image changed since the cache) fails its trial, not the sweep folder: the same
    command after the fix starts that trial again."""
    from PIL import Image

    data = shutil.copytree(image_folder, tmp_path / "data")
    changed = data / "train" / "healthy" / "healthy_0.png"
    Image.open(changed).rotate(90).save(changed)
    args = ["sweep", "--cache", cache_dir, "--dataset", data, "--temperature", "2", "--epochs", "1", "--seeds", "0",
            "--out", tmp_path / "sw", *TINY]
    code, out = run_cli(*args)
    assert code == 1 and "--allow-changed-data" in out and "Traceback" not in out, out
    trials, done = _trials(tmp_path / "sw")
    assert [t.state.name for t in trials] == ["FAIL"] and done == []
    shutil.copy(image_folder / "train" / "healthy" / "healthy_0.png", changed)  # the fix
    code, out = run_cli(*args)
    assert code == 0, out
    trials, done = _trials(tmp_path / "sw")
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and len(done) == 1


def test_a_cache_that_does_not_match_the_dataset_is_refused(run_cli, cache_dir, tmp_path):
    other = make_image_folder(tmp_path / "other", per_class={"train": 2, "validation": 1, "test": 1})
    for split in ("train", "validation", "test"):
        (other / split / "healthy").rename(other / split / "sick")
    code, out = run_cli("sweep", "--cache", cache_dir, "--dataset", other, "--temperature", "2,5", "--epochs", "1",
                        "--seeds", "0", "--out", tmp_path / "sw", *TINY)
    assert code == 1 and "has labels" in out and "Traceback" not in out, out
    assert not (tmp_path / "sw").exists()  # refused before the folder: a corrected command may use the same --out


def test_joining_a_sweep_with_other_settings_is_refused(run_cli, cache_dir, tmp_path):
    base = ["sweep", "--cache", cache_dir, "--epochs", "1", "--seeds", "0", "--out", tmp_path / "sw", *TINY]
    assert run_cli(*base, "--temperature", "2,5")[0] == 0
    code, out = run_cli(*base, "--temperature", "2,6")
    assert code == 1 and "other settings (space)" in out, out
    with pytest.raises(KdpipeError, match="no sweep.json"):
        sweep_report.build(tmp_path)


def test_a_sweep_started_before_a_setting_existed_still_resumes(run_cli, cache_dir, tmp_path, monkeypatch):
    base = ["sweep", "--cache", cache_dir, "--epochs", "1", "--seeds", "0", "--out", tmp_path / "sw", *TINY,
            "--temperature", "2,5"]
    spec = SweepConfig.spec

    def older_spec(self):  # what a kdpipe without the other losses wrote into sweep.json and the study
        out = spec(self)
        out["train"] = {k: v for k, v in out["train"].items() if k not in ("loss", "dkd_beta")}
        return out

    monkeypatch.setattr(SweepConfig, "spec", older_spec)
    assert run_cli(*base)[0] == 0
    monkeypatch.undo()
    assert "dkd_beta" not in json.loads((tmp_path / "sw" / "sweep.json").read_text())["spec"]["train"]
    code, out = run_cli(*base)
    assert code == 0 and "other settings" not in out, out
    code, out = run_cli(*base[:-2], "--temperature", "2,5", "--dkd-beta", "2")  # a real change is still refused
    assert code == 1 and "other settings (train)" in out, out


@pytest.mark.parametrize("space, fixed_alpha, configs", [
    ({"temperature": "2,5", "alpha": "0,0.5"}, 0.5, ["T2-a0.5", "T5-a0.5", "a0"]),  # λ = 0 once, not once per T
    ({"temperature": "2,5", "lr": "1e-3,3e-3"}, 0.0, ["lr0.001", "lr0.003"]),  # --alpha 0 fixed: T is moot
    ({"temperature": "2,5", "alpha": "0.25,0.5"}, 0.5, ["T2-a0.25", "T2-a0.5", "T5-a0.25", "T5-a0.5"]),
])
def test_the_grid_runs_alpha_zero_once_per_setting_of_the_rest(space, fixed_alpha, configs, tmp_path):
    from tests.helpers import tiny_train_config

    cfg = SweepConfig(train=tiny_train_config(cache=tmp_path, alpha=fixed_alpha), space=space, seeds=[0, 1])
    points = list(sweep.grid_points(cfg))
    assert sorted({p.config_key for p in points}) == configs
    assert len(points) == 2 * len(configs) == cfg.grid_trials and len({p.key for p in points}) == len(points)


def test_the_teacher_gain_is_the_best_distilled_config_minus_its_alpha_zero_twin(run_cli, cache_dir, tmp_path):
    sw = tmp_path / "sw"
    code, out = run_cli("sweep", "--cache", cache_dir, "--temperature", "2,5", "--alpha", "0,0.5", "--epochs", "2",
                        "--seeds", "0,1,2", "--out", sw, *TINY)
    assert code == 0, out
    runs = {p.name for p in (sw / "runs").iterdir()}
    assert runs == {f"{c}-seed{s}" for c in ("T2-a0.5", "T5-a0.5", "a0") for s in (0, 1, 2)}
    result = json.loads((sw / "results.json").read_text())
    gain = result["teacher_gain"]
    distilled = next(c["config"] for c in result["configs"] if c["params"].get("alpha", 0) > 0)  # best first
    assert (gain["distilled"], gain["twin"]) == (distilled, "a0")
    for split in ("validation", "test"):  # recomputed from the run folders' own results
        acc = {c: [json.loads((sw / "runs" / f"{c}-seed{s}" / "run.json").read_text())[split]["accuracy"]
                   for s in (0, 1, 2)] for c in (distilled, "a0")}
        diffs = [a - b for a, b in zip(acc[distilled], acc["a0"])]
        assert gain[split]["gap"] == pytest.approx(sum(diffs) / 3)
        assert gain[split]["paired"]["gap"] == pytest.approx(sum(diffs) / 3) and gain[split]["paired"]["seeds"] == 3
        assert gain[split]["seeds"] == [3, 3] and gain[split]["welch95"] is not None
    assert f"teacher's gain, {distilled} − its λ = 0 twin a0: validation" in " ".join(out.split())
    assert (sw / "heatmap.png").exists()  # the α = 0 row fills every T column


def test_the_teacher_gain_pairs_the_twin_with_the_same_other_settings():
    def row(key, params, val):
        return sweep_report.ConfigRow(key, params, [0, 1, 2], val, 0)

    val = {"T5-a0.5-lr0.001": [0.90, 0.92, 0.95], "T2-a0.5-lr0.001": [0.80, 0.81, 0.82],
           "a0-lr0.001": [0.88, 0.91, 0.90], "a0-lr0.003": [0.99, 0.99, 0.99]}
    params = {"T5-a0.5-lr0.001": {"temperature": 5.0, "alpha": 0.5, "lr": 1e-3},
              "T2-a0.5-lr0.001": {"temperature": 2.0, "alpha": 0.5, "lr": 1e-3},
              "a0-lr0.001": {"alpha": 0.0, "lr": 1e-3}, "a0-lr0.003": {"alpha": 0.0, "lr": 3e-3}}
    rows = sorted((row(k, params[k], v) for k, v in val.items()), key=lambda r: -r.val_mean)
    runs = {k: [{"seed": s, "validation": v[s], "test": v[s] - 0.01 * s} for s in range(3)] for k, v in val.items()}
    gain = sweep_report.teacher_gain(rows, runs)
    assert (gain["distilled"], gain["twin"]) == ("T5-a0.5-lr0.001", "a0-lr0.001")  # not the λ = 0 config that won
    assert gain["validation"]["gap"] == pytest.approx((0.02 + 0.01 + 0.05) / 3)
    assert gain["validation"]["welch95"] == pytest.approx(welch(val["T5-a0.5-lr0.001"], val["a0-lr0.001"])[1])
    sd = statistics.stdev([0.02, 0.01, 0.05])  # the per-seed differences
    assert gain["validation"]["paired"]["ci95"] == pytest.approx(4.30265 * sd / 3 ** 0.5, rel=1e-4)
    assert "test" not in gain  # a λ = 0 config was chosen: the distilled one's test is not read
    chosen = sweep_report.teacher_gain([r for r in rows if r.key != "a0-lr0.003"], runs)
    assert chosen["test"]["gap"] == pytest.approx(gain["validation"]["gap"])  # the same shift in both arms
    assert sweep_report.teacher_gain([r for r in rows if r.key != "a0-lr0.001"], runs) is None  # no twin


def test_a_sweep_over_losses_reports_each_loss_against_the_same_twin(run_cli, cache_dir, tmp_path):
    code, out = run_cli("sweep", "--cache", cache_dir, "--loss", "kd,dist", "--alpha", "0,0.5", "--epochs", "1",
                        "--seeds", "0", "--out", tmp_path / "sw", *TINY)
    assert code == 0, out
    result = json.loads((tmp_path / "sw" / "results.json").read_text())
    gains = result["loss_gains"]
    assert set(gains) == {"kd", "dist"} and {g["twin"] for g in gains.values()} == {"a0"}
    assert all("test" in g and "validation" in g for g in gains.values())  # each loss's chosen config, on test too
    text = " ".join(out.split())
    for loss in ("kd", "dist"):
        assert f"--loss {loss}, its best config chosen on validation, {gains[loss]['distilled']} − its λ = 0 twin a0" \
            in text, out


def test_a_switch_is_searched_with_true_false(run_cli, cache_dir, tmp_path):
    code, out = run_cli("sweep", "--cache", cache_dir, "--standardize", "true,false", "--epochs", "1", "--seeds", "0",
                        "--out", tmp_path / "sw", *TINY)
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "sw" / "runs").iterdir()) == ["ls0-seed0", "ls1-seed0"]


def test_a_cache_without_the_train_split_is_refused_before_the_sweep_folder_exists(run_cli, image_folder, teacher_dir,
                                                                                   tmp_path):
    from kdpipe import cache_teacher
    from kdpipe.config import CacheConfig

    cache = tmp_path / "c"
    cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), out=cache, splits=["validation"],
                                  precision="fp32", workers=0))
    code, out = run_cli("sweep", "--cache", cache, "--dataset", image_folder, "--alpha", "0,0.5", "--epochs", "1",
                        "--seeds", "0", "--out", tmp_path / "sw", *TINY)
    assert code == 1 and "has no 'train' split; cache it or use --alpha 0" in out, out
    assert not (tmp_path / "sw").exists()


def test_a_sweep_whose_cache_was_rebuilt_in_place_is_not_resumed(run_cli, image_folder, teacher_dir, tmp_path):
    """Rerunning a sweep resumes it; after `cache-teacher --force` with another teacher at the same path, the
    finished trials (old teacher) would have mixed with new ones (new teacher) under one table."""
    from tests.helpers import make_teacher
    from kdpipe import cache_teacher
    from kdpipe.config import CacheConfig

    cache = tmp_path / "c"
    make = lambda teacher, **kw: cache_teacher.run(CacheConfig(teacher=str(teacher), dataset=str(image_folder),  # noqa: E731
                                                               out=cache, precision="fp32", workers=0, **kw))
    make(teacher_dir)
    args = ["sweep", "--cache", cache, "--temperature", "2", "--epochs", "1", "--seeds", "0", "--out", tmp_path / "sw",
            *TINY]
    assert run_cli(*args)[0] == 0
    assert run_cli(*args)[0] == 0  # the same inputs: resumed (nothing left to run)
    make(make_teacher(tmp_path / "other", seed=1), force=True)
    code, out = run_cli(*args)
    assert code == 1 and "was started on other inputs" in out and "Traceback" not in out, out


def test_the_check_before_the_folder_reads_the_cache_and_dataset_the_trials_then_reuse(cache_dir, tmp_path, monkeypatch):
    """The sweep's up-front check opens the cache and the dataset (and hashes every image) once; its trials reuse
    that, rather than each worker reading and hashing them again (for ImageNet, gigabytes of logits and images)."""
    from kdpipe import student_data
    from kdpipe.config import TrainConfig

    calls = []
    opened = student_data.open_source
    monkeypatch.setattr(student_data, "open_source", lambda cfg: calls.append(cfg) or opened(cfg))
    cfg = SweepConfig(train=TrainConfig(cache=cache_dir, epochs=1, precision="fp32", device="cpu",
                                        student_config={"image_size": 32, "depth_multiplier": 0.35}),
                      space={"temperature": "2,5"}, seeds=[0], out=tmp_path / "sw")
    sweep.run(cfg)
    assert len(calls) == 1 and len(list((tmp_path / "sw" / "runs").iterdir())) == 2


def test_a_damaged_sweep_json_is_one_line_for_the_report_and_the_rerun(run_cli, cache_dir, tmp_path):
    args = ["--cache", cache_dir, "--temperature", "2", "--epochs", "1", "--seeds", "0", "--out", tmp_path / "sw", *TINY]
    assert run_cli("sweep", *args)[0] == 0
    (tmp_path / "sw" / "sweep.json").write_text('{"study_name": "sw", "stor')  # cut short
    for argv in (["sweep-report", tmp_path / "sw"], ["sweep", *args]):
        code, out = run_cli(*argv)
        assert code == 1 and "sweep.json is damaged (JSONDecodeError" in out and "Traceback" not in out, out


def test_a_sweep_started_before_recipes_resumes_with_its_defaults(run_cli, cache_dir, tmp_path, monkeypatch):
    base = ["sweep", "--cache", cache_dir, "--epochs", "1", "--seeds", "0", "--out", tmp_path / "sw",
            "--student-config", TINY_STUDENT, "--precision", "fp32", "--device", "cpu", "--temperature", "2,5"]
    spec = SweepConfig.spec

    def older_spec(self):  # what a kdpipe without recipes wrote: its defaults, no recipe recorded
        out = spec(self)
        out["train"] = {k: v for k, v in out["train"].items() if k not in ("recipe", "from_recipe")}
        return out

    monkeypatch.setattr(SweepConfig, "spec", older_spec)
    assert run_cli(*base, "--recipe", "before-recipes")[0] == 0
    monkeypatch.undo()
    code, out = run_cli(*base)  # the same command as then, today's default recipe
    assert code == 0 and "other settings" not in out and "recipe before-recipes" in out, out
    code, out = run_cli(*base, "--recipe", "guide")  # another recipe's values differ (bn_momentum): refused
    assert code == 1 and "other settings (train)" in out, out
