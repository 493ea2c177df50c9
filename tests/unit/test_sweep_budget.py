"""`kdpipe sweep --hours H`: a worker starts only the trials it can finish in the time it has left."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from tests.helpers import TINY_STUDENT
from kdpipe import runtime, sweep, sweep_budget
from kdpipe.config import SweepConfig

TINY = ["--student-config", TINY_STUDENT, "--lr", "3e-3", "--precision", "fp32", "--device", "cpu"]


def _trials(out: Path) -> list:
    record = sweep.load_spec(out)
    return optuna.load_study(study_name=record["study_name"], storage=sweep.open_storage(None, out)).get_trials()


def test_every_trial_records_its_pace_and_hours_leave_what_does_not_fit(run_cli, cache_dir, tmp_path):
    import torch

    sw = tmp_path / "sw"
    args = ["sweep", "--cache", cache_dir, "--epochs", "2", "--seeds", "0,1,2,3", "--out", sw, *TINY]
    code, out = run_cli(*args, "--hours", "1e-6")  # nothing measured: one trial, to measure it; then none fits
    assert code == 0, out
    assert "--hours 1e-06: no pace measured yet on this kind of machine" in out and "running one trial to measure it" in out
    assert "nothing to start fits (base-seed1 needs about" in out
    assert "left for later: 3 trials (base-seed1, base-seed2, base-seed3); rerun the same command" in out
    done = [t for t in _trials(sw) if t.state == TrialState.COMPLETE]
    assert [t.user_attrs["point"] for t in done] == ["base-seed0"]
    pace = done[0].user_attrs["pace"]
    assert pace["machine"] == {"device": runtime.cpu_model(), "precision": "fp32", "threads": torch.get_num_threads()}
    epochs = [json.loads(line)["epoch_time_s"] for line in (sw / "runs/base-seed0/metrics.jsonl").read_text().splitlines()]
    assert pace["epochs"] == 2 and pace["seconds_per_epoch"] == pytest.approx(sum(epochs) / 2)
    assert pace["outside_epochs_s"] > 0  # loading, the test pass and saving took some time too

    code, out = run_cli(*args, "--hours", "1e-6")  # a pace is known now: not even one trial starts
    assert code == 0 and "no pace measured" not in out and "left for later: 3 trials" in out, out
    assert len([t for t in _trials(sw) if t.state == TrialState.COMPLETE]) == 1
    code, out = run_cli(*args)  # without --hours: the rest
    assert code == 0 and "left for later" not in out, out
    done = [t for t in _trials(sw) if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["point"] for t in done) == [f"base-seed{s}" for s in range(4)]
    assert all(t.user_attrs["pace"]["seconds_per_epoch"] > 0 for t in done)


def _study_with(paces: dict[str, float], machine: dict) -> SimpleNamespace:
    """A stand-in study whose finished trials ran each config at the given seconds per epoch on `machine`."""
    trials = [SimpleNamespace(user_attrs={"config": config, "pace": {"machine": machine, "seconds_per_epoch": spe,
                                                                     "outside_epochs_s": 60.0, "epochs": 30}})
              for config, spe in paces.items()]
    return SimpleNamespace(get_trials=lambda deepcopy, states: trials)


def test_a_trial_is_judged_by_its_own_config_on_this_kind_of_machine_and_its_epochs_left(tmp_path):
    cfg = SweepConfig.from_flags({"alpha": "0.25,0.5,0.75", "epochs": "30", "cache": "cache", "precision": "fp32",
                                  "device": "cpu"}, seeds=[0, 1], out=tmp_path / "sw", hours=1.0)
    budget = sweep_budget.Budget(cfg)
    here = budget.machine()
    other = {**here, "threads": here["threads"] + 7}
    points = {p.key: p for p in sweep.grid_points(cfg)}
    # 30 epochs: a0.25 at 100 s/epoch needs 3060 s (fits in 3600); a0.5 at 150 s/epoch needs 4560 s (does not);
    # measured faster elsewhere (1 s/epoch with other threads) counts for nothing here
    study = _study_with({"a0.25": 100.0, "a0.5": 150.0}, here)
    study.get_trials(True, None).append(SimpleNamespace(user_attrs={"config": "a0.5", "pace": {
        "machine": other, "seconds_per_epoch": 1.0, "outside_epochs_s": 0.0, "epochs": 30}}))
    assert [p.key for p in budget.fitting(study, list(points.values()))] == ["a0.25-seed0", "a0.25-seed1"]
    # a0.75, never measured, is judged by the slowest config measured here (150 s/epoch): does not fit
    assert not budget.allows(study, points["a0.75-seed0"])
    # a dead worker's a0.5 run with 10 of its 30 epochs done: 20 x 150 + 60 = 3060 s, which fits
    run = tmp_path / "sw" / "runs" / "a0.5-seed1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "epoch_time_s": 150}) + "\n" for e in range(1, 11)))
    assert budget.allows(study, points["a0.5-seed1"]) and not budget.allows(study, points["a0.5-seed0"])


def test_without_hours_every_point_is_started(tmp_path):
    cfg = SweepConfig.from_flags({"alpha": "0.25,0.5", "cache": "cache"}, seeds=[0], out=tmp_path / "sw")
    points = list(sweep.grid_points(cfg))
    budget = sweep_budget.Budget(cfg)
    assert budget.fitting(_study_with({}, {}), iter(points)) == points
    assert budget.fitting(_study_with({}, {}), iter(points), want=1) == points[:1]



def test_fitting_reads_the_points_only_as_far_as_it_must(tmp_path):
    """A worker offers the first few points that fit: the grid is read up to them, not to its end; when nothing
    fits, every point is counted (not held) for the line that says what was left."""
    cfg = SweepConfig.from_flags({"alpha": "0.25,0.5,0.75", "epochs": "30", "cache": "cache", "precision": "fp32",
                                  "device": "cpu"}, seeds=list(range(4)), out=tmp_path / "sw", hours=1.0)
    said = []
    budget = sweep_budget.Budget(cfg, said.append)
    study = _study_with({"a0.25": 100.0, "a0.5": 150.0, "a0.75": 150.0}, budget.machine())
    read = []

    def points(keep=lambda p: True):
        for p in sweep.grid_points(cfg):
            if keep(p):
                read.append(p.key)
                yield p

    assert [p.key for p in budget.fitting(study, points(), want=2)] == ["a0.25-seed0", "a0.25-seed1"]
    assert read == ["a0.25-seed0", "a0.25-seed1"]
    assert budget.fitting(study, points(lambda p: p.params["alpha"] != 0.25), want=2) == []
    assert len(said) == 1 and said[0].startswith("--hours 1: ")
    assert said[0].split(" left and ")[1] == ("nothing to start fits (a0.5-seed0 needs about 1.27 h at 150.0 s "
                    f"per epoch on {sweep_budget.describe(budget.machine())}); left for later: 8 trials (a0.5-seed0, "
                    "a0.5-seed1, a0.5-seed2, a0.5-seed3, a0.75-seed0, a0.75-seed1 and 2 more); rerun the same "
                    "command, here or on another machine, to run them")

def test_hours_must_be_positive():
    from kdpipe.errors import KdpipeError

    with pytest.raises(KdpipeError, match="--hours must be > 0"):
        SweepConfig.from_flags({"cache": "cache"}, hours=0.0)
