"""`kdpipe sweep --plan FILE` on tiny data: named arms with their own caches, budgets, seeds, twins, a primary
comparison; the study records its plan by content, gains points as dated amendments and refuses to change a
finished one; an earlier study's run records are imported as finished trials; sweep-report draws the curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_STUDENT
from kdpipe import plan as plans, stats, study_report, sweep, sweep_report
from kdpipe.errors import KdpipeError

TINY = 'student_config = { image_size = 32, depth_multiplier = 0.35, classifier_dropout_prob = 0.0 }\n' \
       'lr = 3e-3\nbatch_size = 8\nprecision = "fp32"\ndevice = "cpu"\n'


def write_plan(folder: Path, cache: Path, seeds="[0, 1]", budgets="[1, 2]", extra: str = "",
               primary: str = 'arm = "kd"\nagainst = "kd-twin"\nbudget = 2\n') -> Path:
    """A plan with a distilled arm and its lambda = 0 twin on the tiny cache."""
    path = folder / "plan.toml"
    path.write_text(f'name = "tiny"\nseeds = {seeds}\nbudgets = {budgets}\n\n[settings]\n{TINY}\n'
                    f'[arms.kd]\ncache = "{cache}"\nalpha = 0.5\ntemperature = 2\ntwin = "kd-twin"\n\n'
                    f'[arms.kd-twin]\ncache = "{cache}"\nalpha = 0.0\n\n{extra}\n[primary]\n{primary}')
    return path


def study_of(out: Path):
    record, study = sweep_report.open_study(out)
    return study


def test_a_plan_runs_every_arm_at_every_budget_and_seed_and_reports_the_curve(run_cli, cache_dir, tmp_path):
    plan = write_plan(tmp_path, cache_dir, extra='[[comparisons]]\narm = "kd"\nagainst = "kd-twin"\nbudget = 2\n'
                                                 'rule = "first"\n')
    code, out = run_cli("sweep", "--plan", plan, "--out", tmp_path / "st")
    assert code == 0, out
    runs = sorted(p.name for p in (tmp_path / "st" / "runs").iterdir())
    assert runs == sorted(f"{arm}-e{e}-seed{s}" for arm in ("kd", "kd-twin") for e in (1, 2) for s in (0, 1))
    for name in runs:  # each run is the arm's settings at its budget and seed
        saved = json.loads((tmp_path / "st" / "runs" / name / "run.json").read_text())["config"]
        arm, e, s = name.rsplit("-e", 1)[0], int(name.split("-e")[-1].split("-")[0]), int(name[-1])
        assert (saved["alpha"], saved["epochs"], saved["seed"]) == (0.5 if arm == "kd" else 0.0, e, s)
    result = json.loads((tmp_path / "st" / "results.json").read_text())
    assert [(a["arm"], a["budget"], a["seeds"]) for a in result["arms"]] == \
        [("kd", 1, [0, 1]), ("kd-twin", 1, [0, 1]), ("kd", 2, [0, 1]), ("kd-twin", 2, [0, 1])]
    per_run = json.loads((tmp_path / "st" / "runs" / "kd-e2-seed1" / "run.json").read_text())["test"]["accuracy"]
    assert result["arms"][2]["test"]["per_seed"]["1"] == per_run  # the table is the runs' own results
    assert result["plan"]["twins"] == {"kd": "kd-twin", "kd-twin": None} and result["amendments"] == []
    assert set(result["teacher"]) == {"validation", "test"}
    assert (tmp_path / "st" / "curve.png").stat().st_size > 1000 and (tmp_path / "st" / "results.md").exists()
    assert "test % (mean ± SD)" in out
    primary = next(c for c in result["comparisons"] if c["primary"])
    test = {arm: {s: json.loads((tmp_path / "st" / "runs" / f"{arm}-e2-seed{s}" / "run.json").read_text())["test"]
                  ["accuracy"] for s in (0, 1)} for arm in ("kd", "kd-twin")}
    diffs = [test["kd"][s] - test["kd-twin"][s] for s in (0, 1)]
    assert primary["key"] == "kd - kd-twin @ E2 test" and primary["diffs"] == diffs
    assert primary["sign_flip_p"] == stats.sign_flip_p(diffs, "greater")
    if diffs[0] != diffs[1]:  # a spread: the t interval and p
        assert primary["t95"]["low"] < primary["t95"]["mean"] < primary["t95"]["high"]
        assert primary["p"] == stats.paired_t_p(diffs, "greater")
    boot = primary["bootstrap95"]  # every run kept its predictions: the interval over seeds and images
    assert boot["low"] <= boot["mean"] <= boot["high"] and "2 seeds x" in boot["method"]
    assert boot["mean"] == pytest.approx(sum(diffs) / 2)  # the same difference, from the per-image predictions
    first = next(c for c in result["comparisons"] if c["rule"] == "first")
    rules = {arm: {s: json.loads((tmp_path / "st" / "runs" / f"{arm}-e2-seed{s}" / "run.json").read_text())
                   ["best_epoch_rule"] for s in (0, 1)} for arm in ("kd", "kd-twin")}
    at_first = {arm: {s: test[arm][s] if r["rule"] == "first" or r["other_rule_epoch"] == r["epoch"]
                      else r["test_at_other_rule_epoch"]["accuracy"] for s, r in by.items()} for arm, by in rules.items()}
    assert first["diffs"] == [at_first["kd"][s] - at_first["kd-twin"][s] for s in (0, 1)]
    assert [c["key"] for c in result["comparisons"]] == ["kd - kd-twin @ E2 test", "kd - kd-twin @ E2 test (first-tie epochs)",
                                                          "kd - kd-twin @ E1 test"]
    assert all(c["holm_p"] >= c["p"] for c in result["comparisons"])  # Holm over the plan's two comparisons
    assert "exact sign-flip p" in out and "primary" in out
    code, again = run_cli("sweep", "--plan", plan, "--out", tmp_path / "st")  # resuming: nothing left to run
    assert code == 0 and "trial " not in again


def test_a_plan_gains_seeds_as_a_dated_amendment_and_refuses_to_change_a_finished_point(run_cli, cache_dir, tmp_path):
    plan = write_plan(tmp_path, cache_dir, seeds="[0]", budgets="[1]",
                      primary='arm = "kd"\nagainst = "kd-twin"\nbudget = 1\n')
    assert run_cli("sweep", "--plan", plan, "--out", tmp_path / "st")[0] == 0
    write_plan(tmp_path, cache_dir, seeds="[0]", budgets="[1]", primary='arm = "kd"\nagainst = "kd-twin"\nbudget = 1\n',
               extra='[[more_seeds]]\narms = ["kd", "kd-twin"]\nbudgets = [1]\nseeds = [3]\n')
    code, out = run_cli("sweep", "--plan", plan, "--out", tmp_path / "st")
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "st" / "runs").iterdir()) == \
        ["kd-e1-seed0", "kd-e1-seed3", "kd-twin-e1-seed0", "kd-twin-e1-seed3"]
    amendments = json.loads((tmp_path / "st" / "results.json").read_text())["amendments"]
    assert len(amendments) == 1 and amendments[0]["added"] == ["kd at 1 epochs: seed 3", "kd-twin at 1 epochs: seed 3"]
    assert "added kd at 1 epochs: seed 3" in (tmp_path / "st" / "results.md").read_text()
    plan.write_text(plan.read_text().replace("alpha = 0.5", "alpha = 0.7"))  # a finished point would change
    code, out = run_cli("sweep", "--plan", plan, "--out", tmp_path / "st")
    assert code == 1 and "point kd-e1-seed0 has a finished trial and this plan changes alpha" in out
    assert len(out.strip().splitlines()) <= 3 and "Traceback" not in out


def test_flags_beside_a_plan_are_refused(run_cli, cache_dir, tmp_path):
    plan = write_plan(tmp_path, cache_dir)
    code, out = run_cli("sweep", "--plan", plan, "--lr", "1e-3", "--out", tmp_path / "st")
    assert code == 1 and "drop --lr" in out
    code, out = run_cli("sweep", "--plan", plan, "--seeds", "0,1", "--out", tmp_path / "st")
    assert code == 1 and "drop --seeds" in out
    assert not (tmp_path / "st").exists()


@pytest.mark.parametrize("old, new, message", [
    ("alpha = 0.5", "alpha = 2", "arms.kd.alpha: --alpha must be in [0, 1] (got 2.0)"),
    ("alpha = 0.5", "alpah = 0.5", "arms.kd.alpah: not a train-student setting"),
    ("temperature = 2", 'temperature = "x"', "arms.kd.temperature: expected a number (got 'x')"),
    ("alpha = 0.5", "alpha = 0.5\nepochs = 3", "arms.kd.epochs: set per point by the plan"),
    ('twin = "kd-twin"', 'twin = "nope"', "arms.kd.twin: no arm named 'nope'"),
    ("budget = 2", "budget = 7", "primary.budget: arm kd does not run at 7 epochs"),
    ("budget = 2", 'budget = 2\ntest = "z"', "primary.test: one of paired-t, sign-flip (got 'z')"),
    ("budget = 2", "budget = 2\nlevel = 5", "primary.level: a test level in (0, 1)"),
    ("seeds = [0, 1]", "seeds = [0, 0]", "seeds: repeated value in [0, 0]"),
    ("alpha = 0.5", "alpha = 0.5\nsearch = { lr = [1e-3] }", "arms.kd.search.lr: a list of two or more values"),
    ("[primary]", "[primary", "not valid TOML"),
])
def test_a_wrong_plan_is_one_line_naming_the_file_and_the_field(run_cli, cache_dir, tmp_path, old, new, message):
    plan = write_plan(tmp_path, cache_dir)
    plan.write_text(plan.read_text().replace(old, new, 1))
    code, out = run_cli("sweep", "--plan", plan, "--out", tmp_path / "st")
    assert code == 1 and f"{plan}: " in out.replace("\n", "") and message in out.replace("\n", ""), out
    assert "Traceback" not in out and not (tmp_path / "st").exists()


def test_searched_values_and_an_arm_of_its_own_run_as_their_own_points(cache_dir, tmp_path):
    plan = plans.load(write_plan(tmp_path, cache_dir, budgets="[1]", primary='arm = "kd"\nagainst = "kd-twin"\nbudget = 1\n',
                                 extra=f'[arms.dkd]\ncache = "{cache_dir}"\nloss = "dkd"\nalpha = 0.5\nseeds = [5]\n'
                                       'budgets = [1]\ntwin = "kd-twin"\nsearch = { dkd_beta = [1.0, 8.0] }\n'))
    points = plan.points()
    assert sorted(points) == ["dkd-e1-b1-seed5", "dkd-e1-b8-seed5", "kd-e1-seed0", "kd-e1-seed1",
                              "kd-twin-e1-seed0", "kd-twin-e1-seed1"]
    assert points["dkd-e1-b8-seed5"].settings["dkd_beta"] == 8.0 and points["dkd-e1-b8-seed5"].settings["loss"] == "dkd"
    assert [c.key for c in plan.comparisons_all()] == ["kd - kd-twin @ E1 test", "dkd - kd-twin @ E1 test"]


def test_an_earlier_studys_records_are_finished_trials_and_are_not_run_again(run_cli, cache_dir, tmp_path):
    records = tmp_path / "records" / "E1"
    records.mkdir(parents=True)
    for arm, acc in (("kd", 0.75), ("kd-twin", 0.5)):  # as the patience study wrote them
        (records / f"{arm}-seed0.json").write_text(json.dumps({
            "arm": arm, "seed": 0, "epochs": 1, "size": 32, "run_dir": f"gone/{arm}", "best_epoch": 1,
            "validation": {"accuracy": acc, "n": 8}, "test": {"accuracy": acc - 0.25, "n": 8},
            "validation_accuracy_per_epoch": [acc], "wall_time_s": 10.0}))
    plan = write_plan(tmp_path, cache_dir, seeds="[0, 1]", budgets="[1]", extra='imported = "records"\n',
                      primary='arm = "kd"\nagainst = "kd-twin"\nbudget = 1\n')
    plan.write_text('imported = "records"\n' + plan.read_text().replace('imported = "records"\n', ""))
    code, out = run_cli("sweep", "--plan", plan, "--out", tmp_path / "st")
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "st" / "runs").iterdir()) == ["kd-e1-seed1", "kd-twin-e1-seed1"]
    arms = json.loads((tmp_path / "st" / "results.json").read_text())["arms"]
    assert arms[0]["test"]["per_seed"]["0"] == 0.5 and arms[0]["imported"] == [0] and arms[1]["imported"] == [0]
    code, _ = run_cli("sweep", "--plan", plan, "--out", tmp_path / "st")  # a rerun imports nothing twice
    assert code == 0
    assert len([t for t in study_of(tmp_path / "st").get_trials() if t.user_attrs.get("imported")]) == 2
    (records / "kd-seed0.json").write_text((records / "kd-seed0.json").read_text().replace('"size": 32', '"size": 64'))
    with pytest.raises(KdpipeError, match="not of point kd-e1-seed0"):
        sweep.run_plan(plans.load(plan), tmp_path / "other")


def test_a_plan_can_express_a_confirmatory_replication(tmp_path):
    """Issue 62's plan: the recipe and its twin on two caches, seeds 6-11, E = 300, the primary comparison a
    one-sided paired t at 0.05 (the sign-flip p beside it), the first-tie rule's result as a secondary."""
    for name in ("plain", "mixed"):
        (tmp_path / name).mkdir()
    path = tmp_path / "replication.toml"
    path.write_text('seeds = [6, 7, 8, 9, 10, 11]\nbudgets = [300]\n[settings]\nviews = true\nlr = 3e-3\n'
                    'batch_size = 32\nschedule = "cosine"\nwarmup_ratio = 0.05\nweight_decay = 0.05\n'
                    'student_config = { classifier_dropout_prob = 0.2, image_size = 160 }\n'
                    '[arms.recipe]\ncache = "plain"\nalpha = 0.9\ntemperature = 5.0\ntwin = "recipe-twin"\n'
                    '[arms.recipe-twin]\ncache = "plain"\nalpha = 0.0\n'
                    '[primary]\narm = "recipe"\nagainst = "recipe-twin"\nbudget = 300\ntest = "paired-t"\n'
                    'alternative = "greater"\nlevel = 0.05\nnote = "confirmed if p < 0.05"\n'
                    '[[comparisons]]\narm = "recipe"\nagainst = "recipe-twin"\nbudget = 300\nrule = "first"\n')
    plan = plans.load(path)
    assert len(plan.points()) == 12 and plan.primary.test == "paired-t" and plan.primary.level == 0.05
    assert [c.rule for c in plan.comparisons_all()] == [None, "first"]
    assert plan.arms["recipe"].train(300, plan.base).cache == tmp_path / "plain"


