"""benchmarks/reproduce_results.py and report_results.py, tiny: every step trains through
kdpipe.train_student.run (a guide run cut short resumes from its checkpoint to the same records), each
result file carries its settings block, and the report reads arms, labels and planned seed counts from
data (settings blocks, benchmarks/decisions.json), never from folder names."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_train_config


def _script(name: str):
    """A benchmarks/ script imported as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reproduce():
    return _script("reproduce_results")


@pytest.fixture(scope="module")
def report():
    return _script("report_results")


@pytest.fixture
def tiny_guide(reproduce, cache_dir, monkeypatch):
    """The guide step on the tiny student (its real setup is train-student's defaults)."""
    tiny = tiny_train_config(cache=cache_dir).to_dict()
    monkeypatch.setattr(reproduce, "GUIDE", {**{k: tiny[k] for k in ("student_config", "batch_size", "lr", "precision",
                                                                   "device")}, "log_tensorboard": False})


def _guide(reproduce, cache_dir, root, seeds=(0,), epochs=3):
    from types import SimpleNamespace

    args = SimpleNamespace(results=root / "results", work=root / "work", seed_list=list(seeds), epochs=epochs)
    reproduce.guide(args, cache_dir)
    return args


@pytest.mark.usefixtures("tiny_guide")
def test_a_guide_run_cut_short_resumes_to_the_same_records(reproduce, cache_dir, tmp_path, monkeypatch):
    import json

    from kdpipe import train_student

    monkeypatch.setattr(reproduce, "ARMS", {"distilled": reproduce.ARMS["distilled"]})
    full = _guide(reproduce, cache_dir, tmp_path / "full")
    record = json.loads((full.results / "guide" / "distilled-seed0.json").read_text())
    assert record["settings"] == {"step": "guide", "arm": "distilled", "seed": 0, "epochs": 3,
                                  "bn_variants": "separate runs"}
    assert set(record["summary"]) == {"upstream", "momentum0.1", "precise"}
    configs = {v: r["run"]["config"] for v, r in record["summary"].items()}
    assert (configs["upstream"]["bn_momentum"], configs["momentum0.1"]["bn_momentum"]) == (0.997, 0.1)
    assert configs["precise"]["precise_bn"] and not configs["upstream"]["precise_bn"]
    # the three runs of a seed train alike: BatchNorm statistics never influence training
    losses = [[e["train"]["loss"] for e in train_student.load_report(Path(r["run_dir"])).history]
              for r in record["summary"].values()]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)

    class Cut(Exception):
        pass

    epochs = []

    def cut_after_two_epochs_of_the_second_run(rec):
        epochs.append(rec["epoch"])
        if len(epochs) == 5:  # upstream's 3 epochs, then momentum0.1's first 2 (each checkpointed before this)
            raise Cut

    monkeypatch.setattr(reproduce, "print_epoch", cut_after_two_epochs_of_the_second_run)
    with pytest.raises(Cut):
        _guide(reproduce, cache_dir, tmp_path / "cut")
    epochs.clear()
    cut = _guide(reproduce, cache_dir, tmp_path / "cut")
    assert epochs == [3, 1, 2, 3]  # upstream not again, momentum0.1 from its checkpoint, then precise
    resumed = json.loads((cut.results / "guide" / "distilled-seed0.json").read_text())
    for variant, a in record["summary"].items():
        b = resumed["summary"][variant]
        for key in ("best_epoch", "validation_accuracy_per_epoch"):
            assert a[key] == b[key]
        assert a["test"]["accuracy"] == b["test"]["accuracy"]
        assert a["test"]["kl_to_teacher"] == pytest.approx(b["test"]["kl_to_teacher"], rel=1e-4)


@pytest.mark.usefixtures("tiny_guide")
def test_the_report_tabulates_finished_runs(reproduce, report, cache_dir, tmp_path):
    args = _guide(reproduce, cache_dir, tmp_path, seeds=(0, 1), epochs=2)
    docs = tmp_path / "docs"
    assert report.main(["--results", str(args.results), "--docs", str(docs)]) == 0
    text = (docs / "guide.md").read_text()
    runs = report.load_runs(args.results)
    tests = [r["summary"]["precise"]["test"]["accuracy"] for r in runs["distilled"]]
    assert f"| distilled | precise | 2 | {report.pct(tests)} |" in text
    assert text.count("| scratch |") == 3 and (docs / "guide.png").stat().st_size > 1000
    assert "runs finished: 12;" in text and "Each comes from its own train-student run" in text  # 2 arms x 2 seeds x 3
    assert not (args.results / "guide.md").exists()  # tables go to --docs, beside nothing raw


