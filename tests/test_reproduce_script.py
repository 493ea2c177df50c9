"""benchmarks/reproduce_results.py, tiny: one training run yields three BN variants, and a run cut short
resumes to the same records as an uninterrupted one."""

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


def _cfg(cache_dir, out):
    return tiny_train_config(cache=cache_dir, epochs=3, bn_momentum=1.0, alpha=0.5, out=out, resume=True)


def test_a_run_cut_short_resumes_to_the_same_records(reproduce, cache_dir, tmp_path, monkeypatch):
    full = reproduce.run_with_bn_variants(_cfg(cache_dir, tmp_path / "full"))
    assert set(full["summary"]) == {"upstream", "momentum0.1", "precise"} and len(full["epochs"]) == 3

    class Cut(Exception):
        pass

    real_save = reproduce.save_state

    def save_then_cut(s, shadow, epochs, elapsed, path):
        real_save(s, shadow, epochs, elapsed, path)
        if len(epochs) == 2:
            raise Cut

    monkeypatch.setattr(reproduce, "save_state", save_then_cut)
    with pytest.raises(Cut):
        reproduce.run_with_bn_variants(_cfg(cache_dir, tmp_path / "cut"))
    monkeypatch.undo()
    resumed = reproduce.run_with_bn_variants(_cfg(cache_dir, tmp_path / "cut"))
    for a, b in zip(full["epochs"], resumed["epochs"]):
        assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=1e-5)
        for variant in a["variants"]:
            assert a["variants"][variant]["validation"]["accuracy"] == b["variants"][variant]["validation"]["accuracy"]
            assert a["variants"][variant]["test"]["kl_to_teacher"] == pytest.approx(
                b["variants"][variant]["test"]["kl_to_teacher"], rel=1e-4)


def test_the_report_tabulates_finished_runs(reproduce, report, cache_dir, tmp_path):
    results = tmp_path / "results"
    for arm, alpha in (("scratch", 0.0), ("distilled", 0.5)):
        for seed in (0, 1):
            cfg = tiny_train_config(cache=cache_dir, epochs=2, bn_momentum=1.0, alpha=alpha, seed=seed,
                                    out=tmp_path / f"{arm}{seed}", resume=True)
            reproduce.write_json(results / "guide" / f"{arm}-seed{seed}.json", reproduce.run_with_bn_variants(cfg))
    assert report.main(["--results", str(results)]) == 0
    text = (results / "guide.md").read_text()
    runs = report.load_runs(results)
    tests = [r["summary"]["precise"]["test"]["accuracy"] for r in runs["distilled"]]
    assert f"| distilled | precise | 2 | {report.pct(tests)} |" in text
    assert text.count("| scratch |") == 3 and (results / "guide.png").stat().st_size > 1000
    assert "runs finished: 4" in text


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
        for arm, alpha, epochs, mix in (("scratch", 0.0, 1, "none"), ("distilled-e2", 0.5, 2, "none"),
                                        ("scratch-e2", 0.0, 2, "none"), ("distilled-cutmix-e2", 0.5, 2, "cutmix"),
                                        ("scratch-cutmix-e2", 0.0, 2, "cutmix")):
            r = json.loads((folder / f"{arm}-seed{seed}.json").read_text())
            assert (r["alpha"], r["epochs"], len(r["validation_accuracy_per_epoch"])) == (alpha, epochs, epochs)
            assert r["run"]["config"]["views"] and r["run"]["config"]["seed"] == seed
            assert r["run"]["config"]["mix"] == mix

    # a later session without the run folders reruns only the seeds whose result files are missing
    lost = folder / "scratch-e2-seed1.json"
    kept = (folder / "distilled-seed0.json").read_text()
    lost.unlink()
    reproduce.views_step(SimpleNamespace(**{**vars(args), "view_arms": {"distilled", "scratch"}}), str(teacher_dir),
                         str(image_folder))
    assert not lost.exists()  # not among the arms asked for
    reproduce.views_step(args, str(teacher_dir), str(image_folder))
    assert json.loads(lost.read_text())["seed"] == 1 and (args.work / "sweeps" / "views2-scratch-e2-seeds1").is_dir()
    assert (folder / "distilled-seed0.json").read_text() == kept
    # more seeds for an arm later (--seeds 2) get a sweep of their own beside the first seeds' one
    reproduce.views_step(SimpleNamespace(**{**vars(args), "view_arms": {"distilled"}, "seed_list": [2]}),
                         str(teacher_dir), str(image_folder))
    assert json.loads((folder / "distilled-seed2.json").read_text())["seed"] == 2

    # milder crops and another learning rate: their own cache and results, the rest of the recipe unchanged
    varied = SimpleNamespace(**{**vars(args), "view_arms": {"distilled"}, "seed_list": [0], "view_scale": 0.5,
                                "view_lr": 1e-3})
    reproduce.views_step(varied, str(teacher_dir), str(image_folder))
    varied_folder = args.results / "views2-scale0.5-lr0.001"
    config = json.loads((varied_folder / "distilled-seed0.json").read_text())["run"]["config"]
    assert config["lr"] == 1e-3 and config["alpha"] == 0.5 and Path(config["cache"]).name == "cache-views2-scale0.5"
    cache = json.loads((varied_folder / "cache.json").read_text())
    assert cache["splits"]["train"]["augment"]["policy"]["scale"] == [0.5, 1.0]
    assert (folder / "distilled-seed0.json").read_text() == kept

    # --views 0: the same arms on the plain cache, the baseline for views at an equal budget
    plain = SimpleNamespace(**{**vars(args), "views": 0, "view_arms": {"distilled-long"}, "seed_list": [0]})
    reproduce.views_step(plain, str(teacher_dir), str(image_folder))
    r = json.loads((args.results / "views0" / "distilled-e2-seed0.json").read_text())
    assert not r["run"]["config"]["views"] and (r["alpha"], r["epochs"]) == (0.5, 2)
    assert json.loads((args.results / "views0" / "cache.json").read_text())["splits"]["train"]["views"] == 1

    # mixed views: their own cache (blended views stored) and results; both arms train on them
    mixed = SimpleNamespace(**{**vars(args), "view_arms": {"distilled", "scratch"}, "seed_list": [0],
                               "view_mixup": 1.0})
    reproduce.views_step(mixed, str(teacher_dir), str(image_folder))
    for arm, alpha in (("distilled", 0.5), ("scratch", 0.0)):
        config = json.loads((args.results / "views2-mixup1" / f"{arm}-seed0.json").read_text())["run"]["config"]
        assert Path(config["cache"]).name == "cache-views2-mixup1" and config["views"] and config["alpha"] == alpha
    from kdpipe import logit_store

    train = logit_store.read_split(args.work / "cache-views2-mixup1" / "train.parquet")
    assert train.meta["augment"]["policy"]["mixup"] == 1.0 and (train.mixes.weights > 0).any()