def arm_point(name: str, validation: dict[int, float]) -> "study_report.ArmPoint":
    return study_report.ArmPoint(name, 300, f"{name}-e300", {}, {s: {"seed": s, "validation": v} for s, v in
                                                                 validation.items()})


def test_validation_that_cannot_separate_the_best_arms_names_no_winner():
    saturated = [arm_point("fm", {0: 1.0, 1: 1.0, 2: 1.0}), arm_point("recipe", {0: 1.0, 1: 0.992, 2: 1.0}),
                 arm_point("twin", {0: 0.95, 1: 0.94, 2: 0.96})]
    best = study_report.best_arms(saturated)  # fm - recipe: +0.27 pp, its paired SE 0.27 pp: within it
    assert best["best"] == "fm-e300" and [t["arm"] for t in best["not_separated"]] == ["recipe-e300"]
    summary = study_report.StudySummary(None, "s", {}, [], saturated, {}, {}, best=best)
    assert "cannot separate the best arms" in study_report.best_lines(summary)[0]
    apart = study_report.best_arms([saturated[0], saturated[2]])
    assert apart["not_separated"] == []
    summary.best = apart
    assert study_report.best_lines(summary)[0].startswith("Chosen on validation: fm-e300")


def test_the_patience_plan_imports_every_record_of_the_study_and_repeats_no_run(tmp_path):
    """benchmarks/plans/patience.toml against the committed records (no caches opened, nothing trained): every
    point of the plan has its record and every record is a point; the report pairs them as the write-ups do."""
    import optuna

    plan = plans.load(REPO / "benchmarks" / "plans" / "patience.toml")
    points = plan.points()
    records = sorted((REPO / "benchmarks" / "results" / "patience").glob("E*/*.json"))
    assert sorted(f"{r.stem.rsplit('-seed', 1)[0]}-e{r.parent.name[1:]}-seed{r.stem.rsplit('-seed', 1)[1]}"
                  for r in records) == sorted(points)
    study = optuna.create_study(study_name="patience", direction="maximize")
    sweep.record_plan(study, plan, points)
    assert len(sweep.import_records(study, plan, points)) == len(points) == 51
    assert sweep.import_records(study, plan, points) == []  # a second look imports nothing twice
    summary = study_report.build(tmp_path, study, {"complete": 51}, [], write=False)
    primary = next(c for c in summary.comparisons if c["primary"])
    assert primary["seeds"] == [0, 1, 2, 3, 4, 5]
    assert [round(100 * d, 1) for d in primary["diffs"]] == [10.9, 3.9, 3.1, 3.9, 8.6, 1.6]  # README's pairs
    assert primary["sign_flip_p"] == 1 / 64 and primary["bootstrap95"] is None  # 6 of 6 positive; no predictions
    assert [a["at"][:10] for a in summary.amendments] == ["2026-12-01", "2026-12-03", "2026-12-04"]
    assert summary.best["best"] == "fm-e300" and [t["arm"] for t in summary.best["not_separated"]] == ["recipe-e300"]


