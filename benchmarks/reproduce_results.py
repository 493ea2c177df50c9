"""Reproduce the guide's Beans experiment with several seeds, and study the student's BatchNorm statistics.

    python benchmarks/reproduce_results.py            # full protocol (hours on a 2-core CPU; resumable)
    python benchmarks/reproduce_results.py --quick    # 1 epoch, 1 seed: a smoke check in a few minutes

Steps, each writing its result files under --results (default benchmarks/results/; docs/ keeps only the
tables and plots report_results.py renders from them); a file that exists is not recomputed, and every run
is a kdpipe.train_student.run with resume=True (its checksummed checkpoint after every epoch), so an
interrupted or partial protocol continues where it stopped (also across sessions). Each result file of
steps 2-4 carries a `settings` block (arm_settings: what its arm ran with, from its run.json), which
report_results.py reads; folder and file names only say where a file is.

1. `teacher.json`: cache the teacher over all splits (kdpipe.cache_teacher.run); accuracy, wall time.
2. `guide/<arm>-seed<k>.json`: the guide's setup (train-student --recipe guide: AdamW, lr 5e-5, batch 8,
   linear decay, 30 epochs), arms scratch (alpha 0) and distilled (T 5, alpha 0.5), seeds 0,1,2, each
   under three BatchNorm variants (BN_VARIANTS), one ordinary train-student run per variant:
     - "upstream": momentum 0.997 (transformers' MobileNetV2, i.e. the guide);
     - "momentum0.1": PyTorch's default momentum;
     - "precise": statistics recomputed over the train split before each evaluation (--precise-bn).
   BatchNorm running statistics never influence training (a BN layer in train mode normalises with the
   batch's own statistics, and precise BN runs under fork_rng), so the three runs of a seed train alike
   and differ only in the statistics they evaluate with. The best epoch is chosen per run on validation
   accuracy; its test accuracy is reported. (The files behind docs/results/guide.md came from an earlier
   version that evaluated the three variants side by side in one training run; their settings say so.)
3. `recipe/`: a better recipe within the 30-epoch budget, chosen on validation only, with `kdpipe sweep`
   (kdpipe.sweep). Fixed, with their reasons: RECIPE (batch 32: steadier BatchNorm batch statistics and
   faster per image on CPU; cosine decay with 5% warmup and weight decay 0.05, the usual from-scratch
   AdamW setup; 15 epochs, half the guide's budget, to fit this CPU; the default BatchNorm fix; classifier
   dropout 0.2 instead of MobileNetV2Config's 0.8, a TensorFlow keep-probability read as a drop
   probability, see docs/training.md). Searched: SCREEN (learning rate; KD weight, with
   alpha 0 = the same recipe without the teacher), seed 0: `recipe/screen.json` (+ heatmap). The chosen
   distilled config is the best mean validation accuracy among alpha > 0; then it and its alpha = 0
   twin run seeds 1 and 2 (a second sweep), and `recipe/<arm>-seed<k>.json` holds each run's result.
   Several processes may run this step at once (e.g. two with OMP_NUM_THREADS=1 on a 2-core CPU): the
   sweeps hand each trial to exactly one of them.
4. `views/`: the chosen distilled recipe again, trained on VIEWS stored augmented views per image
   (cache-teacher --views, train-student --views; issue 6), seeds as above: `views/distilled-seed<k>.json`,
   and `views/cache.json` (teacher pass time and storage with views); `--views K` other than 8 writes to
   `views<K>/` (and its own cache and sweeps) instead; likewise `--view-scale x` (smallest crop area) and
   `--view-lr x` (instead of the chosen recipe's) write to `views[<K>]-scale<x>-lr<x>/`, and `--view-mixup a`
   (half the views blended with another image's before the teacher saw them) to `views-mixup<a>/`; `--views 0` runs
   the same arms without views (the plain cache) into `views0/`, the baseline at an equal budget.
   (The folders keep arms that differ apart; what an arm varies is read from its settings block.)
   Also the guide's 30-epoch budget and the alpha = 0 twin of each (VIEW_ARMS).
   Only the seeds without a result file run, so a later session (whose data/ may be gone) completes an arm.
   The runs behind docs/results.md: `--steps views` (every arm, seeds 0-2), then `--seeds 3,4 --view-arms
   distilled-long,scratch-long` (later also `--seeds 5`, `6`, ..., `14`, two processes each), then `--seeds 0,1,2
   --views-long 60 --view-arms distilled-long,scratch-long`;
   one-seed screens: `--seeds 0 --view-arms distilled-long` with `--views 16`, `--view-scale 0.5`, `--view-lr 6e-3`
   (and `--views-long 60 --views 16`, which passed: `--seeds 1,2`); the baseline `--views 0 --views-long 60
   --view-arms distilled-long`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdpipe import cache_teacher, files, logit_store, runtime, sweep, sweep_report, train_student  # noqa: E402
from kdpipe.errors import KdpipeError  # noqa: E402
from kdpipe.config import CacheConfig, SweepConfig, TrainConfig  # noqa: E402
from kdpipe.views import ViewPolicy  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
ARMS = {"scratch": {"alpha": 0.0}, "distilled": {"alpha": 0.5, "temperature": 5.0}}
GUIDE = {"recipe": "guide"}  # the guide's setup (AdamW, lr 5e-5, batch 8, linear decay); tests shrink it
# step 2's BatchNorm variants, each a TrainConfig of its own (momentum 0.1 under precise BN: as these ran, when it was
# the default)
BN_VARIANTS = {"upstream": {"bn_momentum": 0.997}, "momentum0.1": {"bn_momentum": 0.1},
               "precise": {"precise_bn": True, "bn_momentum": 0.1}}
RECIPE = {"batch_size": 32, "schedule": "cosine", "warmup_ratio": 0.05, "weight_decay": 0.05, "epochs": 15,
          "temperature": 5.0, "student_config": {"classifier_dropout_prob": 0.2}}
SCREEN = {"lr": "1e-3,3e-3", "alpha": "0,0.5,0.9"}
SEEDS = [0, 1, 2]  # every arm's first seeds; more are added per arm with --seeds
VIEWS = 8  # per train image, besides the image itself: in 15 epochs each view is used once or twice
VIEW_SCALE = ViewPolicy().scale[0]  # smallest crop area of a view, as a fraction of the image (cache-teacher's)
# step 4's arms, one sweep each, in the order they are started: the chosen distilled recipe on views; the same
# with the guide's full 30-epoch budget (a "patient" teacher, Beyer et al. 2022; --views-long sets the epochs,
# 0 skips it); the alpha = 0 twin of each (the same augmentation without a teacher). Which distilled budget
# is reported is chosen on validation (benchmarks/report_results.py).
# (CutMix of the stored views was a further arm, screened and dropped on validation; train-student's batch-level
# --mix has since been removed, and its result file stays in benchmarks/results/views/.)
VIEW_ARMS = {"distilled": {}, "distilled-long": {}, "scratch": {"alpha": 0.0}, "scratch-long": {"alpha": 0.0}}


def print_epoch(record: dict) -> None:
    """train_student.run's on_epoch callback: one line per finished epoch."""
    print(f"  epoch {record['epoch']:>2}  loss {record['train']['loss']:.4f}  val acc "
          f"{record['validation']['accuracy']:.3f}  ({record['train_time_s']:.0f} s train)", flush=True)


