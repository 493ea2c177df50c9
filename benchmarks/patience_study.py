"""The patience study (issue 25): does the teacher's gain over its λ = 0 twin open when the student trains
longer, on a fresh view of every image every epoch?

    python benchmarks/patience_study.py                  # the full plan on real Beans (days on a 2-core CPU)
    python benchmarks/patience_study.py --plan-only      # write the plan and stop
    python benchmarks/patience_study.py --status         # what is done, what is running, what is left
    python benchmarks/patience_study.py --summary        # an interim report from the runs done so far
    python benchmarks/patience_study.py --hours 2.5      # start only the runs that finish in 2.5 hours

One resumable command: every step writes its result files atomically and skips what exists, caches resume
mid-split (cache_teacher's journal) and runs resume from their last epoch (train-student --resume), so
rerunning the same command after a kill, or in a later session, continues where it stopped. Two copies of
the command may run side by side (one per core, `OMP_NUM_THREADS=1`): each step's folder lock is its claim, a
step another copy is writing is skipped, and a step that needs it (a cache, a screened size) waits for it.

0. `plan.json`, written once before any run: epochs E (default 30, 100, 300), arms, seeds (>= 3, paired:
   a seed fixes a run's initial weights, batch order, views and dropout in every arm), K = max(E) - 1 views
   per train image (at least 1; K + 1 >= E: no view is used twice, views.epoch_views), the view policy, the recipe,
   the student resolutions to screen. A rerun with other settings is refused: the plan, seed count
   included, is fixed before the runs. A plan may gain settings it did not have, logged under `amendments`
   (the loss arms on 2026-12-03, and --more-seeds, more paired seeds for one pair at E = 300, on 2026-12-04,
   each before its runs); it never changes one it has.
1. `cache-<views>.json`: stage one once per view set over N x (K + 1) train views (`plain`: crops and flips;
   `mixed`: a share --view-mixup-p of them blended with another image's view before the teacher saw
   them, function matching); evaluation splits un-augmented. Its cost: seconds and teacher inputs/s. The
   finished split files are kept in `<results>/caches/<views>/` (tens of bytes per view, committed with the
   results) and a fresh checkout restores them: the teacher pass is paid once per plan, not per machine.
2. `screen.json` (with more than one --sizes): the student's resolution, chosen on validation accuracy of
   the function-matching arm at the smallest E, first seed, by the one-standard-error rule (the smallest
   size within one binomial standard error of the best: `choose_size`); fixed before the curve's runs, which read that
   arm, E and seed back from the screen's run at the chosen size instead of training it again. Each size's
   record, `screen/px<size>.json`, is written as its run ends, so a fresh checkout keeps finished sizes.
3. `E<e>/<arm>-seed<s>.json`: every arm at every E and seed, `kdpipe.train_student.run` (the one training
   loop), best epoch chosen on validation, test read for it. ARMS:
     fm        function matching: alpha 1 (pure distillation, labels unused), T 1, mixed views
     fm-twin   its λ = 0 twin: the same mixed views and budget (CE on each blend's label mixture)
     recipe    the recipe's alpha 0.9, T 5, plain views (docs/views.md)
     recipe-twin  its λ = 0 twin on the same plain views and budget
   and, only at --loss-epochs (default 100: issue 29, the other losses at the recipe's budget), LOSS_ARMS:
     dkd, dist, kd-std  the recipe with DKD, DIST or standardised KD in place of Hinton's KD (the recipe is the
                  kd arm), each paired with recipe-twin
   Runs go point by point (E ascending), so the loss arms at E = 100 come before the runs at E = 300.
   With --hours H a copy starts (or resumes) a run only if the epochs it lacks fit in what is left of H, at
   the median pace (wall seconds an epoch) of the finished runs at this size on this kind of machine, thread
   count included (a run resumed on several machines counts with its epochs on this one): a run folder lives
   in git-ignored --work and is lost with the machine, so a run that cannot finish in a session is left whole
   for a later one instead of being cut off.
4. `summary.json`, `summary.md` (its tables, as docs/results.md shows them) and `curve.png`: per arm and E,
   test and validation accuracy (mean ± 95 % t interval over seeds), teacher agreement on test, and each
   distilled arm minus its twin paired by seed; the teacher's own test and validation accuracy as lines; every
   run in a row of its own (best epoch and the epochs that tie with it on validation, first epoch at 95 %
   validation, mean validation over its epochs, wall minutes, machine and precision); CPU hours per point (CPU
   time of every attempt of its runs, from a ledger each run folder keeps, epoch by epoch, with the attempt's
   machine and its epochs' wall seconds) and the machines and precisions its runs used (a run resumed in a
   later session may finish on another CPU: numerics act as one more seed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdpipe import cache_teacher, files, locking, logit_store, run_folder, runtime, stats, train_student  # noqa: E402
from kdpipe.errors import KdpipeError  # noqa: E402
from kdpipe.config import LOSS_SETTINGS, CacheConfig, TrainConfig  # noqa: E402
from kdpipe.run_folder import RunReport  # noqa: E402
from kdpipe.settings import overrides  # noqa: E402
from kdpipe.views import ViewPolicy  # noqa: E402

SHARED = REPO.parent / "shared"
EPOCHS = (30, 100, 300)
SEEDS = (0, 1, 2)
SIZES = (128, 160, 224)  # student resolutions screened on validation (the teacher sees 224)
RECIPE = {"lr": 3e-3, "batch_size": 32, "schedule": "cosine", "warmup_ratio": 0.05, "weight_decay": 0.05,
          "student_config": {"classifier_dropout_prob": 0.2}}  # docs/views.md's chosen arm, but its epochs
ARMS = {"fm": {"alpha": 1.0, "temperature": 1.0, "views": "mixed"},
        "fm-twin": {"alpha": 0.0, "temperature": 1.0, "views": "mixed", "twin_of": "fm"},
        "recipe": {"alpha": 0.9, "temperature": 5.0, "views": "plain"},
        "recipe-twin": {"alpha": 0.0, "temperature": 5.0, "views": "plain", "twin_of": "recipe"}}
# Issue 29: the other logit-only losses at the recipe's alpha, views and budget, each paired with the recipe's λ = 0
# twin (the recipe itself is the kd arm), only at --loss-epochs; each at the setting the 15-epoch screen
# (docs/results.md §6) chose on validation, or the paper's ImageNet setting where the screen had none.
LOSS_ARMS = {"dkd": {"alpha": 0.9, "temperature": 1.0, "views": "plain", "loss": "dkd", "dkd_beta": 0.5,
                     "twin": "recipe-twin"},  # the screen: beta 0.5, T 1 (ImageNet's) over beta 8, T 5
             "dist": {"alpha": 0.9, "temperature": 1.0, "views": "plain", "loss": "dist", "dist_gamma": 1.0,
                      "twin": "recipe-twin"},  # Huang et al.'s ImageNet setting: beta = gamma = 1, tau 1
             "kd-std": {"alpha": 0.9, "temperature": 2.0, "views": "plain", "standardize": True,
                        "twin": "recipe-twin"}}  # Sun et al.'s base temperature 2
KD_ARM = "recipe"  # the loss arms' reference: the recipe is Hinton's KD with the same views, α and budget
LOSS_EPOCHS = (100,)  # the recipe's best budget on validation (docs/results.md §5)
# Issue 25's "more seeds where the interval needs it, the seed count fixed before the runs": more paired seeds for
# one pair at one point, {E: {"arms", "seeds"}}, added to the plan on 2026-12-04 before any of their runs (why: the
# amendment in plan.json). Three more pairs: at the spread of the first two recipe pairs' gains (+10.9, +3.9 pp, SD
# 4.9) six pairs give a 95 % half-width near 5 pp, three give 12.
MORE_SEEDS = {300: {"arms": ["recipe", "recipe-twin"], "seeds": [3, 4, 5]}}
LEDGER = "cpu_seconds.json"  # in each run folder: CPU seconds per attempt, updated after every epoch
POLL_S = 60  # how often a copy waiting for another copy's step looks again


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, obj, indent=1)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def make_plan(args) -> dict:
    epochs = sorted(args.epoch_list)
    return {"study": "patience", "epochs": epochs, "seeds": args.seed_list, "arms": ARMS,
            "loss_arms": LOSS_ARMS, "loss_epochs": args.loss_epoch_list,
            "more_seeds": {str(e): more for e, more in args.more_seeds.items()},
            "views_per_image": max(epochs[-1], 2), "k": max(epochs[-1] - 1, 1),
            "view_policy": {"mixup": args.view_mixup, "mixup_p": args.view_mixup_p},
            "recipe": {**RECIPE, "batch_size": args.batch_size,
                       "student_config": {**RECIPE["student_config"], **overrides(args.student_config)}},
            "sizes": args.size_list, "screen_rule": "one standard error",
            "dataset": str(args.dataset), "teacher": str(args.teacher), "precision": args.precision,
            "chosen_on": "validation accuracy (best epoch of each run, and the screened resolution); test read once "
                         "per run, for its best epoch"}


def fix_plan(args) -> dict:
    """plan.json as written before the first run; a rerun must ask for the same plan. A plan may gain a setting it
    did not have, or an entry in a setting that maps names to settings (new arms at their own points, more seeds
    at a point: each fixed before its runs, an amendment logged in plan.json); it never changes what it has."""
    path = args.results / "plan.json"
    plan, saved = make_plan(args), read_json(path)
    if saved is None:
        write_json(path, {**plan, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": git_commit()})
        print(f"wrote {path}: the plan, fixed before the runs", flush=True)
        return plan
    new = json.loads(json.dumps(plan))  # as plan.json holds it (string keys, lists)
    differs = sorted(k for k in plan if new[k] != saved.get(k))
    changed = [k for k in differs if k in saved and not _only_gains(saved[k], new[k])]
    if changed:
        raise SystemExit(f"{path} fixed another plan ({', '.join(changed)} differ); rerun with its settings, or "
                         "start a new plan in another --results folder")
    if differs:
        added = [k if k not in saved else f"{k}: {', '.join(e for e in new[k] if e not in saved[k])}" for k in differs]
        amendment = {"added": added, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": git_commit()}
        write_json(path, {**saved, **{k: plan[k] for k in differs},
                          "amendments": [*saved.get("amendments", []), amendment]})
        print(f"amended {path}: added {'; '.join(added)} (fixed before their runs)", flush=True)
    return plan


def _only_gains(old, new) -> bool:
    """Whether `new` is the mapping `old` with entries added, every entry `old` has unchanged."""
    return isinstance(old, dict) and isinstance(new, dict) and all(new.get(k) == v for k, v in old.items())


def arms_at(plan: dict, epochs: int) -> dict:
    """The arms that run at the curve's point E = `epochs`: the curve's own, and the losses' at their points."""
    return {**plan["arms"], **(plan.get("loss_arms", {}) if epochs in plan.get("loss_epochs", []) else {})}