@pytest.mark.parametrize("k, scale, lr, mixup", [(8, 0.25, None, 0), (16, 0.25, None, 0), (8, 0.5, None, 0),
                                                 (8, 0.25, 6e-3, 0), (16, 0.35, 1e-4, 0), (0, 0.25, None, 0),
                                                 (8, 0.25, None, 1.0), (16, 0.5, 1e-3, 0.4)])
def test_a_views_folder_name_reads_back_as_what_it_varies(k, scale, lr, mixup, reproduce, report):
    folder = reproduce.views_folder(k, scale, lr, mixup)
    assert report.view_variant(folder) == {"views": k, "scale": None if scale == 0.25 else scale,
                                           "mixup": mixup or None, "lr": lr}
    assert (f"(mixup {mixup:g})" in report._views_label(folder)) == bool(mixup)
    assert report.view_variant(folder + "x") is None


@pytest.fixture
def two_seed_rule(report, monkeypatch):
    """The choice rule's comparisons on two seeds per arm (its real minimum is report.CHOICE_SEEDS = 3)."""
    monkeypatch.setattr(report, "CHOICE_SEEDS", 2)


def _result(folder, arm, seed, val, test, epochs, root):
    import json

    path = root / folder / f"{arm}-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": seed, "validation": {"accuracy": val},
                                "test": {"accuracy": test, "teacher_agreement": test},
                                "validation_accuracy_per_epoch": [val] * epochs, "wall_time_s": 60.0}))