def guide(args, cache: Path) -> None:
    """Step 2: each arm and seed under the three BatchNorm variants, one train-student run each; a run cut
    short continues from its last checkpoint (resume=True), a finished one returns its report."""
    for seed in args.seed_list:
        for arm, overrides in ARMS.items():
            path = args.results / "guide" / f"{arm}-seed{seed}.json"
            if path.exists():
                print(f"{path} exists: skipped")
                continue
            summary = {}
            for variant, bn in BN_VARIANTS.items():
                print(f"{arm} seed {seed}, BatchNorm {variant}: {args.epochs} epochs", flush=True)
                cfg = TrainConfig(cache=cache, seed=seed, epochs=args.epochs, resume=True,
                                  out=args.work / "runs" / f"guide-{arm}-{variant}-seed{seed}",
                                  **{**GUIDE, **overrides, **bn})
                summary[variant] = run_record(train_student.run(cfg, on_epoch=print_epoch))
            write_json(path, {"settings": {"step": "guide", "arm": arm, "seed": seed, "epochs": args.epochs,
                                           "bn_variants": "separate runs"}, "summary": summary})
            print(f"wrote {path}", flush=True)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, obj, indent=1)


def sweep_to_the_end(cfg: SweepConfig):
    """Work on the sweep, then wait for the trials other processes hold (a dead one's trial is taken
    over by sweep.run); returns the folder and its summary once every trial has finished."""
    while True:
        out = sweep.run(cfg)
        summary = sweep_report.build(out)
        if not summary.counts.get("running"):
            return out, summary
        time.sleep(30)