def seeds_of(plan: dict, epochs: int, arm: str) -> list[int]:
    """The seeds `arm` runs at the point E = `epochs`: the plan's, then those an extension (more_seeds) adds."""
    more = plan.get("more_seeds", {}).get(str(epochs), {})
    return [*plan["seeds"], *(more["seeds"] if arm in more.get("arms", []) else [])]


def runs_at(plan: dict, epochs: int) -> list[tuple[str, int]]:
    """Every (arm, seed) of the point E = `epochs`, seed by seed (a pair's two runs one after the other)."""
    arms = arms_at(plan, epochs)
    seeds = dict.fromkeys(seed for arm in arms for seed in seeds_of(plan, epochs, arm))  # the plan's first
    return [(arm, seed) for seed in seeds for arm in arms if seed in seeds_of(plan, epochs, arm)]


def twin_of(arms: dict, arm: str) -> str | None:
    """The λ = 0 twin a distilled arm is measured against (None for a twin itself)."""
    return arms[arm].get("twin") or next((t for t, b in arms.items() if b.get("twin_of") == arm), None)


def unless_claimed(folder: Path, step):
    """step(), or None when another copy of the study holds `folder`'s lock (its claim on the step)."""
    if locking.held(folder):
        return None
    try:
        return step()
    except KdpipeError:
        if locking.held(folder):  # claimed between the look and the step
            return None
        raise


def after_others(folder: Path, step):
    """step() once no other copy holds `folder`'s lock: their finished step is then read back, not redone."""
    while (done := unless_claimed(folder, step)) is None:
        time.sleep(POLL_S)
    return done


def caches_step(args, plan: dict) -> dict:
    """Both caches; a copy skips the one another copy is writing, then waits for it."""
    kinds = ("plain", "mixed")
    outs = {kind: args.work / f"cache-{kind}" for kind in kinds}
    for kind in kinds:
        unless_claimed(outs[kind], lambda: cache_step(args, plan, kind))
    return {kind: after_others(outs[kind], lambda: cache_step(args, plan, kind)) for kind in kinds}


KEPT = "caches"  # under --results: each finished cache's split files, committed with the results