def test_the_views_plan_is_the_recorded_runs_of_results_sections_3_and_4():
    """benchmarks/plans/views.toml against benchmarks/results/{recipe,views,views16,views0}: the plan's points
    are exactly the recorded runs, setting for setting (the stored views per image read from each run's cache)."""
    keys = ("lr", "batch_size", "epochs", "alpha", "views", "schedule", "warmup_ratio", "weight_decay",
            "student_config", "bn_momentum", "seed")

    def key(settings: dict, stored: int) -> str:
        return json.dumps([settings[k] for k in keys] + [settings["temperature"] if settings["alpha"] else None, stored])

    recorded = []
    for folder in ("recipe", "views", "views16", "views0"):
        for path in (REPO / "benchmarks" / "results" / folder).glob("*-seed*.json"):
            if "cutmix" in path.name or (folder == "views16" and "-e30-" in path.name):
                continue  # one-seed screens, not in the plan (its header says so)
            run = json.loads(path.read_text())["run"]
            recorded.append(key(run["config"], (run["consistency"]["stored_views"] or {}).get("views", 0)))
    plan = plans.load(REPO / "benchmarks" / "plans" / "views.toml")
    planned = [key(p.settings, {"beans-views8": 8, "beans-views16": 16}.get(Path(p.settings["cache"]).name, 0))
               for p in plan.points().values()]
    assert sorted(planned) == sorted(recorded) and len(planned) == 57