def test_the_docs_tables_are_what_the_committed_results_render(report, tmp_path):
    """docs/results/*.md are generated from benchmarks/results/ (side-by-side guide files, settings blocks
    written once into the older files, decisions.json): rendering them again changes nothing."""
    assert report.main(["--docs", str(tmp_path)]) == 0
    for name in ("guide.md", "recipe.md"):
        assert (tmp_path / name).read_text() == (REPO / "docs" / "results" / name).read_text()
    assert not list((REPO / "docs" / "results").rglob("*-seed*.json"))  # raw result files live in benchmarks/


def test_the_recipe_step_screens_on_validation_then_runs_more_seeds(reproduce, cache_dir, tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    tiny = tiny_train_config(cache=cache_dir).to_dict()
    monkeypatch.setattr(reproduce, "RECIPE", {**reproduce.RECIPE, "batch_size": 8, "student_config": tiny["student_config"],
                                              "precision": "fp32", "device": "cpu", "log_tensorboard": False})
    monkeypatch.setattr(reproduce, "SCREEN", {"lr": "3e-3", "alpha": "0,0.5,0.9"})
    args = SimpleNamespace(results=tmp_path / "results", work=tmp_path / "work", recipe_epochs=1, seed_list=[0, 1])
    reproduce.recipe(args, cache_dir)
    screen = json.loads((args.results / "recipe" / "screen.json").read_text())
    assert len(screen["configs"]) == 3
    chosen = max((c for c in screen["configs"] if c["params"]["alpha"] > 0), key=lambda c: c["val_mean"])
    for arm, alpha in (("scratch", 0.0), ("distilled", chosen["params"]["alpha"])):
        for seed in (0, 1):
            r = json.loads((args.results / "recipe" / f"{arm}-seed{seed}.json").read_text())
            assert r["run"]["config"]["alpha"] == alpha and r["run"]["config"]["seed"] == seed
            assert r["run"]["config"]["batch_size"] == 8 and r["test"]["accuracy"] >= 0
            assert r["settings"] == {"step": "recipe", "views": 0, "view_scale": None, "view_mixup": 0.0,
                                     "view_lr": None, "epochs": 1, "recipe_epochs": 1, "mix": "none", "alpha": alpha,
                                     "temperature": 5.0 if alpha else None, "seed": seed}
    assert json.loads((args.results / "recipe" / "distilled-seed0.json").read_text())["validation"]["accuracy"] == \
        chosen["validation_accuracy"][0]  # seed 0 is the screening run itself


def test_the_views_step_trains_the_chosen_recipe_on_stored_views(reproduce, image_folder, teacher_dir, tmp_path,
                                                                  monkeypatch):
    import json
    from types import SimpleNamespace

    monkeypatch.setattr(reproduce, "RECIPE", {**reproduce.RECIPE, "batch_size": 8, "student_config": {
        "image_size": 32, "depth_multiplier": 0.35}, "precision": "fp32", "device": "cpu", "log_tensorboard": False})
    args = SimpleNamespace(results=tmp_path / "results", work=tmp_path / "work", recipe_epochs=1, seed_list=[0, 1],
                           views=2, views_long=2, view_arms=set(reproduce.VIEW_ARMS), view_scale=reproduce.VIEW_SCALE,
                           view_lr=None, view_mixup=0.0)
    reproduce.write_json(args.results / "recipe" / "screen.json", {"configs": [
        {"config": "a0-lr0.003", "params": {"alpha": 0.0, "lr": 3e-3}, "val_mean": 0.9},
        {"config": "a0.5-lr0.003", "params": {"alpha": 0.5, "lr": 3e-3}, "val_mean": 0.5},
        {"config": "a0.9-lr0.001", "params": {"alpha": 0.9, "lr": 1e-3}, "val_mean": 0.4}]})
    reproduce.views_step(args, str(teacher_dir), str(image_folder))
    folder = args.results / "views2"  # 2 views per image: not the 8-view results in views/
    assert not (args.results / "views").exists()
    cache = json.loads((folder / "cache.json").read_text())
    assert cache["splits"]["train"]["views"] == 3 and cache["splits"]["validation"]["views"] == 1
    for seed in (0, 1):
        r = json.loads((folder / f"distilled-seed{seed}.json").read_text())
        config = r["run"]["config"]
        assert config["views"] and config["alpha"] == 0.5 and config["lr"] == 3e-3 and config["seed"] == seed
        assert r["settings"] == {"step": "views", "views": 2, "view_scale": None, "view_mixup": 0.0, "view_lr": None,
                                 "epochs": 1, "recipe_epochs": 1, "mix": "none", "alpha": 0.5, "temperature": 5.0,
                                 "seed": seed}
        for arm, alpha, epochs in (("scratch", 0.0, 1), ("distilled-e2", 0.5, 2), ("scratch-e2", 0.0, 2)):
            r = json.loads((folder / f"{arm}-seed{seed}.json").read_text())
            s = r["settings"]
            assert (s["alpha"], s["epochs"], len(r["validation_accuracy_per_epoch"])) == (alpha, epochs, epochs)
            assert (s["views"], s["seed"], s["mix"]) == (2, seed, "none") and s["recipe_epochs"] == 1
            assert r["run"]["config"]["views"] and r["run"]["config"]["seed"] == seed
        assert not list(folder.glob("*cutmix*"))  # batch-level --mix is gone: no such arm runs

    # a later session without the run folders reruns only the seeds whose result files are missing
    lost = folder / "scratch-e2-seed1.json"
    kept = (folder / "distilled-seed0.json").read_text()
    lost.unlink()
    reproduce.views_step(SimpleNamespace(**{**vars(args), "view_arms": {"distilled", "scratch"}}), str(teacher_dir),
                         str(image_folder))
    assert not lost.exists()  # not among the arms asked for
    reproduce.views_step(args, str(teacher_dir), str(image_folder))
    assert json.loads(lost.read_text())["settings"]["seed"] == 1
    assert (args.work / "sweeps" / "views2-scratch-e2-seeds1").is_dir()
    assert (folder / "distilled-seed0.json").read_text() == kept
    # more seeds for an arm later (--seeds 2) get a sweep of their own beside the first seeds' one
    reproduce.views_step(SimpleNamespace(**{**vars(args), "view_arms": {"distilled"}, "seed_list": [2]}),
                         str(teacher_dir), str(image_folder))
    assert json.loads((folder / "distilled-seed2.json").read_text())["settings"]["seed"] == 2

    # milder crops and another learning rate: their own cache and results, the rest of the recipe unchanged
    varied = SimpleNamespace(**{**vars(args), "view_arms": {"distilled"}, "seed_list": [0], "view_scale": 0.5,
                                "view_lr": 1e-3})
    reproduce.views_step(varied, str(teacher_dir), str(image_folder))
    varied_folder = args.results / "views2-scale0.5-lr0.001"
    r = json.loads((varied_folder / "distilled-seed0.json").read_text())
    config = r["run"]["config"]
    assert (r["settings"]["view_scale"], r["settings"]["view_lr"], r["settings"]["views"]) == (0.5, 1e-3, 2)
    assert config["lr"] == 1e-3 and config["alpha"] == 0.5 and Path(config["cache"]).name == "cache-views2-scale0.5"
    cache = json.loads((varied_folder / "cache.json").read_text())
    assert cache["splits"]["train"]["augment"]["policy"]["scale"] == [0.5, 1.0]
    assert (folder / "distilled-seed0.json").read_text() == kept

    # --views 0: the same arms on the plain cache, the baseline for views at an equal budget
    plain = SimpleNamespace(**{**vars(args), "views": 0, "view_arms": {"distilled-long"}, "seed_list": [0]})
    reproduce.views_step(plain, str(teacher_dir), str(image_folder))
    r = json.loads((args.results / "views0" / "distilled-e2-seed0.json").read_text())
    assert not r["run"]["config"]["views"] and (r["settings"]["alpha"], r["settings"]["epochs"]) == (0.5, 2)
    assert r["settings"]["views"] == 0
    assert json.loads((args.results / "views0" / "cache.json").read_text())["splits"]["train"]["views"] == 1

    # mixed views: their own cache (blended views stored) and results; both arms train on them
    mixed = SimpleNamespace(**{**vars(args), "view_arms": {"distilled", "scratch"}, "seed_list": [0],
                               "view_mixup": 1.0})
    reproduce.views_step(mixed, str(teacher_dir), str(image_folder))
    for arm, alpha in (("distilled", 0.5), ("scratch", 0.0)):
        r = json.loads((args.results / "views2-mixup1" / f"{arm}-seed0.json").read_text())
        config = r["run"]["config"]
        assert (r["settings"]["view_mixup"], r["settings"]["views"]) == (1.0, 2)
        assert Path(config["cache"]).name == "cache-views2-mixup1" and config["views"] and config["alpha"] == alpha
    from kdpipe import logit_store

    train = logit_store.read_split(args.work / "cache-views2-mixup1" / "train.parquet")
    assert train.meta["augment"]["policy"]["mixup"] == 1.0 and (train.mixes.weights > 0).any()


@pytest.mark.parametrize("k, scale, lr, mixup", [(8, 0.25, None, 0), (16, 0.25, None, 0), (8, 0.5, None, 0),
                                                 (8, 0.25, 6e-3, 0), (16, 0.35, 1e-4, 0), (0, 0.25, None, 0),
                                                 (8, 0.25, None, 1.0), (16, 0.5, 1e-3, 0.4)])
def test_an_arms_settings_come_from_its_run_json_and_label_what_it_varies(k, scale, lr, mixup, reproduce, report):
    policy = {"scale": [scale, 1.0], **({"mixup": mixup} if mixup else {})}
    run = {"config": {"lr": lr or 3e-3, "epochs": 30, "mix": "none", "alpha": 0.9, "temperature": 5.0, "seed": 4},
           "consistency": {"stored_views": {"views": k, "policy": policy} if k else None}}
    s = reproduce.arm_settings("views", run, 3e-3, 15)
    assert s == {"step": "views", "views": k, "view_scale": None if scale == 0.25 else scale, "view_mixup": mixup,
                 "view_lr": lr, "epochs": 30, "recipe_epochs": 15, "mix": "none", "alpha": 0.9, "temperature": 5.0,
                 "seed": 4}
    label = report._views_label(s)
    assert label.startswith({0: "no views", 8: "stored views"}.get(k, f"{k} stored views"))
    assert (f"(mixup {mixup:g})" in label) == bool(mixup)
    assert (f", lr {lr:g}" in label) if lr else (", lr" not in label)
    assert (f"(crop area ≥ {scale:g})" in label) == (scale != 0.25)


@pytest.fixture
def two_seed_rule(report, monkeypatch):
    """The choice rule's comparisons on two seeds per arm (its real minimum is report.CHOICE_SEEDS = 3)."""
    monkeypatch.setattr(report, "CHOICE_SEEDS", 2)


def _result(root, seed, val, test, epochs, alpha=0.9, **varied):
    """A result file of a views arm (8 stored views, the recipe's crops, lr and 15-epoch budget, no input mix)
    with `varied` settings, each file in a folder of its own whose name says nothing about its arm."""
    import json

    settings = {"step": "views", "views": 8, "view_scale": None, "view_mixup": 0.0, "view_lr": None, "epochs": epochs,
                "recipe_epochs": 15, "mix": "none", "alpha": alpha, "temperature": 5.0 if alpha else None,
                "seed": seed, **varied}
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"r{len(list(root.iterdir()))}" / f"result-seed{seed}.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"settings": settings, "validation": {"accuracy": val},
                                "test": {"accuracy": test, "teacher_agreement": test},
                                "validation_accuracy_per_epoch": [val] * epochs, "wall_time_s": 60.0}))