def cache_step(args, plan: dict, kind: str) -> Path:
    """Stage one over the train split's K + 1 views of `kind` (plain | mixed); resumable mid-split. A cache
    kept under --results is restored first and reused (at the precision it was made in, whatever this CPU
    would choose), so a fresh checkout of the repository does not pay the teacher pass again."""
    policy = ViewPolicy(**({"mixup": plan["view_policy"]["mixup"], "mixup_p": plan["view_policy"]["mixup_p"]}
                           if kind == "mixed" else {}))
    out, kept = args.work / f"cache-{kind}", args.results / KEPT / kind
    precision = restore_cache(kept, out) or plan["precision"]
    reports = cache_teacher.run(CacheConfig(teacher=plan["teacher"], dataset=plan["dataset"], out=out,
                                            views=plan["k"], augment=policy, precision=precision,
                                            batch_size=args.teacher_batch_size, device=args.device,
                                            workers=args.workers))
    keep_cache(out, kept)
    record = args.results / f"cache-{kind}.json"
    if read_json(record) is None:
        write_json(record, {"views": kind, "k": plan["k"], "precision": plan["precision"],
                            "finished_on": runtime.describe(runtime.resolve_device(args.device)), "splits": {r.split: {
            "rows": r.rows, "bytes": r.bytes, "bytes_per_row": r.bytes / r.rows, "teacher_accuracy": r.accuracy,
            "seconds": r.seconds, "images_per_s": r.images_per_s, "resumed_images": r.resumed_images,
            "reused": r.reused} for r in reports}})
    return out


def keep_cache(out: Path, kept: Path) -> None:
    """Copy a finished cache's split files to `kept`."""
    copy_missing(out, kept)


def restore_cache(kept: Path, out: Path) -> str | None:
    """Copy the kept split files that `out` lacks into it; the precision they were made in, if any."""
    copied = copy_missing(kept, out)
    return logit_store.read_meta(copied[0])["precision"] if copied else None


def copy_missing(src: Path, dst: Path) -> list[Path]:
    """Copy each of `src`'s split files that `dst` lacks (atomically); every split file `dst` then has from `src`."""
    dst.mkdir(parents=True, exist_ok=True)
    paths = sorted(src.glob("*.parquet"))
    for path in paths:
        if not (dst / path.name).exists():
            with files.replacing(dst / path.name) as tmp:
                shutil.copyfile(path, tmp)
    return [dst / path.name for path in paths]


def train_config(args, plan: dict, caches: dict, arm: str, epochs: int, seed: int, size: int, out: Path) -> TrainConfig:
    a = arms_at(plan, epochs)[arm]
    recipe = plan["recipe"]
    own = {k: a[k] for k in ("loss", *LOSS_SETTINGS) if k in a}  # the loss arms' settings
    return TrainConfig(cache=caches[a["views"]], views=True, alpha=a["alpha"], temperature=a["temperature"], **own,
                       epochs=epochs, seed=seed, out=out, resume=True, precision=plan["precision"], device=args.device,
                       **{k: v for k, v in recipe.items() if k != "student_config"},
                       student_config={**recipe["student_config"], "image_size": size})


def run_once(cfg: TrainConfig) -> RunReport:
    """train_student.run (resuming the run folder), keeping a ledger of every attempt: its CPU seconds, the
    machine it ran on (a run resumed in a later session may continue on another CPU; numerics differ by CPU), and
    its epochs and their wall seconds (the pace of that machine, even when a run spans several)."""
    ledger_path = cfg.out_dir() / LEDGER
    attempt = f"{os.uname().nodename}-{os.getpid()}-{time.time():.0f}"
    machine = runtime.describe(runtime.resolve_device(cfg.device))
    start, epochs, epoch_s = cpu_now(), 0, 0.0

    def on_epoch(epoch_record):
        nonlocal epochs, epoch_s
        epochs, epoch_s = epochs + 1, epoch_s + epoch_record["epoch_time_s"]
        ledger = read_json(ledger_path) or {}
        ledger[attempt] = {"cpu_s": cpu_now() - start, "machine": machine, "epochs": epochs, "epoch_s": epoch_s}
        write_json(ledger_path, ledger)

    return train_student.run(cfg, on_epoch=on_epoch)


def record(report: RunReport, arm: str, seed: int, epochs: int, size: int) -> dict:
    attempts = (read_json(report.out / LEDGER) or {}).values()
    return {"arm": arm, "seed": seed, "epochs": epochs, "size": size, "run_dir": str(report.out),
            "best_epoch": report.best_epoch, "validation": report.validation, "test": report.test,
            "validation_accuracy_per_epoch": [e["validation"]["accuracy"] for e in report.history],
            "wall_time_s": report.wall_time_s, "cpu_s": sum(a["cpu_s"] for a in attempts),
            "machines": sorted({a["machine"] for a in attempts}), "precision": report.run.get("precision"),
            "train_images_per_s": report.run.get("train_images_per_s"),
            "epoch_seconds_by_machine": machine_paces(attempts)}


def machine_paces(attempts) -> dict[str, float]:
    """Wall seconds an epoch on each machine of a run's attempts (those whose ledger counts epochs)."""
    seconds, epochs = defaultdict(float), defaultdict(int)
    for a in attempts:
        if a.get("epochs"):
            seconds[a["machine"]] += a["epoch_s"]
            epochs[a["machine"]] += a["epochs"]
    return {m: seconds[m] / epochs[m] for m in epochs}


SCREENED_ARM = "fm"  # the arm the resolution is screened with, at the smallest E and the first seed


def run_dir(args, plan: dict, arm: str, epochs: int, seed: int, size: int) -> Path:
    """A run's folder. The screen's run at the chosen size is the curve's run of the same arm, E and seed:
    the same config, so the curve reads it back instead of training it twice."""
    if len(plan["sizes"]) > 1 and (arm, epochs, seed) == (SCREENED_ARM, plan["epochs"][0], plan["seeds"][0]):
        return args.work / "screen" / f"{arm}-E{epochs}-px{size}-seed{seed}"
    return args.work / "runs" / f"E{epochs}-{arm}-px{size}-seed{seed}"


SCREEN_RULE = ("the smallest resolution whose validation accuracy is within one standard error of the best "
               "(sqrt(p (1 - p) / n) at the best p): the one-standard-error rule")


def choose_size(validation: dict[int, dict]) -> tuple[int, float]:
    """The screened resolution by the one-standard-error rule (Breiman et al. 1984; Hastie, Tibshirani and
    Friedman, ESL 7.10): one seed on n validation images cannot tell apart sizes closer than the binomial
    standard error of the best, and a larger size costs about (size / 128)^2 times the CPU hours of the whole
    curve, so within that noise the cheaper one is taken. Returns (size, the accuracy it had to reach)."""
    best = max(v["accuracy"] for v in validation.values())
    n = min(v["n"] for v in validation.values())
    floor = best - math.sqrt(best * (1 - best) / n)
    return min(s for s, v in validation.items() if v["accuracy"] >= floor), floor