def test_the_guide_plan_is_the_guides_setup_under_three_batchnorm_variants():
    plan = plans.load(REPO / "benchmarks" / "plans" / "guide.toml")
    points = plan.points()
    assert len(points) == 18
    guide = points["distilled-upstream-e30-seed0"].settings
    assert (guide["lr"], guide["batch_size"], guide["epochs"], guide["schedule"], guide["alpha"], guide["temperature"],
            guide["bn_momentum"], guide["precise_bn"]) == (5e-5, 8, 30, "linear", 0.5, 5.0, 0.997, False)
    assert points["scratch-precise-e30-seed2"].settings["precise_bn"] is True
    assert {p.settings["bn_momentum"] for p in points.values()} == {0.997, 0.1}


def test_a_dead_workers_point_is_run_again_once(run_cli, cache_dir, tmp_path):
    """The grid's dead-worker recovery serves a plan: a RUNNING trial whose worker's pid is gone is marked FAIL
    and its point runs again, once."""
    import socket
    import subprocess
    import sys

    from optuna.trial import TrialState

    primary = 'arm = "kd"\nagainst = "kd-twin"\nbudget = 1\n'
    plan = write_plan(tmp_path, cache_dir, seeds="[0]", budgets="[1]", primary=primary)
    assert run_cli("sweep", "--plan", plan, "--out", tmp_path / "st")[0] == 0
    write_plan(tmp_path, cache_dir, seeds="[0]", budgets="[1]", primary=primary,
               extra='[[more_seeds]]\narms = ["kd"]\nbudgets = [1]\nseeds = [3]\n')
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    trial = study_of(tmp_path / "st").ask()  # a worker claimed kd-e1-seed3, then died
    for key, value in {"point": "kd-e1-seed3", "config": "kd-e1", "arm": "kd", "budget": 1, "seed": 3, "params": {},
                       "owner": {"host": socket.gethostname(), "pid": int(gone.stdout), "alive_at": 0}}.items():
        trial.set_user_attr(key, value)
    code, out = run_cli("sweep", "--plan", plan, "--out", tmp_path / "st")
    assert code == 0, out
    trials = [t for t in study_of(tmp_path / "st").get_trials() if t.user_attrs.get("point") == "kd-e1-seed3"]
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "FAIL"]
    assert next(t for t in trials if t.state == TrialState.FAIL).user_attrs["failed"] == "worker died"
    assert (tmp_path / "st" / "runs" / "kd-e1-seed3" / "run.json").exists()