@pytest.mark.parametrize("long_val, chosen", [(0.905, "15 epochs"), (0.92, "30 epochs")])
@pytest.mark.usefixtures("two_seed_rule")
def test_the_recipe_report_chooses_the_views_budget_on_validation(long_val, chosen, report, tmp_path):
    for seed, (a, b) in enumerate(((0.90, 0.80), (0.90, 0.84))):
        _result(tmp_path, seed, 0.90, a, 15)
        _result(tmp_path, seed, 0.85, b, 15, alpha=0.0)
        _result(tmp_path, seed, long_val, a + 0.05, 30)
        _result(tmp_path, seed, 0.85, b + 0.02, 30, alpha=0.0)
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert f"({chosen})" in text  # a longer budget must win by 1 pp of validation accuracy
    # each distilled arm against the twin with the same budget; Welch with 1 degree of freedom: t = 12.71
    assert "stored views, distilled, 30 epochs" + " (chosen)" * (chosen == "30 epochs") + \
        " − its λ = 0 twin = +11.0 ± 25.4 pp" in text
    assert "stored views, distilled (T 5, λ 0.9), 15 epochs" + " (chosen)" * (chosen == "15 epochs") + \
        " − its λ = 0 twin = +8.0 ± 25.4 pp" in text
    assert "stored views, from scratch (λ = 0), 30 epochs | 30 | 2 |" in text


