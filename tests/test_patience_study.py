"""benchmarks/patience_study.py on tiny generated data (E in {1, 2}, one seed): the plan fixed before the runs,
both view caches, every arm through kdpipe.train_student.run, the summary and the plot, and a rerun that
continues instead of recomputing."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from conftest import REPO, make_image_folder

spec = importlib.util.spec_from_file_location("patience_study", REPO / "benchmarks" / "patience_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


@pytest.fixture
def tiny(tmp_path, teacher_dir):
    folder = make_image_folder(tmp_path / "ds", {"train": 4, "validation": 2, "test": 2})
    return ["--dataset", str(folder), "--teacher", str(teacher_dir), "--results", str(tmp_path / "results"),
            "--work", str(tmp_path / "work"), "--epochs", "1,2", "--seeds", "0", "--sizes", "32",
            "--student-config", "depth_multiplier=0.35", "--batch-size", "8", "--precision", "fp32", "--device", "cpu",
            "--workers", "0"]


def test_the_study_runs_every_arm_at_every_point_and_continues_where_it_stopped(tiny, tmp_path, monkeypatch,
                                                                                 capsys):
    class Stop(Exception):
        pass

    tiny = [*tiny, "--loss-epochs", "2"]  # the other losses' arms at the second point only
    results = tmp_path / "results"
    calls = []
    real = study.train_student.run

    def run(cfg, **kw):
        if len(calls) == 2 and not stopped:  # the study is killed while its third run starts
            stopped.append(True)
            raise Stop
        calls.append(cfg)
        return real(cfg, **kw)

    stopped = []
    monkeypatch.setattr(study.train_student, "run", run)
    with pytest.raises(SystemExit, match="no plan yet"):
        study.main([*tiny, "--status"])
    with pytest.raises(SystemExit, match="nothing to summarise"):
        study.main([*tiny, "--summary"])
    with pytest.raises(Stop):
        study.main(tiny)
    said = study.main([*tiny, "--status"])["status"]  # what is done and left, read from the files
    assert said[1].startswith("cache plain: done: 24 train rows") and said[2].startswith("cache mixed: done")
    assert said[3:] == ["student resolution: 32 px", "E 1: 2/4 runs done", "E 2: 0/7 runs done"]
    interim = study.main([*tiny, "--summary"])  # a report from the two runs there are; it trains nothing
    assert len(calls) == 2 and [(p["runs"], p["planned"]) for p in interim["points"]] == [(2, 4), (0, 7)]
    assert set(interim["points"][0]["arms"]) == {"fm", "fm-twin"} and not interim["points"][1]["arms"]
    assert "Interim: the curve is not finished** (E 1: 2/4 runs; E 2: 0/7 runs)" in (results / "summary.md").read_text()
    summary = study.main(tiny)  # the same command again: it continues
    plan = json.loads((results / "plan.json").read_text())
    assert plan["seeds"] == [0] and plan["epochs"] == [1, 2] and plan["k"] == 1  # K + 1 = max(E): no view twice
    assert plan["loss_epochs"] == [2] and plan["loss_arms"] == study.LOSS_ARMS
    assert len(calls) == 11 and len({c.out for c in calls}) == 11  # 4 arms x 2 points + 3 losses at E 2, the first two not again
    assert {(c.epochs, c.seed) for c in calls} == {(1, 0), (2, 0)}
    fm = json.loads((results / "E2" / "fm-seed0.json").read_text())  # its ledger's pace, per machine
    assert list(fm["epoch_seconds_by_machine"]) == fm["machines"] and fm["epoch_seconds_by_machine"][fm["machines"][0]] > 0
    every = {**study.ARMS, **study.LOSS_ARMS}
    for c in calls:  # one training loop, the plan's arms, each twin on its arm's views and budget
        arm = next(a for a in every if c.out.name.startswith(f"E{c.epochs}-{a}-px"))
        a = every[arm]
        assert c.views and c.alpha == a["alpha"] and c.temperature == a["temperature"]
        assert c.student_config["image_size"] == 32 and c.cache.name == f"cache-{a['views']}"
        assert (c.loss, c.standardize) == (a.get("loss", "kd"), a.get("standardize", False))
        assert (arm in study.LOSS_ARMS) == (c.epochs == 2 and arm in ("dkd", "dist", "kd-std"))
    dkd = next(c for c in calls if c.loss == "dkd")
    assert dkd.dkd_beta == study.LOSS_ARMS["dkd"]["dkd_beta"] and dkd.epochs == 2
    for kind in ("plain", "mixed"):
        cache = json.loads((results / f"cache-{kind}.json").read_text())
        assert cache["splits"]["train"]["rows"] == 12 * 2 and cache["splits"]["train"]["seconds"] > 0
    mixed = json.loads((results / "E2" / "fm-seed0.json").read_text())
    assert mixed["epochs"] == 2 and len(mixed["validation_accuracy_per_epoch"]) == 2 and mixed["cpu_s"] > 0
    assert mixed["precision"] == "fp32" and len(mixed["machines"]) == 1 and mixed["machines"][0].startswith("cpu ")
    run_json = json.loads((tmp_path / "work" / "runs" / "E2-fm-px32-seed0" / "run.json").read_text())
    assert run_json["consistency"]["stored_views"]["policy"]["mixup"] == 1.0 and run_json["config"]["alpha"] == 1.0
    losses = {f"{arm} - recipe-twin" for arm in study.LOSS_ARMS}  # each loss against the recipe's twin, at E 2
    for point, extra in zip(summary["points"], (set(), set(study.LOSS_ARMS))):
        assert set(point["arms"]) == set(study.ARMS) | extra and point["cpu_hours"] > 0
        assert point["precisions"] == ["fp32"] and point["machines"] == mixed["machines"]
        assert set(point["gains"]) == {"fm - fm-twin", "recipe - recipe-twin"} | (losses if extra else set())
        assert point["gains"]["fm - fm-twin"]["test"]["pairs"] == 1
        assert 0 <= point["arms"]["fm"]["test_teacher_agreement"] <= 1
    assert set(summary["teacher_accuracy"]) == {"train", "validation", "test"}
    assert (results / "summary.json").exists() and (results / "curve.png").stat().st_size > 1000
    table = (results / "summary.md").read_text().splitlines()
    assert not any("Interim" in line for line in table)
    assert not any("{" in line for line in table)  # every f-string placeholder was filled in
    for point in summary["points"]:
        for arm, row in point["arms"].items():
            assert f"| {point['epochs']} | {arm} | 1 | {100 * row['test']['mean']:.1f} % |" in "\n".join(table)
        for name in point["gains"]:
            gap = 100 * point["gains"][name]["test"]["gap"]
            assert any(line.startswith(f"| {point['epochs']} | {name} | 1 | {gap:+.1f} pp |") for line in table)

    assert study.main([*tiny, "--status"])["status"][-2:] == ["E 1: 4/4 runs done", "E 2: 7/7 runs done"]
    calls.clear()
    stamp = (results / "E1" / "fm-seed0.json").stat().st_mtime_ns
    again = study.main(tiny)  # rerun: every result exists, nothing is trained again
    assert calls == [] and (results / "E1" / "fm-seed0.json").stat().st_mtime_ns == stamp
    assert again["points"] == summary["points"]
    with pytest.raises(SystemExit, match="seeds"):  # the seed count was fixed before the runs
        study.main([*tiny, "--seeds", "0,1"])

    (results / "E2" / "recipe-seed0.json").unlink()  # a run to do again, and little time on the machine
    shutil.rmtree(tmp_path / "work" / "runs" / "E2-recipe-px32-seed0")
    capsys.readouterr()
    study.main([*tiny, "--hours", "1e-9"])  # it would not finish in time: not started, the report still written
    said = capsys.readouterr().out
    assert "left for a later session" in said and "E 2 recipe seed 0 (~0 min)" in said
    assert calls == [] and "E 2: 6/7 runs done" in study.main([*tiny, "--status"])["status"]
    assert not (tmp_path / "work" / "runs" / "E2-recipe-px32-seed0").exists()
    study.main([*tiny, "--hours", "1"])
    assert [(c.epochs, c.alpha) for c in calls] == [(2, study.ARMS["recipe"]["alpha"])]

    # A copy that starts on a new kind of machine runs its first run unsized, and sizes the next by that run's pace.
    for arm in ("recipe", "recipe-twin"):
        (results / "E2" / f"{arm}-seed0.json").unlink()
        shutil.rmtree(tmp_path / "work" / "runs" / f"E2-{arm}-px32-seed0")
    paces = iter([None, 1e9])  # unknown, then (after the first run) far too slow for what is left
    monkeypatch.setattr(study, "epoch_seconds", lambda *a: next(paces))
    calls.clear()
    capsys.readouterr()
    study.main([*tiny, "--hours", "1"])
    said = capsys.readouterr().out
    assert len(calls) == 1 and "this one starts unsized" in said and "left for a later session" in said


def test_a_plan_gains_the_loss_arms_once_logged_and_never_changes_a_setting_it_has(tiny, tmp_path, capsys):
    path = tmp_path / "results" / "plan.json"
    study.main([*tiny, "--plan-only"])
    assert json.loads(path.read_text())["loss_epochs"] == []  # 100 is not among these --epochs: no loss arms
    older = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("loss_arms", "loss_epochs")}
    path.write_text(json.dumps(older))  # a plan written before the loss arms existed (2026-12-01)
    study.main([*tiny, "--loss-epochs", "2", "--plan-only"])
    amended = json.loads(path.read_text())
    assert "amended" in capsys.readouterr().out
    assert {k: amended[k] for k in older} == older  # nothing it had is changed
    assert amended["loss_arms"] == study.LOSS_ARMS and amended["loss_epochs"] == [2]
    assert [a["added"] for a in amended["amendments"]] == [["loss_arms", "loss_epochs"]]
    study.main([*tiny, "--loss-epochs", "2", "--plan-only"])  # the same plan again: no second amendment
    assert json.loads(path.read_text()) == amended
    with pytest.raises(SystemExit, match="loss_epochs differ"):  # a setting it has is never changed
        study.main([*tiny, "--loss-epochs", "1", "--plan-only"])
    with pytest.raises(SystemExit):
        study.parse_args([*tiny, "--loss-epochs", "3"])
    assert "--loss-epochs 3 must be among --epochs 1,2" in capsys.readouterr().err


def test_more_seeds_extend_one_pair_at_one_point_as_a_logged_amendment(tiny, tmp_path, monkeypatch):
    tiny = [*tiny, "--epochs", "1", "--loss-epochs", ""]
    study.main(tiny)  # the plan's one seed, every arm
    plan_path = tmp_path / "results" / "plan.json"
    assert json.loads(plan_path.read_text())["more_seeds"] == {}  # 300 is not among these --epochs
    trained, real = [], study.train_student.run
    monkeypatch.setattr(study.train_student, "run", lambda cfg, **kw: trained.append(cfg.out.name) or real(cfg, **kw))
    summary = study.main([*tiny, "--more-seeds", "1:recipe,recipe-twin:1,2"])
    assert trained == [f"E1-{arm}-px32-seed{s}" for s in (1, 2) for arm in ("recipe", "recipe-twin")]  # pair by pair
    plan = json.loads(plan_path.read_text())
    assert plan["more_seeds"] == {"1": {"arms": ["recipe", "recipe-twin"], "seeds": [1, 2]}}
    assert [a["added"] for a in plan["amendments"]] == [["more_seeds: 1"]] and plan["seeds"] == [0]
    point = summary["points"][0]
    assert (point["runs"], point["planned"]) == (8, 8)
    assert point["arms"]["recipe"]["seeds"] == [0, 1, 2] and point["arms"]["fm"]["seeds"] == [0]
    assert point["gains"]["recipe - recipe-twin"]["test"]["pairs"] == 3
    assert point["gains"]["recipe - recipe-twin, the plan's seeds"]["test"]["pairs"] == 1  # side by side
    assert point["gains"]["fm - fm-twin"]["test"]["pairs"] == 1
    assert [(r["arm"], r["seed"]) for r in point["every_run"]][-2:] == [("recipe", 2), ("recipe-twin", 2)]
    for other in ("", "1:recipe,recipe-twin:1"):  # an entry it has is never changed or dropped
        with pytest.raises(SystemExit, match="more_seeds differ"):
            study.main([*tiny, "--more-seeds", other, "--plan-only"])


@pytest.mark.parametrize("more", ["300:recipe:3", "1:nope:3", "1:recipe:0", "1:recipe:3,3", "1-recipe-3"])
def test_more_seeds_are_refused_off_the_curve_for_unknown_arms_or_seeds_it_has(tiny, more, capsys):
    with pytest.raises(SystemExit):
        study.parse_args([*tiny, "--epochs", "1", "--more-seeds", more])
    assert "--more-seeds" in capsys.readouterr().err


@pytest.mark.parametrize("accuracy, chosen", [({128: 0.90, 160: 0.92, 224: 0.93}, 160),  # SE at 0.93: 2.2 pp
                                               ({128: 0.88, 160: 0.90, 224: 0.93}, 224),
                                               ({128: 0.93, 160: 0.93, 224: 0.90}, 128),
                                               ({128: 1.00, 160: 0.99, 224: 1.00}, 128)])  # no spread: the best
def test_the_resolution_is_the_smallest_within_one_standard_error_of_the_best(accuracy, chosen):
    size, floor = study.choose_size({s: {"accuracy": a, "n": 133} for s, a in accuracy.items()})
    assert size == chosen and floor <= max(accuracy.values())


def test_a_second_copy_skips_the_run_another_copy_is_writing_and_waits_for_a_cache(tiny, tmp_path, monkeypatch):
    from kdpipe import locking

    tiny = [*tiny, "--epochs", "1"]
    results, work = tmp_path / "results", tmp_path / "work"
    with locking.exclusive(work / "runs" / "E1-fm-px32-seed0"):  # the other copy is training this run
        study.main(tiny)
        assert study.main([*tiny, "--status"])["status"][-1] == "E 1: 3/4 runs done; fm seed 0 running"
    assert not (results / "E1" / "fm-seed0.json").exists()
    assert {p.name for p in (results / "E1").iterdir()} == {f"{a}-seed0.json" for a in study.ARMS if a != "fm"}
    summary = study.main(tiny)  # the other copy stopped without finishing it: this copy runs it now
    assert (results / "E1" / "fm-seed0.json").exists() and set(summary["points"][0]["arms"]) == set(study.ARMS)

    waits = []  # a cache another copy is writing: skipped, then waited for, then read back (not recomputed)
    lock = locking.exclusive(work / "cache-plain")
    lock.__enter__()

    def sleep(_s):
        waits.append(_s)
        lock.__exit__(None, None, None)  # the other copy finishes its cache while this one waits

    monkeypatch.setattr(study.time, "sleep", sleep)
    caches = study.caches_step(study.parse_args(tiny), json.loads((results / "plan.json").read_text()))
    assert waits == [study.POLL_S] and caches == {"plain": work / "cache-plain", "mixed": work / "cache-mixed"}


def test_the_screen_chooses_the_size_on_validation_and_its_run_is_the_curves(tiny, tmp_path, monkeypatch):
    tiny = [*tiny, "--epochs", "1", "--sizes", "32,24"]
    trained = []
    real = study.train_student.run

    def run(cfg, **kw):
        if not (cfg.out_dir() / "run.json").exists():
            trained.append((cfg.out.parent.name, cfg.student_config["image_size"], cfg.alpha))
        return real(cfg, **kw)

    monkeypatch.setattr(study.train_student, "run", run)
    study.main(tiny)
    results = tmp_path / "results"
    screen = json.loads((results / "screen.json").read_text())
    accuracy = {int(size): r["validation"]["accuracy"] for size, r in screen["runs"].items()}
    best = max(accuracy.values())
    floor = best - (best * (1 - best) / 2) ** 0.5  # one standard error at the best (2 validation images)
    assert screen["chosen"] == min(size for size, a in accuracy.items() if a >= floor)
    chosen = screen["chosen"]
    assert sorted(trained[:2]) == [("screen", 24, 1.0), ("screen", 32, 1.0)]  # fm, both sizes
    assert len(trained) == 5 and all(folder == "runs" and size == chosen for folder, size, _ in trained[2:])
    fm = json.loads((results / "E1" / "fm-seed0.json").read_text())  # read back from the screen, not retrained
    assert fm["run_dir"].endswith(f"screen/fm-E1-px{chosen}-seed0") and fm["size"] == chosen
    assert study.main([*tiny, "--status"])["status"][3:] == [f"student resolution: {chosen} px (chosen on validation)",
                                                             "E 1: 4/4 runs done"]

    # a fresh checkout: the work folder is gone, the committed records are not
    shutil.rmtree(tmp_path / "work")
    (results / "screen.json").unlink()
    (results / "E1" / "fm-seed0.json").unlink()
    trained.clear()
    args = study.parse_args(tiny)
    assert study.screen_step(args, study.fix_plan(args), {}) == chosen and trained == []  # nothing trained again
    assert json.loads((results / "screen.json").read_text()) == screen
    assert json.loads((results / "E1" / "fm-seed0.json").read_text()) == fm


def test_a_fresh_checkout_restores_the_kept_caches_instead_of_running_the_teacher_again(tiny, tmp_path, monkeypatch):
    results, work = tmp_path / "results", tmp_path / "work"
    args = study.parse_args([*tiny, "--epochs", "1"])
    plan = study.fix_plan(args)
    first = study.caches_step(args, plan)
    for kind, out in first.items():  # kept beside the results, so a commit carries them
        assert sorted(p.name for p in (results / "caches" / kind).iterdir()) == sorted(p.name for p in
                                                                                      out.glob("*.parquet"))
    shutil.rmtree(work)  # a fresh checkout: the ignored work folder is gone
    monkeypatch.setattr(study.cache_teacher, "teacher_batches", lambda *a, **k: pytest.fail("the teacher ran"))
    monkeypatch.setattr(study.runtime, "cpu_has_fast_bf16", lambda: True)  # `auto` here would choose bf16, but the
    again = study.caches_step(args, {**plan, "precision": "auto"})  # kept caches are fp32: reused as they are
    assert again == first and all((work / f"cache-{k}" / "train.parquet").exists() for k in ("plain", "mixed"))


def test_status_reads_a_runs_epochs_and_pace_from_its_metrics(tmp_path):
    out, result = tmp_path / "run", tmp_path / "E5" / "fm-seed0.json"
    assert study.run_progress(result, out, 5) == "not started"
    out.mkdir()
    (out / study.run_folder.METRICS).write_text('{"epoch": 1, "epoch_time_s": 30}\n{"epoch": 2, "epoch_time_s": 90}\n')
    assert study.run_progress(result, out, 5) == "2/5 epochs, stopped, ~3 min left"  # 3 epochs at 60 s
    study.write_json(result, {})
    assert study.run_progress(result, out, 5) == "done"


def test_the_pace_counts_a_run_that_spanned_machines_with_its_epochs_on_this_one(tmp_path):
    # A run resumed on another machine kept a ledger attempt per machine: its pace here is its epochs here only.
    attempts = [{"cpu_s": 1.0, "machine": "cpu A", "epochs": 10, "epoch_s": 300.0},
                {"cpu_s": 1.0, "machine": "cpu B", "epochs": 20, "epoch_s": 1800.0},
                {"cpu_s": 1.0, "machine": "cpu B", "epochs": 10, "epoch_s": 600.0},
                {"cpu_s": 1.0, "machine": "cpu C"}]  # an attempt from before the ledger counted epochs
    assert study.machine_paces(attempts) == {"cpu A": 30.0, "cpu B": 80.0}
    results = tmp_path / "results"
    runs = {"spanned": {"size": 32, "epochs": 40, "wall_time_s": 3000.0, "machines": ["cpu A", "cpu B"],
                        "epoch_seconds_by_machine": {"cpu A": 30.0, "cpu B": 80.0}},
            "older-alone": {"size": 32, "epochs": 10, "wall_time_s": 900.0, "machines": ["cpu B"]},
            "older-spanned": {"size": 32, "epochs": 10, "wall_time_s": 100.0, "machines": ["cpu B", "cpu C"]},
            "other-size": {"size": 64, "epochs": 10, "wall_time_s": 10.0, "machines": ["cpu B"]}}
    for name, run in runs.items():
        study.write_json(results / "E40" / f"{name}-seed0.json", run)
    args = study.parse_args(["--results", str(results), "--work", str(tmp_path / "work")])
    assert study.epoch_seconds(args, 32, "cpu B") == 90.0  # the upper median of 80 and 90; neither 10 s run counts
    assert study.epoch_seconds(args, 32, "cpu A") == 30.0
    assert study.epoch_seconds(args, 32, "cpu C") is None  # its only run mixed machines and counted no epochs


def test_a_gain_names_the_machines_of_its_own_pairs_not_the_points(tmp_path):
    # One point, the fm pair trained on machine A in bf16, the recipe pair on B in fp32: each gain row must name
    # its pair's machine and precision only (the point as a whole ran on both).
    results = tmp_path / "results"
    plan = {"epochs": [5], "seeds": [0], "k": 4, "arms": study.ARMS}
    where = {"fm": ("cpu A", "bf16"), "fm-twin": ("cpu A", "bf16"), "recipe": ("cpu B", "fp32"),
             "recipe-twin": ("cpu B", "fp32")}
    for arm, (machine, precision) in where.items():
        acc = {"accuracy": 0.9 if "twin" in arm else 0.95, "teacher_agreement": 0.9}
        study.write_json(results / "E5" / f"{arm}-seed0.json",
                         {"validation": acc, "test": acc, "cpu_s": 3600.0, "wall_time_s": 3600.0,
                          "machines": [machine], "precision": precision})
    args = study.parse_args(["--results", str(results)])
    point = study.summarise(args, plan)["points"][0]
    assert point["machines"] == ["cpu A", "cpu B"] and point["precisions"] == ["bf16", "fp32"]
    assert point["gains"]["fm - fm-twin"]["machines"] == ["cpu A"]
    assert point["gains"]["fm - fm-twin"]["precisions"] == ["bf16"]
    assert point["gains"]["recipe - recipe-twin"]["machines"] == ["cpu B"]
    assert point["gains"]["recipe - recipe-twin"]["test"]["gap"] == pytest.approx(0.05)
    table = study.markdown({**study.summarise(args, plan), "size": 160})
    assert any(line.startswith("| 5 | recipe - recipe-twin |") and line.endswith("| cpu B, fp32 |")
               for line in table.splitlines())


def test_the_summary_pairs_the_students_kl_to_the_teacher_and_marks_an_interval_below_zero(tmp_path):
    # Accuracy can tie while the distilled student matches the teacher's function more closely: the summary
    # pairs test KL(teacher || student) by seed too. fm is closer than its twin on both seeds; the recipe's
    # records carry no KL (older records), which must show as unknown, not as zero.
    results = tmp_path / "results"
    plan = {"epochs": [5], "seeds": [0, 1], "k": 4, "arms": study.ARMS}
    kl = {("fm", 0): 0.10, ("fm", 1): 0.12, ("fm-twin", 0): 0.30, ("fm-twin", 1): 0.31}
    for arm in study.ARMS:
        for seed in (0, 1):
            test = {"accuracy": 0.9, "teacher_agreement": 0.9}
            if (arm, seed) in kl:
                test["kl_to_teacher"] = kl[arm, seed]
            curve = {"fm": [0.8, 1.0], "fm-twin": [0.7, 0.9]}.get(arm)  # fm's validation curve runs 10 pp higher
            study.write_json(results / "E5" / f"{arm}-seed{seed}.json",
                             {"validation": {**test, "kl_to_teacher": 0.2}, "test": test, "cpu_s": 1.0, "wall_time_s": 1.0,
                              "machines": ["cpu A"], "precision": "fp32",
                              **({"validation_accuracy_per_epoch": curve} if curve else {})})
    summary = {**study.summarise(study.parse_args(["--results", str(results)]), plan), "size": 160}
    point = summary["points"][0]
    fm = point["gains"]["fm - fm-twin"]["kl_to_teacher"]
    assert fm["test"]["gap"] == pytest.approx(-0.195) and fm["test"]["pairs"] == 2
    assert fm["test"]["interval_below_zero"] and not fm["test"]["interval_above_zero"]
    assert fm["validation"]["gap"] == pytest.approx(0) and not fm["validation"]["interval_below_zero"]
    assert point["gains"]["recipe - recipe-twin"]["kl_to_teacher"]["test"]["gap"] is None
    assert point["arms"]["fm"]["test_kl_to_teacher"] == pytest.approx(0.11)
    assert point["gains"]["fm - fm-twin"]["validation_curve_mean"]["gap"] == pytest.approx(0.1)  # (0.8+1)/2 - (0.7+0.9)/2
    assert point["gains"]["recipe - recipe-twin"]["validation_curve_mean"]["gap"] is None  # records without the curve
    assert point["arms"]["recipe"]["test_kl_to_teacher"] is None
    lines = study.markdown(summary).splitlines()
    fm_row = next(line for line in lines if line.startswith("| 5 | fm - fm-twin |"))
    assert "| -0.195 nats ± " in fm_row and "(below 0) / +0.000 nats ± 0.000 |" in fm_row
    assert "| +0.0 pp |" not in fm_row  # two pairs: the accuracy gap has its interval too
    recipe_row = next(line for line in lines if line.startswith("| 5 | recipe - recipe-twin |"))
    assert recipe_row.split(" | ")[5] == "- / +0.000 nats ± 0.000"  # validation's KL is in its records
    assert next(line for line in lines if line.startswith("| 5 | fm | 2 |")).endswith("| 0.110 |")
    assert "| 5 | fm - fm-twin | 2 | +10.0 pp ± 0.0 (above 0) |" in lines  # the exploratory table: how fast
    assert "| 5 | recipe - recipe-twin | 0 | - |" in lines


def test_every_run_has_its_own_row_with_its_machine_and_how_fast_it_reached_the_bar(tmp_path):
    # Two seeds of one pair on two machines: each run's row names its own machine and precision; the first epoch
    # at >= 95 % validation is read from the curve ("never" where the curve stays below, "-" without a curve), and
    # so is how many epochs tie with the best one on validation (shown only where more than one does).
    results = tmp_path / "results"
    plan = {"epochs": [5], "seeds": [0, 1], "k": 4, "arms": study.ARMS}
    curves = {("fm", 0): [0.5, 0.96, 0.94], ("fm", 1): [0.95, 0.9, 0.9], ("fm-twin", 0): [0.5, 0.94, 0.94]}
    for (arm, seed), curve in curves.items():
        study.write_json(results / "E5" / f"{arm}-seed{seed}.json",
                         {"validation": {"accuracy": max(curve)}, "test": {"accuracy": 0.5 + seed / 4}, "best_epoch": 2,
                          "validation_accuracy_per_epoch": curve, "cpu_s": 1.0, "wall_time_s": 90.0 * (seed + 1),
                          "machines": [f"cpu {'AB'[seed]}"], "precision": ("bf16", "fp32")[seed]})
    study.write_json(results / "E5" / "recipe-seed1.json",  # an older record: no curve, no best epoch
                     {"validation": {"accuracy": 0.9}, "test": {"accuracy": 0.8}, "cpu_s": 1.0, "wall_time_s": 60.0,
                      "machines": ["cpu B"], "precision": "fp32"})
    summary = {**study.summarise(study.parse_args(["--results", str(results)]), plan), "size": 160}
    rows = summary["points"][0]["every_run"]
    assert [(r["seed"], r["arm"]) for r in rows] == [(0, "fm"), (0, "fm-twin"), (1, "fm"), (1, "recipe")]
    assert [r["first_epoch_at_fast_bar"] for r in rows] == [2, None, 1, None]
    assert [r["epochs_tied_at_best"] for r in rows] == [1, 2, 1, None]
    lines = study.markdown(summary).splitlines()
    assert "| 5 | 0 | fm | 50.0 % | 96.0 % (2) | - | - | 2 | 80.0 % | 2 | cpu A, bf16 |" in lines
    assert "| 5 | 0 | fm-twin | 50.0 % | 94.0 % (2, 2 tied) | - | - | never | 79.3 % | 2 | cpu A, bf16 |" in lines
    assert "| 5 | 1 | fm | 75.0 % | 95.0 % (2) | - | - | 1 | 91.7 % | 3 | cpu B, fp32 |" in lines
    assert "| 5 | 1 | recipe | 80.0 % | 90.0 % | - | - | - | - | 1 | cpu B, fp32 |" in lines


def test_the_losses_are_paired_against_kd_and_one_is_chosen_on_validation_only_when_all_have_their_seeds(tmp_path):
    # Issue 29's sweep: dkd beats KD on validation but not on test, dist the other way round; the choice reads
    # validation only, and waits while kd-std lacks a seed.
    results = tmp_path / "results"
    plan = {"epochs": [5], "seeds": [0, 1], "k": 4, "arms": study.ARMS, "loss_arms": study.LOSS_ARMS,
            "loss_epochs": [5]}
    accuracy = {"recipe": (0.90, 0.90), "recipe-twin": (0.85, 0.85), "dkd": (0.95, 0.88), "dist": (0.89, 0.97),
                "kd-std": (0.80, 0.80), "fm": (0.9, 0.9), "fm-twin": (0.9, 0.9)}  # (validation, test)

    def write(arm, seed):
        val, test = accuracy[arm]
        study.write_json(results / "E5" / f"{arm}-seed{seed}.json",
                         {"validation": {"accuracy": val + seed / 100}, "test": {"accuracy": test},
                          "cpu_s": 1.0, "wall_time_s": 1.0, "machines": ["cpu A"], "precision": "fp32"})

    for arm in accuracy:
        for seed in (0, 1):
            if (arm, seed) != ("kd-std", 1):
                write(arm, seed)
    args = study.parse_args(["--results", str(results)])
    losses = study.summarise(args, plan)["points"][0]["losses"]
    assert losses["versus"] == "recipe" and losses["chosen_on_validation"] is None
    assert losses["gaps"]["dkd"]["validation"]["gap"] == pytest.approx(0.05)
    assert losses["gaps"]["dkd"]["test"]["gap"] == pytest.approx(-0.02)
    assert losses["gaps"]["kd-std"]["test"]["pairs"] == 1
    write("kd-std", 1)
    summary = {**study.summarise(args, plan), "size": 160}
    assert summary["points"][0]["losses"]["chosen_on_validation"] == "dkd"  # not dist, the best on test
    lines = study.markdown(summary).splitlines()
    assert next(line for line in lines if line.startswith("| 5 | dist - recipe |")).split(" | ")[3] == "+7.0 pp ± 0.0 (above 0)"
    assert "E = 5: chosen on validation: **dkd**." in lines
    assert study.summarise(args, {**plan, "loss_epochs": []})["points"][0].get("losses") is None


def test_the_studys_student_is_chosen_on_validation_over_the_plans_seeds_a_tie_to_fewer_epochs(tmp_path):
    # Validation (test) per arm at two points. fm at E 10 ties fm at E 5 on validation (E 5 wins: cheaper);
    # recipe at E 10 has the best validation on seed 0 but lacks seed 1 (not a candidate); recipe-twin at E 5 has
    # an extension seed 2 at 100 % that would lift its mean above fm's (0.973) if it counted; test would choose otherwise.
    results = tmp_path / "results"
    plan = {"epochs": [5, 10], "seeds": [0, 1], "k": 4, "arms": study.ARMS}
    runs = {(5, "fm"): [(0.96, 0.80), (0.98, 0.80)], (10, "fm"): [(0.98, 0.99), (0.96, 0.99)],
            (10, "recipe"): [(1.0, 1.0)], (5, "recipe-twin"): [(0.96, 0.9), (0.96, 0.9), (1.0, 0.9)],
            (10, "fm-twin"): [(0.90, 0.95), (0.92, 0.95)]}
    for (e, arm), by_seed in runs.items():
        for seed, (val, test) in enumerate(by_seed):
            study.write_json(results / f"E{e}" / f"{arm}-seed{seed}.json",
                             {"validation": {"accuracy": val}, "test": {"accuracy": test}, "cpu_s": 1.0,
                              "wall_time_s": 1.0, "machines": ["cpu A"], "precision": "fp32"})
    plan = {**plan, "more_seeds": {"5": {"arms": ["recipe-twin"], "seeds": [2]}}}
    args = study.parse_args(["--results", str(results)])
    student = study.summarise(args, plan)["student"]
    assert student["candidates"] == 4  # fm at both points, recipe-twin at 5, fm-twin at 10
    assert (student["chosen"]["epochs"], student["chosen"]["arm"]) == (5, "fm")
    assert student["chosen"]["validation"] == pytest.approx(0.97) and student["chosen"]["test"]["mean"] == pytest.approx(0.8)
    assert (student["runner_up"]["epochs"], student["runner_up"]["arm"]) == (10, "fm")
    lines = study.markdown({**study.summarise(args, plan), "size": 160}).splitlines()
    assert any(line.startswith("The study's student, chosen on validation among the 4 (E, arm)")
               and "**E = 5, fm: validation 97.0 %, test 80.0 % ± 0.0**" in line
               and "the runner-up E = 10, fm: validation 97.0 %, test 99.0 % ± 0.0 (0.0 pp behind" in line for line in lines)
    assert study.summarise(args, {**plan, "seeds": [0, 1, 3]})["student"] is None  # no arm has seed 3 yet