def _primary(diffs: list[float], planned: int | None = 6, refute: float | None = 1.5, level: float = 0.05) -> dict:
    """A primary comparison's row as study_report.compare makes it, from its paired differences."""
    return {"primary": True, "key": "recipe - recipe-twin @ E300 test", "test": "paired-t", "level": level,
            "refute_below_pp": refute, "planned_pairs": planned, "pairs": len(diffs),
            "t95": stats.paired_t(diffs, 0.95, "two-sided").to_dict(), "p": stats.paired_t_p(diffs, "greater")}


@pytest.mark.parametrize("diffs, verdict", [
    ([0.05, 0.04, 0.06, 0.03, 0.05, 0.04], "CONFIRMED"),  # +4.5 pp, tight: p < 0.05, interval above 1.5
    ([0.004, 0.006, 0.005, 0.007, 0.005, 0.006], "CONFIRMED, smaller than claimed"),  # real, but below +1.5 pp
    ([-0.02, 0.0, -0.01, 0.01, -0.015, -0.005], "REFUTED"),  # interval entirely below +1.5 pp, p large
    ([0.08, -0.06, 0.02, -0.03, 0.09, -0.05], "INCONCLUSIVE"),  # wide: neither
])
def test_a_confirmatory_plan_decides_by_its_pre_registered_rule(diffs, verdict):
    row = _primary(diffs)
    assert study_report.verdict(row) == verdict
    row["verdict"] = verdict
    line = study_report.verdict_line(row)
    assert line.startswith("Verdict of the primary comparison") and f"**{verdict}**" in line