@pytest.mark.parametrize("mix_val, chosen", [(0.925, "stored views, distilled, 30 epochs"),
                                             (0.935, "stored views + cutmix, distilled, 30 epochs")])
@pytest.mark.usefixtures("two_seed_rule")
def test_the_recipe_report_adopts_input_mixing_only_when_it_wins_on_validation(mix_val, chosen, report, tmp_path):
    for seed in (0, 1):
        _result(tmp_path, seed, 0.92, 0.88, 30)
        _result(tmp_path, seed, 0.90, 0.86 + 0.02 * seed, 30, alpha=0.0)
        _result(tmp_path, seed, mix_val, 0.90, 30, mix="cutmix")
        _result(tmp_path, seed, 0.90, 0.80 + 0.02 * seed, 30, alpha=0.0, mix="cutmix")
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert f"Chosen: **{chosen}**" in text  # same epochs: the mix must win by 1 pp of validation accuracy
    assert "| stored views + cutmix, from scratch (λ = 0), 30 epochs | 30 | 2 |" in text
    twin_gap = "+9.0 ± 12.7 pp" if "cutmix" in chosen else "+1.0 ± 12.7 pp"  # each against its own twin
    assert f"{chosen} (chosen) − its λ = 0 twin = {twin_gap}" in text