def screen_step(args, plan: dict, caches: dict) -> int:
    """The student's resolution: the best validation accuracy of the fm arm at the smallest E, first seed."""
    sizes = plan["sizes"]
    if len(sizes) == 1:
        return sizes[0]
    path = args.results / "screen.json"
    done = read_json(path)
    if done is not None:
        return done["chosen"]
    e, seed = plan["epochs"][0], plan["seeds"][0]
    outs = {size: run_dir(args, plan, SCREENED_ARM, e, seed, size) for size in sizes}

    def screen(size):
        def step():
            rec = record(run_once(train_config(args, plan, caches, SCREENED_ARM, e, seed, size, outs[size])),
                         SCREENED_ARM, seed, e, size)
            write_json(screen_record(args, size), rec)
            return rec
        return step

    for size in sizes:
        if not screen_record(args, size).exists():
            unless_claimed(outs[size], screen(size))
    rows = {}
    for size in sizes:  # each size's record, read back or waited for (a finished run returns its saved report)
        rows[str(size)] = read_json(screen_record(args, size)) or after_others(outs[size], screen(size))
        print(f"screen {size} px: validation {rows[str(size)]['validation']['accuracy']:.3f}", flush=True)
    chosen, floor = choose_size({s: rows[str(s)]["validation"] for s in sizes})
    curve = args.results / f"E{e}" / f"{SCREENED_ARM}-seed{seed}.json"  # the same run as the curve's: not twice
    if not curve.exists():
        write_json(curve, rows[str(chosen)])
    write_json(path, {"arm": SCREENED_ARM, "epochs": e, "seed": seed, "runs": rows, "chosen": chosen,
                      "rule": SCREEN_RULE, "floor": floor})
    print(f"student resolution chosen on validation: {chosen} px", flush=True)
    return chosen


def screen_record(args, size: int) -> Path:
    """A screened size's run record, written as soon as the run ends, so a fresh checkout keeps it."""
    return args.results / "screen" / f"px{size}.json"


def curve_step(args, plan: dict, caches: dict, size: int) -> None:
    machine = runtime.describe(runtime.resolve_device(args.device))
    later, pace = [], None  # runs that would not finish in what is left of --hours; this machine's pace
    for e in plan["epochs"]:
        for arm, seed in runs_at(plan, e):
            path = args.results / f"E{e}" / f"{arm}-seed{seed}.json"
            if path.exists():
                continue
            out = run_dir(args, plan, arm, e, seed, size)
            if args.deadline is not None:  # read again before each run: the first one here teaches the pace
                pace = epoch_seconds(args, size, machine)
                need = None if pace is None else (e - len(history(out))) * pace
                if need is None:
                    print("--hours: no run at this size has finished on this kind of machine yet; this one "
                          "starts unsized", flush=True)
                elif need > args.deadline - time.time():  # it would be cut off with the machine: leave it whole
                    later.append(f"E {e} {arm} seed {seed} (~{need / 60:.0f} min)")
                    continue
            print(f"E {e}, {arm}, seed {seed}", flush=True)
            report = unless_claimed(out, lambda: run_once(train_config(args, plan, caches, arm, e, seed, size, out)))
            if report is None:
                print("  another copy of the study is running it", flush=True)
                continue
            write_json(path, record(report, arm, seed, e, size))
    if later:
        print(f"left for a later session ({pace:.0f} s an epoch here, {len(later)} runs longer than what was left of "
              f"--hours): " + ", ".join(later), flush=True)