@pytest.mark.parametrize("long_val, chosen", [(0.905, "15 epochs"), (0.92, "30 epochs")])
@pytest.mark.usefixtures("two_seed_rule")
def test_the_recipe_report_chooses_the_views_budget_on_validation(long_val, chosen, report, tmp_path):
    for seed, (a, b) in enumerate(((0.90, 0.80), (0.90, 0.84))):
        _result("views", "distilled", seed, 0.90, a, 15, tmp_path)
        _result("views", "scratch", seed, 0.85, b, 15, tmp_path)
        _result("views", "distilled-e30", seed, long_val, a + 0.05, 30, tmp_path)
        _result("views", "scratch-e30", seed, 0.85, b + 0.02, 30, tmp_path)
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
        _result("views", "distilled-e30", seed, 0.92, 0.88, 30, tmp_path)
        _result("views", "scratch-e30", seed, 0.90, 0.86 + 0.02 * seed, 30, tmp_path)
        _result("views", "distilled-cutmix-e30", seed, mix_val, 0.90, 30, tmp_path)
        _result("views", "scratch-cutmix-e30", seed, 0.90, 0.80 + 0.02 * seed, 30, tmp_path)
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert f"Chosen: **{chosen}**" in text  # same epochs: the mix must win by 1 pp of validation accuracy
    assert "| stored views + cutmix, from scratch (λ = 0), 30 epochs | 30 | 2 |" in text
    twin_gap = "+9.0 ± 12.7 pp" if "cutmix" in chosen else "+1.0 ± 12.7 pp"  # each against its own twin
    assert f"{chosen} (chosen) − its λ = 0 twin = {twin_gap}" in text


@pytest.mark.usefixtures("two_seed_rule")
def test_the_recipe_report_compares_a_budget_only_with_the_same_budget(report, tmp_path):
    for seed in (0, 1):
        _result("recipe", "distilled", seed, 0.90, 0.86 + 0.02 * seed, 15, tmp_path)
        _result("views", "distilled-e30", seed, 0.92, 0.88, 30, tmp_path)
        _result("views", "scratch-e30", seed, 0.90, 0.84 + 0.02 * seed, 30, tmp_path)
        _result("views", "distilled-e60", seed, 0.94, 0.90 + 0.02 * seed, 60, tmp_path)  # no alpha = 0 twin
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert "Chosen: **stored views, distilled, 60 epochs**" in text
    assert "(chosen) −" not in text  # the 60-epoch arm has no twin: not compared with a shorter one
    assert "stored views, distilled, 30 epochs − its λ = 0 twin = +3.0 ± 12.7 pp" in text
    assert ("Views against no views, both distilled: stored views, distilled, 60 epochs − no views, distilled "
            "(T 5, λ 0.9), 15 epochs = +4.0 ± 6.1 pp") in text  # Welch: 2 degrees of freedom, t = 4.30
    # once the same budget has run without views (--views 0), views are judged against that instead
    for seed in (0, 1):
        _result("views0", "distilled-e60", seed, 0.99, 0.84 + 0.02 * seed, 60, tmp_path)
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
        _result("views", "distilled-e30", seed, 0.92, 0.90 + 0.02 * seed, 30, tmp_path)
        _result("views", "scratch-e30", seed, 0.90, 0.88 + 0.02 * seed, 30, tmp_path)
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert ("twin = +2.0 ± 6.1 pp; paired by seed, +2.0 ± 0.0 pp over 2 seeds; 8 seeds per arm would separate "
            "such a gap from zero (80 % power)") in text  # each seed gains exactly 2 pp: no spread when paired


def test_a_gap_with_a_planned_seed_count_is_judged_only_at_that_count(report, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "VERDICTS", {("views", "distilled-e30"): (3, "abc1234")})
    for seed in (0, 1):
        _result("views", "distilled-e30", seed, 0.92, 0.90 + 0.02 * seed, 30, tmp_path)
        _result("views", "scratch-e30", seed, 0.90, 0.80 + 0.02 * seed, 30, tmp_path)
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert "interim: 2 of the 3 seeds per arm fixed before the runs (commit abc1234), judged at 3" in text
    _result("views", "distilled-e30", 2, 0.92, 0.94, 30, tmp_path)
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert "interim: 2 of the 3" in text  # the λ = 0 arm still has 2 seeds
    _result("views", "scratch-e30", 2, 0.90, 0.84, 30, tmp_path)
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert "the verdict at the 3 seeds per arm fixed before the runs (commit abc1234): above λ = 0" in text
    assert report.verdict(("views", "distilled-e30"), (0.02, 0.03), 3).endswith("zero inside the interval")
    assert report.verdict(("views", "distilled-e60"), (0.02, 0.01), 3) == ""  # no planned count: no verdict


def test_per_seed_figures_are_listed_in_seed_order(report, tmp_path):
    for seed in (10, 2, 9):
        _result("views", "distilled-e30", seed, 0.92, seed / 100, 30, tmp_path)
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert "| 2.0, 9.0, 10.0 |" in text  # not 10.0, 2.0, 9.0 (the files' name order)