@pytest.mark.usefixtures("two_seed_rule")
def test_the_recipe_report_compares_a_budget_only_with_the_same_budget(report, tmp_path):
    for seed in (0, 1):
        _result(tmp_path, seed, 0.90, 0.86 + 0.02 * seed, 15, step="recipe", views=0)
        _result(tmp_path, seed, 0.92, 0.88, 30)
        _result(tmp_path, seed, 0.90, 0.84 + 0.02 * seed, 30, alpha=0.0)
        _result(tmp_path, seed, 0.94, 0.90 + 0.02 * seed, 60)  # no alpha = 0 twin
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert "Chosen: **stored views, distilled, 60 epochs**" in text
    assert "(chosen) −" not in text  # the 60-epoch arm has no twin: not compared with a shorter one
    assert "stored views, distilled, 30 epochs − its λ = 0 twin = +3.0 ± 12.7 pp" in text
    assert ("Views against no views, both distilled: stored views, distilled, 60 epochs − no views, distilled "
            "(T 5, λ 0.9), 15 epochs = +4.0 ± 6.1 pp") in text  # Welch: 2 degrees of freedom, t = 4.30
    # once the same budget has run without views (--views 0), views are judged against that instead
    for seed in (0, 1):
        _result(tmp_path, seed, 0.99, 0.84 + 0.02 * seed, 60, views=0)
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert "Chosen: **stored views, distilled, 60 epochs**" in text  # no views is the baseline, never the choice
    assert "| no views, distilled, 60 epochs | 60 | 2 |" in text
    assert ("Views against no views, both distilled: stored views, distilled, 60 epochs − no views, distilled, "
            "60 epochs = +6.0 ± 6.1 pp") in text