def test_no_verdict_before_every_planned_pair_nor_for_an_exploratory_plan():
    diffs = [0.05, 0.04, 0.06, 0.03, 0.05]
    assert study_report.verdict(_primary(diffs)) is None  # 5 of 6 pairs: an interim look decides nothing
    assert study_report.verdict_line({**_primary(diffs), "verdict": None}).startswith("No verdict yet: 5 of 6 planned")
    assert study_report.verdict(_primary(diffs + [0.05], refute=None)) is None  # exploratory: no rule stated
    assert study_report.verdict({**_primary(diffs + [0.05]), "primary": False}) is None


def test_the_replication_plan_is_confirmatory_with_six_planned_pairs():
    plan = plans.load(REPO / "benchmarks" / "plans" / "replication.toml")
    assert plan.primary.refute_below_pp == 1.5 and plan.primary.level == 0.05 and plan.primary.alternative == "greater"
    assert plan.pairs(plan.primary) == 6 and plan.record()["comparisons"][0]["planned_pairs"] == 6
    assert [c.refute_below_pp for c in plan.comparisons] == [None]  # the first-tie rule: secondary, no verdict


@pytest.mark.parametrize("value", ["\"1.5\"", "nan", "true"])
def test_refute_below_must_be_a_number_of_points(value, cache_dir, tmp_path):
    with pytest.raises(KdpipeError, match="primary.refute_below_pp: a difference in percentage points"):
        plans.load(write_plan(tmp_path, cache_dir, primary=f'arm = "kd"\nagainst = "kd-twin"\nbudget = 2\n'
                                                             f'refute_below_pp = {value}\n'))


def test_a_plan_file_changed_without_changing_a_point_is_a_dated_amendment_that_says_so(cache_dir, tmp_path):
    import optuna

    path = write_plan(tmp_path, cache_dir)
    study = optuna.create_study(study_name="t", direction="maximize")
    plan = plans.load(path)
    sweep.record_plan(study, plan, plan.points())
    path.write_text(path.read_text().replace("budget = 2\n", "budget = 2\nrefute_below_pp = 1.5\n", 1))
    changed = plans.load(path)
    sweep.record_plan(study, changed, changed.points())
    (amendment,) = study.user_attrs[sweep.AMENDMENTS_ATTR]
    assert amendment["added"] == [] and amendment["dropped"] == [] and amendment["changed_before_their_runs"] == []
    assert amendment["what"] == f"the plan's file changed (sha256 {changed.sha256[:12]}); no point added, changed or dropped"
    summary = study_report.build(tmp_path, study, {}, [], write=False)
    text = study_report.text(summary)
    assert "no point added, changed or dropped" in text and summary.plan["sha256"] == changed.sha256
    assert text.splitlines()[2] == "No verdict yet: 0 of 2 planned pairs have run; the plan decides once all have " \
                                   "(an interim look decides nothing)."  # a confirmatory plan says so first