@pytest.mark.parametrize("k16_val, chosen", [(0.925, "stored views, distilled, 30 epochs"),
                                             (0.935, "16 stored views, distilled, 30 epochs")])
@pytest.mark.usefixtures("two_seed_rule")
def test_the_recipe_report_reads_other_view_counts_apart_and_prefers_fewer_views(k16_val, chosen, report, tmp_path):
    for seed in (0, 1):
        _result("views", "distilled-e30", seed, 0.92, 0.88, 30, tmp_path)
        _result("views16", "distilled", seed, 0.90, 0.86, 15, tmp_path)
        _result("views16", "scratch", seed, 0.88, 0.82 + 0.02 * seed, 15, tmp_path)
        _result("views16", "distilled-e30", seed, k16_val, 0.90, 30, tmp_path)
        _result("views16x", "distilled-e30", seed, 0.99, 0.99, 30, tmp_path)  # not a views folder: ignored
    assert report.view_folders(tmp_path) == {"views": 8, "views16": 16}
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert f"Chosen: **{chosen}**" in text  # same epochs, no mixing: more views must win by 1 pp of validation
    assert "| 16 stored views, from scratch (λ = 0) | 15 | 2 |" in text and "99.0" not in text
    assert "16 stored views, distilled, 15 epochs − its λ = 0 twin = +3.0 ± 12.7 pp" in text


@pytest.mark.parametrize("lr_val, chosen", [(0.925, "stored views, distilled, 30 epochs"),
                                            (0.935, "stored views, lr 0.006, distilled, 30 epochs")])
@pytest.mark.usefixtures("two_seed_rule")
def test_the_recipe_report_adopts_another_lr_or_crop_only_when_it_wins_on_validation(lr_val, chosen, report, tmp_path):
    for seed in (0, 1):
        _result("views", "distilled-e30", seed, 0.92, 0.88, 30, tmp_path)
        _result("views-lr0.006", "distilled-e30", seed, lr_val, 0.90, 30, tmp_path)
        _result("views-scale0.5", "distilled-e30", seed, lr_val - 0.001, 0.99, 30, tmp_path)
    assert list(report.view_folders(tmp_path)) == ["views", "views-lr0.006", "views-scale0.5"]
    text = report.recipe_markdown(report.recipe_runs(tmp_path))
    assert f"Chosen: **{chosen}**" in text  # the same cost: a variant must win by 1 pp of validation
    assert "| stored views (crop area ≥ 0.5), distilled, 30 epochs | 30 | 2 |" in text


def test_the_recipe_plot_shows_arms_with_three_seeds_and_pairs_each_with_its_twin(report, tmp_path):
    for seed in (0, 1, 2):
        _result("views", "distilled-e30", seed, 0.92, 0.88, 30, tmp_path)
        _result("views", "scratch-e30", seed, 0.90, 0.86, 30, tmp_path)
        _result("views", "distilled-e60", seed, 0.93, 0.89, 60, tmp_path)
        _result("views", "scratch-e60", seed, 0.93, 0.89, 60, tmp_path)
    _result("views", "distilled-cutmix-e30", 0, 0.95, 0.95, 30, tmp_path)  # a one-seed screen: table only
    series = {label: (colour, style) for label, _, colour, style in report.recipe_series(report.recipe_runs(tmp_path))}
    assert list(series) == ["stored views, distilled, 30 epochs", "stored views, from scratch (λ = 0), 30 epochs",
                            "stored views, distilled, 60 epochs", "stored views, from scratch (λ = 0), 60 epochs"]
    (d30, s30, d60, s60) = series.values()
    assert d30 == (s30[0], "-") and s30[1] == "--" and d60[0] == s60[0] != d30[0]


def test_a_one_seed_screen_is_never_chosen_however_high_its_validation(report, tmp_path):
    for seed in (0, 1, 2):
        _result("views", "distilled-e30", seed, 0.92, 0.88, 30, tmp_path)
    _result("views16", "distilled-e60", 0, 0.99, 0.95, 60, tmp_path)
    assert "Chosen: **stored views, distilled, 30 epochs**" in report.recipe_markdown(report.recipe_runs(tmp_path))
    for seed in (1, 2):  # the screen earned its seeds: now its mean decides
        _result("views16", "distilled-e60", seed, 0.94, 0.95, 60, tmp_path)
    assert "Chosen: **16 stored views, distilled, 60 epochs**" in report.recipe_markdown(report.recipe_runs(tmp_path))