def test_the_seeds_needed_to_separate_a_gap_grow_with_the_spread(report, tmp_path):
    assert report.seeds_needed([0.90, 0.92], [0.88, 0.90]) == 8  # 2 (1.960 + 0.842)² · 0.0002 / 0.02² = 7.85
    assert report.seeds_needed([0.90, 0.94], [0.88, 0.92]) == 32  # twice the spread: four times the seeds
    assert report.seeds_needed([0.88, 0.90], [0.90, 0.92]) is None  # no positive gap to separate
    for seed in (0, 1):
        _result(tmp_path, seed, 0.92, 0.90 + 0.02 * seed, 30)
        _result(tmp_path, seed, 0.90, 0.88 + 0.02 * seed, 30, alpha=0.0)
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert ("twin = +2.0 ± 6.1 pp; paired by seed, +2.0 ± 0.0 pp over 2 seeds; 8 seeds per arm would separate "
            "such a gap from zero (80 % power)") in text  # each seed gains exactly 2 pp: no spread when paired


def test_a_gap_with_a_planned_seed_count_is_judged_only_at_that_count(report, tmp_path, monkeypatch):
    import json

    decisions = tmp_path / "decisions.json"  # as benchmarks/decisions.json: the count and where it was recorded
    decision = {"arm": {"step": "views", "views": 8, "epochs": 30, "alpha": 0.9}, "seeds_per_arm": 3,
                "recorded_in": "commit abc1234"}
    decisions.write_text(json.dumps({"planned_seeds": [decision]}))
    monkeypatch.setattr(report, "DECISIONS", decisions)
    results = tmp_path / "results"
    for seed in (0, 1):
        _result(results, seed, 0.92, 0.90 + 0.02 * seed, 30)
        _result(results, seed, 0.90, 0.80 + 0.02 * seed, 30, alpha=0.0)
        _result(results, seed, 0.92, 0.90 + 0.02 * seed, 30, views=16)  # not the arm of the decision
        _result(results, seed, 0.90, 0.80 + 0.02 * seed, 30, alpha=0.0, views=16)
    text = report.recipe_markdown(report.recipe_runs(results))
    assert "interim: 2 of the 3 seeds per arm fixed before the runs (commit abc1234), judged at 3" in text
    assert text.count("interim") == 1  # the 16-view arm has no planned count
    _result(results, 2, 0.92, 0.94, 30)
    text = report.recipe_markdown(report.recipe_runs(results))
    assert "interim: 2 of the 3" in text  # the λ = 0 arm still has 2 seeds
    _result(results, 2, 0.90, 0.84, 30, alpha=0.0)
    text = report.recipe_markdown(report.recipe_runs(results))
    assert "the verdict at the 3 seeds per arm fixed before the runs (commit abc1234): above λ = 0" in text
    decision = report.load_decisions(decisions)[0]
    assert report.verdict(decision, (0.02, 0.03), 3).endswith("zero inside the interval")
    assert report.verdict(None, (0.02, 0.01), 3) == ""  # no planned count: no verdict
    real = report.load_decisions(REPO / "benchmarks" / "decisions.json")  # the 30-epoch 8-view pair, 15 seeds
    assert [(d["seeds_per_arm"], d["arm"]["epochs"], d["arm"]["views"]) for d in real] == [(15, 30, 8)]


def test_per_seed_figures_are_listed_in_seed_order(report, tmp_path):
    for seed in (10, 2, 9):
        _result(tmp_path, seed, 0.92, seed / 100, 30)
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert "| 2.0, 9.0, 10.0 |" in text  # not 10.0, 2.0, 9.0 (the files' order)


@pytest.mark.parametrize("k16_val, chosen", [(0.925, "stored views, distilled, 30 epochs"),
                                             (0.935, "16 stored views, distilled, 30 epochs")])