def epoch_seconds(args, size: int, machine: str) -> float | None:
    """Wall seconds an epoch took in the finished runs at `size` on this kind of machine (thread count included),
    the median over runs; None before the first. It sizes what still fits in --hours. A run that spans several
    machines counts with its epochs on this one; a record from before the ledger counted epochs, only if it ran
    on this machine alone."""
    records = [read_json(p) for p in [*args.results.glob("E*/*.json"), screen_record(args, size)] if p.exists()]
    paces = sorted(pace for r in records if r and r.get("size") == size
                   if (pace := _pace_on(r, machine)) is not None)
    return paces[len(paces) // 2] if paces else None


def _pace_on(record: dict, machine: str) -> float | None:
    if machine in record.get("epoch_seconds_by_machine", {}):
        return record["epoch_seconds_by_machine"][machine]
    if record.get("machines") == [machine]:
        return record["wall_time_s"] / record["epochs"]
    return None


def history(out: Path) -> list[dict]:
    """A run folder's finished epochs (its metrics records; none before the first): a resumed run needs only the rest."""
    return run_folder.read_history(out) if (out / run_folder.METRICS).exists() else []


def summarise(args, plan: dict) -> dict:
    teacher = {}
    for kind in ("plain", "mixed"):
        c = read_json(args.results / f"cache-{kind}.json")
        if c:
            teacher = {s: v["teacher_accuracy"] for s, v in c["splits"].items()}
    points = []
    for e in plan["epochs"]:
        arms = arms_at(plan, e)
        runs = {arm: {} for arm in arms}
        for arm, seed in runs_at(plan, e):
            r = read_json(args.results / f"E{e}" / f"{arm}-seed{seed}.json")
            if r is not None:
                runs[arm][seed] = r
        point = {"epochs": e, "runs": sum(map(len, runs.values())), "planned": len(runs_at(plan, e)),
                 "arms": {}, "gains": {}, "cpu_hours": sum(r["cpu_s"] for by in runs.values()
                                                                       for r in by.values()) / 3600,
                 "wall_hours": sum(r["wall_time_s"] for by in runs.values() for r in by.values()) / 3600,
                 "machines": sorted({m for by in runs.values() for r in by.values() for m in r["machines"]}),
                 "precisions": sorted({r["precision"] for by in runs.values() for r in by.values()})}
        for arm, by in runs.items():
            if not by:
                continue
            row = {"seeds": sorted(by)}
            for split in ("validation", "test"):
                mean, std, half = stats.mean_std_ci([r[split]["accuracy"] for r in by.values()])
                row[split] = {"mean": mean, "std": std, "ci95": half}
            for key in ("teacher_agreement", "kl_to_teacher"):  # how closely the student matches the teacher
                values = [r["test"].get(key) for r in by.values() if r["test"]]
                row[f"test_{key}"] = sum(values) / len(values) if values and None not in values else None
            point["arms"][arm] = row
        for arm in arms:
            twin = twin_of(arms, arm)
            if twin is None or not runs[arm] or not runs[twin]:
                continue
            point["gains"][f"{arm} - {twin}"] = gain = paired_gain(runs[arm], runs[twin])
            first = {a: {s: r for s, r in runs[a].items() if s in plan["seeds"]} for a in (arm, twin)}
            if (own := paired_gain(first[arm], first[twin]))["test"]["pairs"] < gain["test"]["pairs"]:
                point["gains"][f"{arm} - {twin}, the plan's seeds"] = own  # an extension's pairs are in: both shown
        point["every_run"] = [run_row(arm, seed, r) for arm, seed in runs_at(plan, e)
                              if (r := runs[arm].get(seed)) is not None]
        if e in plan.get("loss_epochs", []) and plan.get("loss_arms"):
            point["losses"] = compare_losses(runs, list(plan["loss_arms"]), plan["seeds"])
        points.append(point)
    return {"plan": {k: plan.get(k, {}) for k in ("epochs", "seeds", "k", "more_seeds")}, "teacher_accuracy": teacher,
            "points": points, "student": choose_student(points, plan["seeds"])}


def choose_student(points: list[dict], seeds: list[int]) -> dict | None:
    """The study's student: the (E, arm) with the highest mean validation accuracy over the plan's seeds, among
    those that have every one of them (an extension's seeds do not count: all arms are compared on the same
    seeds); a tie goes to fewer epochs. Its test accuracy is read, never compared. The runner-up shows how close
    the choice was. None until some arm has all the plan's seeds."""
    candidates = []
    for point in points:
        by_arm = defaultdict(dict)
        for row in point.get("every_run", []):
            if row["seed"] in seeds and row["test"] is not None:
                by_arm[row["arm"]][row["seed"]] = row
        for arm, rows in by_arm.items():
            if set(rows) >= set(seeds):
                test = stats.mean_std_ci([rows[s]["test"] for s in seeds])
                candidates.append({"epochs": point["epochs"], "arm": arm, "seeds": list(seeds),
                                   "validation": sum(rows[s]["validation"] for s in seeds) / len(seeds),
                                   "test": {"mean": test[0], "std": test[1], "ci95": test[2]}})
    if not candidates:
        return None
    candidates.sort(key=lambda c: (-round(c["validation"], 9), c["epochs"]))  # round: equal sums, unequal floats
    return {"chosen": candidates[0], "runner_up": candidates[1] if len(candidates) > 1 else None,
            "candidates": len(candidates)}


def paired_gain(arm: dict[int, dict], twin: dict[int, dict]) -> dict:
    """An arm's runs minus its twin's, paired by seed: accuracy, KL to the teacher, and the machines of the pairs."""
    gain = {split: _paired_gap(arm, twin, lambda r: r[split]["accuracy"]) for split in ("validation", "test")}
    gain["kl_to_teacher"] = {split: _paired_gap(arm, twin, lambda r: r[split].get("kl_to_teacher"))
                             for split in ("validation", "test")}
    # exploratory, added after E = 100 (not in the plan): how fast, not how far: the mean validation accuracy
    # over a run's epochs (the area under its validation curve over E), paired by seed
    gain["validation_curve_mean"] = _paired_gap(arm, twin, _curve_mean)
    paired = [by[s] for by in (arm, twin) for s in sorted(arm.keys() & twin.keys())]
    gain["machines"] = sorted({m for r in paired for m in r["machines"]})  # the pairs' own, not the point's
    gain["precisions"] = sorted({r["precision"] for r in paired})
    return gain


def compare_losses(runs: dict[str, dict[int, dict]], losses: list[str], seeds: list[int]) -> dict:
    """Issue 29's sweep at one point: each other loss minus Hinton's KD (the recipe arm, same views, α, budget and
    seeds), paired by seed, and the loss the sweep takes: the highest mean validation accuracy among KD and the
    others over the plan's `seeds`, chosen only once every candidate has them all (None before: an interim pick could
    flip)."""
    candidates = [KD_ARM, *losses]
    versus = {arm: {split: _paired_gap(runs[arm], runs[KD_ARM], lambda r: r[split]["accuracy"])
                    for split in ("validation", "test")}
              for arm in losses if runs.get(arm) and runs.get(KD_ARM)}
    chosen = None
    if all(set(runs.get(arm, {})) >= set(seeds) for arm in candidates):
        chosen = max(candidates, key=lambda arm: sum(runs[arm][s]["validation"]["accuracy"] for s in seeds))
    return {"versus": KD_ARM, "gaps": versus, "chosen_on_validation": chosen}


FAST_BAR = 0.95  # "how fast": the first epoch a run's validation accuracy reaches the 95 % target


def run_row(arm: str, seed: int, run: dict) -> dict:
    """One run record as the summary's every-run table shows it (None for what an older record lacks)."""
    curve = run.get("validation_accuracy_per_epoch") or []
    test = run.get("test") or {}
    return {"arm": arm, "seed": seed, "test": test.get("accuracy"), "validation": run["validation"]["accuracy"],
            "best_epoch": run.get("best_epoch"), "test_teacher_agreement": test.get("teacher_agreement"),
            "test_kl_to_teacher": test.get("kl_to_teacher"),
            "first_epoch_at_fast_bar": next((i for i, acc in enumerate(curve, 1) if acc >= FAST_BAR), None),
            # the best epoch is the first of these; on a saturated validation set many epochs tie with it
            "epochs_tied_at_best": sum(acc == run["validation"]["accuracy"] for acc in curve) if curve else None,
            "validation_curve_mean": _curve_mean(run), "epochs_run": len(curve), "wall_minutes": run["wall_time_s"] / 60,
            "machines": run["machines"], "precision": run["precision"]}


def _curve_mean(run: dict) -> float | None:
    """A run's validation accuracy averaged over its epochs; None for a record without the curve."""
    curve = run.get("validation_accuracy_per_epoch")
    return sum(curve) / len(curve) if curve else None


def _paired_gap(arm: dict[int, dict], twin: dict[int, dict], metric) -> dict:
    """metric(arm's run) - metric(twin's run), paired by seed: the mean gap over the seeds both have, its 95 %
    half-width (two pairs or more) and whether that interval lies wholly above or below zero; gap None where no
    seed has both runs with the metric."""
    x = {s: metric(r) for s, r in arm.items()}
    y = {s: metric(r) for s, r in twin.items()}
    both = sorted(s for s in x.keys() & y.keys() if x[s] is not None and y[s] is not None)
    pair = stats.paired({s: x[s] for s in both}, {s: y[s] for s in both})
    return {"gap": sum(x[s] - y[s] for s in both) / len(both) if both else None,
            "paired_ci95": pair[1] if pair else None, "pairs": len(both),
            "interval_above_zero": bool(pair and pair[0] - pair[1] > 0),
            "interval_below_zero": bool(pair and pair[0] + pair[1] < 0)}


def _pct(x: dict) -> str:
    """'mean ± 95 % half-width' in percent (the half-width only with two seeds or more)."""
    half = x.get("ci95")
    return f"{100 * x['mean']:.1f} %" + (f" ± {100 * half:.1f}" if half is not None and half == half else "")


def markdown(summary: dict) -> str:
    """summary.json as the tables docs/results.md shows: per E and arm, and each distilled arm minus its twin."""
    points = summary["points"]
    lines = _arms_table(summary)
    lines += _gains_table(points) + _losses_table(points) + _runs_table(points) + _curve_table(points)
    return "\n".join(lines) + "\n"


def _arms_table(summary: dict) -> list[str]:
    """The title, the teacher's line, then one row per E and arm (mean ± 95 % over its seeds)."""
    teacher = summary["teacher_accuracy"]
    lines = ["# The patience study (generated by benchmarks/patience_study.py from summary.json)", "",
             f"Student resolution {summary.get('size', '?')} px; teacher (test / validation): "
             + " / ".join(f"{100 * teacher[s]:.1f} %" for s in ("test", "validation") if s in teacher) + ".", "",
             "| E | arm | seeds | test (mean ± 95 %) | validation | test agreement with teacher | "
             "test KL(teacher ‖ student) |", "|---|---|---|---|---|---|---|"]
    for point in summary["points"]:
        for arm, row in point["arms"].items():
            agree, kl = row["test_teacher_agreement"], row.get("test_kl_to_teacher")
            lines.append(f"| {point['epochs']} | {arm} | {len(row['seeds'])} | {_pct(row['test'])} | "
                         f"{_pct(row['validation'])} | {'-' if agree is None else f'{100 * agree:.1f} %'} | "
                         f"{'-' if kl is None else f'{kl:.3f}'} |")
    if summary.get("student"):
        lines += ["", _student_line(summary["student"])]
    partial = [f"E {p['epochs']}: {p['runs']}/{p['planned']} runs" for p in summary["points"]
               if p["runs"] < p["planned"]]
    if partial:
        lines[1:1] = ["", "**Interim: the curve is not finished** (" + "; ".join(partial) + ")."]
    return lines


def _gains_table(points: list[dict]) -> list[str]:
    """Each distilled arm minus its λ = 0 twin, paired by seed, per E."""
    lines = ["", "| E | gain over the λ = 0 twin | pairs | test, paired (95 %) | validation, paired | KL(teacher ‖ "
             "student), paired, test / validation (< 0: closer) | CPU hours (point) | machines, precision (the pairs') |",
             "|---|---|---|---|---|---|---|---|"]
    for point in points:
        for name, gain in point["gains"].items():
            cells = [_gap_cell(gain[split], 100, "pp") for split in ("test", "validation")]
            kl = gain.get("kl_to_teacher", {})
            cells.append(" / ".join(_gap_cell(kl.get(split), 1, "nats") for split in ("test", "validation")))
            lines.append(f"| {point['epochs']} | {name} | {gain['test']['pairs']} | {' | '.join(cells)} | "
                         f"{point['cpu_hours']:.1f} | {'; '.join(gain['machines'])}, {', '.join(gain['precisions'])} |")
    return lines


def _losses_table(points: list[dict]) -> list[str]:
    """The other losses (issue 29) minus Hinton's KD, paired by seed, and the choice on validation; empty without them."""
    losses = [(p["epochs"], p["losses"]) for p in points if p.get("losses")]
    if not losses:
        return []
    lines = ["", "The other losses (issue 29) against Hinton's KD (the recipe arm: same views, α, budget and seeds), "
             "paired by seed; the sweep's choice is the highest mean validation accuracy once every loss has "
             "all its seeds.", "", "| E | loss minus KD | pairs | test, paired (95 %) | validation, paired |",
             "|---|---|---|---|---|"]
    for e, cmp in losses:
        for arm, gap in cmp["gaps"].items():
            lines.append(f"| {e} | {arm} - {cmp['versus']} | {gap['test']['pairs']} | {_gap_cell(gap['test'], 100, 'pp')} | "
                         f"{_gap_cell(gap['validation'], 100, 'pp')} |")
        lines += ["", f"E = {e}: chosen on validation: " + (f"**{cmp['chosen_on_validation']}**"
                  if cmp["chosen_on_validation"] else "not yet (some losses lack seeds)") + "."]
    return lines


def _runs_table(points: list[dict]) -> list[str]:
    """Every run, one row each."""
    lines = ["", f"Every run, by seed: its test and validation accuracy (best epoch: the first at that validation "
             f"accuracy, and how many epochs tie with it), the first epoch at ≥ {FAST_BAR:.0%} "
             "validation, the mean validation accuracy over its epochs, wall minutes, and where it ran.", "",
             "| E | seed | arm | test | validation (best epoch) | test agreement with teacher | test KL(teacher ‖ student) | "
             f"first epoch at ≥ {FAST_BAR:.0%} validation | mean validation over the epochs | wall minutes | machines, precision |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    return lines + [_run_line(point["epochs"], row) for point in points for row in point.get("every_run", [])]


def _curve_table(points: list[dict]) -> list[str]:
    """Exploratory: the mean validation accuracy over a run's epochs, distilled arm minus twin."""
    lines = ["", "Exploratory (added after E = 100, not in the plan): how fast rather than how far, the mean validation "
             "accuracy over a run's epochs (the area under its validation curve), distilled arm minus twin, paired by seed.",
             "", "| E | gain over the λ = 0 twin | pairs | mean validation accuracy over the epochs, paired (95 %) |",
             "|---|---|---|---|"]
    for point in points:
        for name, gain in point["gains"].items():
            curve = gain.get("validation_curve_mean")
            lines.append(f"| {point['epochs']} | {name} | {curve['pairs'] if curve else 0} | {_gap_cell(curve, 100, 'pp')} |")
    return lines


def _student_line(student: dict) -> str:
    """The study's choice (choose_student) as one sentence, with its runner-up."""
    def name(c):
        return f"E = {c['epochs']}, {c['arm']}: validation {100 * c['validation']:.1f} %, test {_pct(c['test'])}"
    chosen, runner_up = student["chosen"], student["runner_up"]
    line = (f"The study's student, chosen on validation among the {student['candidates']} (E, arm) with every plan "
            f"seed (the highest mean over those seeds; a tie to fewer epochs): **{name(chosen)}**")
    if runner_up:
        line += (f"; the runner-up {name(runner_up)} "
                 f"({100 * (chosen['validation'] - runner_up['validation']):.1f} pp behind on validation)")
    return line + "."


def _run_line(epochs: int, row: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f} %"
    fast = row["first_epoch_at_fast_bar"]
    cells = [epochs, row["seed"], row["arm"], pct(row["test"]),
             f"{pct(row['validation'])}" + ("" if row["best_epoch"] is None else f" ({row['best_epoch']}{_ties(row)})"),
             pct(row["test_teacher_agreement"]), "-" if row["test_kl_to_teacher"] is None else f"{row['test_kl_to_teacher']:.3f}",
             fast if fast is not None else ("never" if row["epochs_run"] else "-"), pct(row["validation_curve_mean"]),
             f"{row['wall_minutes']:.0f}", f"{'; '.join(row['machines'])}, {row['precision']}"]
    return "| " + " | ".join(map(str, cells)) + " |"


def _ties(row: dict) -> str:
    """', 35 tied' when other epochs reached the same best validation accuracy (the earliest is kept), else ''."""
    tied = row.get("epochs_tied_at_best")
    return f", {tied} tied" if tied and tied > 1 else ""


def _gap_cell(g: dict | None, scale: float, unit: str) -> str:
    """'+1.2 pp ± 3.4' for a paired gap, marked where its 95 % interval excludes zero; '-' where it is unknown."""
    if g is None or g["gap"] is None:
        return "-"
    digits = 1 if unit == "pp" else 3
    cell = f"{scale * g['gap']:+.{digits}f} {unit}"
    if g["paired_ci95"] is not None:
        cell += f" ± {scale * g['paired_ci95']:.{digits}f}"
        cell += " (above 0)" if g["interval_above_zero"] else " (below 0)" if g.get("interval_below_zero") else ""
    return cell


def plot(summary: dict, path: Path) -> Path | None:
    """Test and validation accuracy against epochs, a panel each: per arm the mean over seeds and its 95 % t band
    (clipped to 0-100 %: with 2 seeds a band can be ±40 pp), the teacher as a line. The axis follows the means
    and the teacher, not the bands, so the curves stay readable while an interval is wide. A mean over another
    number of seeds than the plan's (an extension, or a point still running) is a square, its count in the legend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colours = {"fm": "tab:blue", "fm-twin": "tab:cyan", "recipe": "tab:red", "recipe-twin": "tab:orange",
               "dkd": "tab:green", "dist": "tab:purple", "kd-std": "tab:brown"}  # the losses: a point each
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    shown = []  # every mean and teacher line drawn: they set the axis
    epochs = [p["epochs"] for p in summary["points"]]
    planned = len(summary["plan"]["seeds"])
    for ax, split in zip(axes, ("test", "validation")):
        for arm, colour in colours.items():
            pts = [(p["epochs"], p["arms"][arm][split], len(p["arms"][arm]["seeds"])) for p in summary["points"]
                   if arm in p["arms"]]
            if pts:
                shown += _plot_arm(ax, arm, colour, pts, planned)
        if split in summary["teacher_accuracy"]:
            teacher = 100 * summary["teacher_accuracy"][split]
            ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
            shown.append(teacher)
        ax.set_xscale("log")
        ax.set_xticks(epochs, [str(e) for e in epochs])  # the curve's points, not a log axis's 3 x 10^1
        ax.minorticks_off()
        ax.set_xlabel("epochs (a fresh view of every image each epoch)")
        ax.set_title(split)
        ax.grid(alpha=0.3)
    if shown:
        axes[0].set_ylim(max(0.0, min(shown) - 3), min(100.0, max(shown)) + 1)
    axes[0].set_ylabel("accuracy (%): mean over seeds, band 95 % t")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(f"Patience: distilled arms and their λ = 0 twins ({planned} seeds a point; squares: see the legend)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_arm(ax, arm: str, colour: str, pts: list[tuple], planned: int) -> list[float]:
    """One arm's curve on one panel: its means (%) at each E (`pts`: (epochs, stats, seeds)) and their 95 % band
    clipped to 0-100 %; a point over another number of seeds than the plan's is a square, its count in the arm's
    legend entry (labels beside the points collided where arms meet); returns the means drawn."""
    xs, ys = [e for e, _, _ in pts], [100 * r["mean"] for _, r, _ in pts]
    half = [100 * r["ci95"] if r["ci95"] == r["ci95"] else 0.0 for _, r, _ in pts]  # NaN (one seed): no band
    other = [(e, n) for e, _, n in pts if n != planned]
    label = arm + (" (" + ", ".join(f"{n} seed{'s' * (n > 1)} at {e}" for e, n in other) + ")" if other else "")
    ax.plot(xs, ys, "-", marker="o", color=colour, label=label)
    for x, y, (_, _, n) in zip(xs, ys, pts):
        if n != planned:
            ax.plot([x], [y], marker="s", markersize=8, color=colour)
    ax.fill_between(xs, [max(0.0, y - h) for y, h in zip(ys, half)],
                    [min(100.0, y + h) for y, h in zip(ys, half)], color=colour, alpha=0.1, linewidth=0)
    return ys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(SHARED / "beans"))
    p.add_argument("--teacher", default=str(SHARED / "teachers" / "beans-efficientnet-lite0"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/patience"))
    p.add_argument("--work", type=Path, default=Path("data/patience"), help="caches and run folders")
    p.add_argument("--epochs", default=",".join(map(str, EPOCHS)), help="the curve's points E")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="paired seeds of every arm at every E")
    p.add_argument("--loss-epochs", default=None,
                   help="the points E (among --epochs) where the other losses run too (issue 29; default: "
                        f"{', '.join(map(str, LOSS_EPOCHS))} where the curve has it); '' for none")
    p.add_argument("--more-seeds", default=None,
                   help="more paired seeds for some arms at one point, 'E:arm,arm:seed,seed' (';' between points; "
                        "default: " + "; ".join(f"{e}:{','.join(m['arms'])}:{','.join(map(str, m['seeds']))}"
                                                for e, m in MORE_SEEDS.items()) + " where the curve has E); '' for none")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="student resolutions screened on validation")
    p.add_argument("--view-mixup", type=float, default=1.0, help="Beta(a, a) of a blend's partner share (mixed views)")
    p.add_argument("--view-mixup-p", type=float, default=0.5, help="share of the views blended (mixed views)")
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--student-config", default="", help="student config overrides, e.g. depth_multiplier=0.35")
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="stage one's decoding workers")
    p.add_argument("--teacher-batch-size", type=int, default=CacheConfig.batch_size,
                   help="inputs per teacher forward in the caches (speed only: not part of the plan)")
    p.add_argument("--plan-only", action="store_true", help="write plan.json and stop")
    p.add_argument("--status", action="store_true", help="print what is done and what is left (reads files only)")
    p.add_argument("--hours", type=float, default=None,
                   help="this copy's time on the machine: it starts (or resumes) a curve run only if the run fits in "
                        "what is left, at the pace of the finished runs here, so a session never leaves one cut off")
    p.add_argument("--summary", action="store_true",
                   help="write summary.json, summary.md and curve.png from the runs done so far, and stop (trains nothing)")
    args = p.parse_args(argv)
    args.epoch_list = sorted({int(x) for x in args.epochs.split(",")})
    args.seed_list = [int(x) for x in args.seeds.split(",")]
    args.loss_epoch_list = (sorted({int(x) for x in args.loss_epochs.split(",") if x.strip()})
                            if args.loss_epochs is not None else [e for e in LOSS_EPOCHS if e in args.epoch_list])
    args.size_list = [int(x) for x in args.sizes.split(",")]
    try:
        args.more_seeds = (parse_more_seeds(args.more_seeds) if args.more_seeds is not None
                           else {e: m for e, m in MORE_SEEDS.items() if e in args.epoch_list})
    except ValueError:
        p.error(f"--more-seeds {args.more_seeds!r}: write E:arm,arm:seed,seed, e.g. 300:recipe,recipe-twin:3,4")
    for e, more in args.more_seeds.items():
        if e not in args.epoch_list or not set(more["arms"]) <= set(ARMS) | set(LOSS_ARMS) \
                or set(more["seeds"]) & set(args.seed_list) or len(set(more["seeds"])) != len(more["seeds"]):
            p.error(f"--more-seeds at E {e}: E must be among --epochs, the arms among {', '.join(ARMS)} or the "
                    "loss arms, and the seeds distinct and not among --seeds")
    args.deadline = time.time() + 3600 * args.hours if args.hours is not None else None
    if min(args.epoch_list) < 1 or len(set(args.seed_list)) != len(args.seed_list) or min(args.size_list) < 1:
        p.error("--epochs and --sizes take positive numbers, --seeds distinct seeds")
    if not set(args.loss_epoch_list) <= set(args.epoch_list):
        p.error(f"--loss-epochs {args.loss_epochs} must be among --epochs {args.epochs} (or '' for none)")
    if args.hours is not None and args.hours <= 0:
        p.error("--hours takes a positive number of hours")
    return args


def parse_more_seeds(text: str) -> dict[int, dict]:
    """'300:recipe,recipe-twin:3,4,5;100:fm:3' -> {300: {"arms": [...], "seeds": [3, 4, 5]}, 100: ...}."""
    more = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        e, arms, seeds = part.split(":")
        more[int(e)] = {"arms": [a.strip() for a in arms.split(",")], "seeds": [int(x) for x in seeds.split(",")]}
    return more


def cache_progress(args, kind: str, images: int) -> str:
    """A cache's state from its result file or its journal (read only: safe while another copy writes it)."""
    done = read_json(args.results / f"cache-{kind}.json")
    if done is not None:
        train = done["splits"]["train"]
        return f"done: {train['rows']} train rows, {train['seconds'] / 3600:.1f} h of teacher"
    def span(chunk: Path) -> tuple[int, int]:  # its images first..end: sorted by number, not by name
        return tuple(int(x) for x in chunk.stem.split("-"))

    chunks = sorted((args.work / f"cache-{kind}" / cache_teacher.JOURNAL).glob("train.r*of*/*.parquet"), key=span)
    if not chunks:
        return "not started"
    spans = [span(c) for c in chunks]
    recent = sum(end - first for first, end in spans[-20:]) / sum(
        float(logit_store.read_meta(c).get("seconds", 0.0)) for c in chunks[-20:])  # images/s lately
    at = max(end for _, end in spans)
    state = "being written" if locking.held(args.work / f"cache-{kind}") else "stopped"
    return (f"{at}/{images} train images, {state}; {recent * 60:.1f} images/min lately, "
            f"{(images - at) / recent / 3600:.1f} h left at that rate")


def run_progress(result: Path | None, out: Path, epochs: int) -> str:
    """'done', 'e/E epochs, running|stopped, ~m min left', 'running' or 'not started', from the files alone."""
    if (result is not None and result.exists()) or (out / run_folder.RUN_JSON).exists():
        return "done"
    running = "running" if locking.held(out) else "stopped"
    rows = history(out)
    if not rows:
        return "running" if running == "running" else "not started"
    lately = [r["epoch_time_s"] for r in rows[-5:] if "epoch_time_s" in r]  # this run's pace, on this machine
    left = f", ~{(epochs - len(rows)) * sum(lately) / len(lately) / 60:.0f} min left" if lately else ""
    return f"{len(rows)}/{epochs} epochs, {running}{left}"


def status(args, plan: dict) -> list[str]:
    """What the study has done and what is left, from its files (takes no lock, so safe beside running copies)."""
    from kdpipe.data import open_dataset

    images = len(open_dataset(plan["dataset"], splits=["train"]).splits["train"].ids)
    lines = [f"plan {args.results / 'plan.json'}, fixed {plan.get('written_at', '?')}"]
    lines += [f"cache {kind}: {cache_progress(args, kind, images)}" for kind in ("plain", "mixed")]
    first_e, first_seed = plan["epochs"][0], plan["seeds"][0]
    screen = read_json(args.results / "screen.json")
    if screen is not None or len(plan["sizes"]) == 1:
        size = screen["chosen"] if screen else plan["sizes"][0]
        lines.append(f"student resolution: {size} px" + (" (chosen on validation)" if screen else ""))
    else:
        size = None
        progress = {px: run_progress(screen_record(args, px),
                                     run_dir(args, plan, SCREENED_ARM, first_e, first_seed, px), first_e)
                    for px in plan["sizes"]}
        lines.append("screen: " + ", ".join(f"{px} px {state}" for px, state in progress.items()))
    for e in plan["epochs"]:
        if size is None:
            lines.append(f"E {e}: waits for the screen")
            continue
        states = {(arm, seed): run_progress(args.results / f"E{e}" / f"{arm}-seed{seed}.json",
                                            run_dir(args, plan, arm, e, seed, size), e)
                  for arm, seed in runs_at(plan, e)}
        done = sum(state == "done" for state in states.values())
        busy = [f"{arm} seed {seed} {state}" for (arm, seed), state in states.items() if state not in ("done", "not started")]
        lines.append(f"E {e}: {done}/{len(states)} runs done" + "".join(f"; {b}" for b in busy))
    return lines


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.status:
        plan = read_json(args.results / "plan.json")
        if plan is None:
            raise SystemExit(f"{args.results / 'plan.json'}: no plan yet; run the study (or --plan-only) first")
        lines = status(args, plan)
        print("\n".join(lines), flush=True)
        return {"status": lines}
    if args.summary:
        plan = read_json(args.results / "plan.json")
        screen = read_json(args.results / "screen.json")
        if plan is None or (screen is None and len(plan["sizes"]) > 1):
            raise SystemExit(f"{args.results}: nothing to summarise before the screen has chosen a size")
        return report(args, plan, screen["chosen"] if screen else plan["sizes"][0])
    plan = fix_plan(args)
    if args.plan_only:
        return {"plan": plan}
    caches = caches_step(args, plan)
    size = screen_step(args, plan, caches)
    curve_step(args, plan, caches, size)
    return report(args, plan, size)


def report(args, plan: dict, size: int) -> dict:
    """summary.json, summary.md and curve.png from the run records there are (an interim report if some are missing)."""
    summary = summarise(args, plan)
    summary["size"] = size
    write_json(args.results / "summary.json", summary)
    files.write_text(args.results / "summary.md", markdown(summary))
    png = plot(summary, args.results / "curve.png")
    for point in summary["points"]:
        gains = ", ".join(f"{k}: test {100 * g['test']['gap']:+.1f} pp (± {100 * g['test']['paired_ci95']:.1f})"
                          if g["test"]["paired_ci95"] is not None else f"{k}: test {100 * g['test']['gap']:+.1f} pp"
                          for k, g in point["gains"].items() if g["test"]["gap"] is not None)
        print(f"E {point['epochs']} ({point['runs']}/{point['planned']} runs): {gains or 'no pairs yet'}; "
              f"{point['cpu_hours']:.2f} CPU h", flush=True)
    if summary["student"]:
        chosen = summary["student"]["chosen"]
        print(f"student chosen on validation: E {chosen['epochs']} {chosen['arm']} (validation "
              f"{100 * chosen['validation']:.1f} %, test {_pct(chosen['test'])})", flush=True)
    print(f"wrote {args.results / 'summary.json'}, summary.md" + (f", {png}" if png else ""), flush=True)
    return summary


if __name__ == "__main__":
    main()