def run_record(r: train_student.RunReport, **extra) -> dict:
    """A finished train-student run as a result file: `extra` (the settings block first), its best epoch's
    scores, the validation curve, its cost, and run.json (config, provenance, versions)."""
    return {**extra, "run_dir": str(r.out), "best_epoch": r.best_epoch, "validation": r.validation, "test": r.test,
            "validation_accuracy_per_epoch": [e["validation"]["accuracy"] for e in r.history],
            "wall_time_s": r.wall_time_s, "train_time_s": round(sum(e["train_time_s"] for e in r.history), 2),
            "train_images_per_s": r.run["train_images_per_s"], "run": r.run}


def arm_settings(step: str, run: dict, recipe_lr: float, recipe_epochs: int) -> dict:
    """What a recipe or views run trained with, read from its run.json (its config, and the stored views of
    the cache it trained on): report_results groups, labels, orders and chooses arms by this block, never by
    a folder or file name. None marks the protocol's own crops (VIEW_SCALE) and learning rate (the chosen
    recipe's); temperature is None at alpha 0, where it changes nothing."""
    cfg, stored = run["config"], run["consistency"]["stored_views"] or {}
    policy = stored.get("policy", {})
    scale = policy.get("scale", [VIEW_SCALE])[0]
    return {"step": step, "views": stored.get("views", 0), "view_scale": None if scale == VIEW_SCALE else scale,
            "view_mixup": policy.get("mixup", 0.0), "view_lr": None if cfg["lr"] == recipe_lr else cfg["lr"],
            "epochs": cfg["epochs"], "recipe_epochs": recipe_epochs, "mix": "none",  # batch-level --mix is gone
            "alpha": cfg["alpha"], "temperature": cfg["temperature"] if cfg["alpha"] else None, "seed": cfg["seed"]}


def recipe(args, cache: Path) -> None:
    """Step 3: screen on validation (seed 0), then the chosen config and its alpha = 0 twin on more seeds."""
    results, work = args.results / "recipe", args.work / "sweeps"
    base = TrainConfig(cache=cache, **{**RECIPE, "epochs": args.recipe_epochs or RECIPE["epochs"]})
    screen, summary = sweep_to_the_end(SweepConfig(train=base, space=SCREEN, seeds=[0], out=work / "recipe-screen"))
    write_json(results / "screen.json", sweep_report.to_dict(summary))
    if (screen / "heatmap.png").exists():
        (results / "screen.png").write_bytes((screen / "heatmap.png").read_bytes())
    chosen = next(r for r in summary.rows if r.params["alpha"] > 0)  # best mean validation accuracy
    print(f"chosen on validation: {chosen.key} ({chosen.val_mean:.3f})", flush=True)
    more = [s for s in args.seed_list if s != 0]
    fixed = TrainConfig(**{**base.to_dict(), "cache": cache, "lr": chosen.params["lr"]})
    final, _ = sweep_to_the_end(SweepConfig(train=fixed, space={"alpha": f"0,{chosen.params['alpha']}"}, seeds=more,
                                            out=work / "recipe-seeds"))
    for arm, alpha in (("scratch", 0.0), ("distilled", chosen.params["alpha"])):
        params = {**chosen.params, "alpha": alpha}
        for seed in args.seed_list:
            run_dir = (screen / "runs" / f"{sweep.config_key(params)}-seed{seed}" if seed == 0 else
                       final / "runs" / f"{sweep.config_key({'alpha': alpha})}-seed{seed}")
            r = train_student.load_report(run_dir)
            write_json(results / f"{arm}-seed{seed}.json", run_record(
                r, settings=arm_settings("recipe", r.run, chosen.params["lr"], base.epochs), arm=arm, seed=seed))
    print(f"wrote {results}", flush=True)