@pytest.mark.usefixtures("two_seed_rule")
def test_the_recipe_report_reads_other_view_counts_apart_and_prefers_fewer_views(k16_val, chosen, report, tmp_path):
    for seed in (0, 1):
        _result(tmp_path, seed, 0.92, 0.88, 30)
        _result(tmp_path, seed, 0.90, 0.86, 15, views=16)
        _result(tmp_path, seed, 0.88, 0.82 + 0.02 * seed, 15, alpha=0.0, views=16)
        _result(tmp_path, seed, k16_val, 0.90, 30, views=16)
    assert [report.label(arm) for arm in report.recipe_runs(tmp_path)] == [
        "stored views, distilled, 30 epochs", "16 stored views, distilled (T 5, λ 0.9)",
        "16 stored views, from scratch (λ = 0)", "16 stored views, distilled, 30 epochs"]  # fewer views first
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert f"Chosen: **{chosen}**" in text  # same epochs, no mixing: more views must win by 1 pp of validation
    assert "| 16 stored views, from scratch (λ = 0) | 15 | 2 |" in text
    assert "16 stored views, distilled (T 5, λ 0.9), 15 epochs − its λ = 0 twin = +3.0 ± 12.7 pp" in text
    # a result file without its settings is refused, whatever its folder's name seems to say
    stray = tmp_path / "views16" / "distilled-e30-seed0.json"
    stray.parent.mkdir()
    stray.write_text('{"validation": {"accuracy": 0.99}}')
    with pytest.raises(SystemExit, match="no settings block"):
        report.recipe_runs(tmp_path)


@pytest.mark.parametrize("lr_val, chosen", [(0.925, "stored views, distilled, 30 epochs"),
                                            (0.935, "stored views, lr 0.006, distilled, 30 epochs")])
@pytest.mark.usefixtures("two_seed_rule")
def test_the_recipe_report_adopts_another_lr_or_crop_only_when_it_wins_on_validation(lr_val, chosen, report, tmp_path):
    for seed in (0, 1):
        _result(tmp_path, seed, 0.92, 0.88, 30)
        _result(tmp_path, seed, lr_val, 0.90, 30, view_lr=0.006)
        _result(tmp_path, seed, lr_val - 0.001, 0.99, 30, view_scale=0.5)
    assert [report.label(arm) for arm in report.recipe_runs(tmp_path)] == [
        "stored views, distilled, 30 epochs", "stored views, lr 0.006, distilled, 30 epochs",
        "stored views (crop area ≥ 0.5), distilled, 30 epochs"]  # the recipe's lr and crops first
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert f"Chosen: **{chosen}**" in text  # the same cost: a variant must win by 1 pp of validation
    assert "| stored views (crop area ≥ 0.5), distilled, 30 epochs | 30 | 2 |" in text


def test_the_recipe_plot_shows_arms_with_three_seeds_and_pairs_each_with_its_twin(report, tmp_path):
    for seed in (0, 1, 2):
        _result(tmp_path, seed, 0.92, 0.88, 30)
        _result(tmp_path, seed, 0.90, 0.86, 30, alpha=0.0)
        _result(tmp_path, seed, 0.93, 0.89, 60)
        _result(tmp_path, seed, 0.93, 0.89, 60, alpha=0.0)
    _result(tmp_path, 0, 0.95, 0.95, 30, mix="cutmix")  # a one-seed screen: table only
    series = {label: (colour, style) for label, _, colour, style in report.recipe_series(report.recipe_runs(tmp_path))}
    assert list(series) == ["stored views, distilled, 30 epochs", "stored views, from scratch (λ = 0), 30 epochs",
                            "stored views, distilled, 60 epochs", "stored views, from scratch (λ = 0), 60 epochs"]
    (d30, s30, d60, s60) = series.values()
    assert d30 == (s30[0], "-") and s30[1] == "--" and d60[0] == s60[0] != d30[0]


def test_a_one_seed_screen_is_never_chosen_however_high_its_validation(report, tmp_path):
    for seed in (0, 1, 2):
        _result(tmp_path, seed, 0.92, 0.88, 30)
    _result(tmp_path, 0, 0.99, 0.95, 60, views=16)
    assert "Chosen: **stored views, distilled, 30 epochs**" in report.recipe_markdown(report.recipe_runs(tmp_path))
    for seed in (1, 2):  # the screen earned its seeds: now its mean decides
        _result(tmp_path, seed, 0.94, 0.95, 60, views=16)
    assert "Chosen: **16 stored views, distilled, 60 epochs**" in report.recipe_markdown(report.recipe_runs(tmp_path))