def chosen_recipe(args) -> dict:
    screen = json.loads((args.results / "recipe" / "screen.json").read_text())
    best = max((c for c in screen["configs"] if c["params"]["alpha"] > 0), key=lambda c: (c["val_mean"], c["config"]))
    return best["params"]


def cache_when_free(cfg: CacheConfig):
    """cache_teacher.run, waiting while another process of this script writes the same folder."""
    while True:
        try:
            return cache_teacher.run(cfg)
        except KdpipeError as e:
            if "being written by another" not in str(e):
                raise
            time.sleep(10)


def views_folder(k: int, scale: float = VIEW_SCALE, lr: float | None = None, mixup: float = 0.0) -> str:
    """Where the views step keeps results: views/ for the default VIEWS stored views per image, crop area
    and learning rate (the runs behind docs/results.md); views<k>/ for another k, then -scale<min> for
    another smallest crop area, -mixup<a> for views blended before the teacher saw them, and -lr<lr> for
    a learning rate other than the chosen recipe's, so arms that differ in any of these never mix (a
    name only: report_results reads each file's settings block)."""
    return ("views" if k == VIEWS else f"views{k}") + _cache_tag(scale, mixup) + (f"-lr{lr:g}" if lr else "")


def _cache_tag(scale: float, mixup: float) -> str:
    """'-scale<x>' for a smallest crop area other than VIEW_SCALE and '-mixup<a>' for mixed views: what
    changes the cache, in result, sweep and cache folder names."""
    return (f"-scale{scale:g}" if scale != VIEW_SCALE else "") + (f"-mixup{mixup:g}" if mixup else "")


def views_step(args, teacher: str, dataset: str) -> None:
    """Step 4: the chosen recipe on stored augmented views, one sweep per arm (VIEW_ARMS). All are
    started before any is waited for, so parallel processes of this script never sit idle."""
    folder = views_folder(args.views, args.view_scale, args.view_lr, args.view_mixup)
    cache = args.work / f"cache-views{args.views}{_cache_tag(args.view_scale, args.view_mixup)}"  # not the lr
    results = args.results / folder
    t0 = time.perf_counter()
    policy = ViewPolicy(scale=(args.view_scale, 1.0), mixup=args.view_mixup)
    reports = cache_when_free(CacheConfig(teacher=teacher, dataset=dataset, out=cache, views=args.views,
                                          augment=policy))
    if not (results / "cache.json").exists() and not all(r.reused for r in reports):
        write_json(results / "cache.json", {
            "views": args.views, "wall_time_s": round(time.perf_counter() - t0, 1),
            "splits": {r.split: {"rows": r.rows, "bytes": r.bytes, "teacher_accuracy_view0": r.accuracy,
                                 **{k: v for k, v in logit_store.read_meta(r.path).items()
                                    if k in ("views", "views_teacher_accuracy", "teacher_inputs_per_s",
                                             "wall_time_s", "augment")}} for r in reports}})
    chosen = chosen_recipe(args)
    params = {**chosen, **({"lr": args.view_lr} if args.view_lr else {})}
    epochs = args.recipe_epochs or RECIPE["epochs"]
    base = TrainConfig(cache=cache, views=args.views > 0, **{**RECIPE, "epochs": epochs}, **params)
    sweeps = {}  # arm -> sweep over the seeds that have no result file yet (run folders may be gone)
    for arm, overrides in VIEW_ARMS.items():
        if arm not in args.view_arms:
            continue
        if arm.endswith("-long"):
            if not args.views_long:
                continue
            arm, overrides = arm.replace("long", f"e{args.views_long}"), {**overrides, "epochs": args.views_long}
        seeds = [s for s in args.seed_list if not (results / f"{arm}-seed{s}.json").exists()]
        if not seeds:
            continue
        name = {"distilled": folder}.get(arm, f"{folder}-{arm.removeprefix('distilled-')}")
        if seeds != SEEDS:  # a sweep folder holds one set of seeds: another set (or what is left of one) gets its own
            name += "-seeds" + "_".join(map(str, seeds))
        sweeps[arm] = SweepConfig(train=dataclasses.replace(base, **overrides), seeds=seeds,
                                  out=args.work / "sweeps" / name)
    for cfg in sweeps.values():
        sweep.run(cfg)  # take whatever trial is free in each sweep before waiting on any
    for arm, cfg in sweeps.items():
        out, _ = sweep_to_the_end(cfg)
        for seed in cfg.seeds:
            r = train_student.load_report(out / "runs" / f"base-seed{seed}")
            write_json(results / f"{arm}-seed{seed}.json", run_record(
                r, settings=arm_settings("views", r.run, chosen["lr"], epochs), arm=f"{arm}+views", seed=seed))
    print(f"wrote {results}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, results under /tmp")
    p.add_argument("--dataset", default=str(SHARED / "beans"))
    p.add_argument("--teacher", default=str(SHARED / "teachers" / "beans-efficientnet-lite0"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"),
                   help="result files; report_results.py renders the tables docs/ cite from them")
    p.add_argument("--work", type=Path, default=Path("data/reproduce"), help="caches and run folders")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--epochs", type=int, default=30, help="guide step")
    p.add_argument("--recipe-epochs", type=int, default=None, help=f"recipe step (default {RECIPE['epochs']})")
    p.add_argument("--steps", default="teacher,guide,recipe,views", help="which steps to run, comma-separated")
    p.add_argument("--views", type=int, default=VIEWS,
                   help="views step: stored views per train image; 0 = the same arms without views (views0/)")
    p.add_argument("--views-long", type=int, default=30, help="views step: epochs of the longer distilled run")
    p.add_argument("--view-scale", type=float, default=VIEW_SCALE,
                   help="views step: smallest crop area (fraction of the image); another value writes views-scale<x>/")
    p.add_argument("--view-mixup", type=float, default=0.0,
                   help="views step: blend half the views with another image's before the teacher sees them, "
                        "share ~ Beta(a, a) (cache-teacher --view-mixup); writes views-mixup<a>/")
    p.add_argument("--view-lr", type=float, default=None,
                   help="views step: learning rate instead of the chosen recipe's; writes views-lr<x>/")
    p.add_argument("--view-arms", default=",".join(VIEW_ARMS), help="views step: which arms, comma-separated")
    args = p.parse_args()
    args.view_arms = set(args.view_arms.split(","))
    if args.view_arms - set(VIEW_ARMS):
        p.error(f"--view-arms: unknown {', '.join(sorted(args.view_arms - set(VIEW_ARMS)))}; "
                f"choose from {', '.join(VIEW_ARMS)}")
    if args.quick:
        args.results, args.seeds, args.epochs, args.recipe_epochs = Path("/tmp/kdpipe-quick/results"), "0,1", 1, 1
        args.views, args.views_long = 1, 2
        args.work = Path("/tmp/kdpipe-quick/work")
    args.seed_list = [int(x) for x in args.seeds.split(",")]
    steps = set(args.steps.split(","))
    cache = args.work / "cache"
    teacher_file = args.results / "teacher.json"
    if "teacher" not in steps:
        pass
    elif not teacher_file.exists():
        t0 = time.perf_counter()
        reports = cache_teacher.run(CacheConfig(teacher=args.teacher, dataset=args.dataset, out=cache, force=True))
        write_json(teacher_file, {
            "teacher": args.teacher, "dataset": args.dataset, "wall_time_s": round(time.perf_counter() - t0, 1),
            "machine": {"platform": platform.platform(), "device": runtime.describe(torch.device("cpu"))},
            "splits": {r.split: {"rows": r.rows, "accuracy": r.accuracy, "images_per_s": r.images_per_s,
                                 "bytes": r.bytes} for r in reports}})
    else:
        cache_teacher.run(CacheConfig(teacher=args.teacher, dataset=args.dataset, out=cache))  # reuses it
    if teacher_file.exists():
        print(json.loads(teacher_file.read_text()))
    if "guide" in steps:
        guide(args, cache)
    if "recipe" in steps:
        recipe(args, cache)
    if "views" in steps:
        views_step(args, args.teacher, args.dataset)


if __name__ == "__main__":
    main()
