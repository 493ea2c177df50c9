"""What a sweep costs beyond its runs, what pruning saves, and what the guide's online teacher would cost.

On a subset of real Beans (the first --images train images of ../shared/beans, all of validation and
test, linked into a temporary image folder) with the real shared teacher cached once, it runs one grid
`kdpipe.sweep.run` (T x alpha, --epochs each, seeds --seeds) and measures, in this one run:

  sweep overhead     sweep wall time / sum of its runs' own wall times (each run's total_time_s in its
                     run.json, what `kdpipe train-student` would take for it: setup, epochs, test
                     evaluation, saving). The rest is the sweep's: Optuna's storage, claims, the report.
                     Target <= 1.05. Printed beside it: sweep wall time / the runs' epoch times only
                     (train + validation, from metrics.jsonl), with everything else in the numerator.
  teacher cost       teacher loads and forward passes during the sweep, counted by wrapping
                     kdpipe.teacher.load_teacher, AutoModelForImageClassification.from_pretrained (the
                     default student is built from a config) and stage one's teacher_batches. Must be 0.
  guide's way        the same sweep with the teacher forwarded on every training batch, as the guide's
                     ImageDistilTrainer does: each run's train time x the online/cached epoch ratio that
                     stage two's benchmark measured (benchmarks/results/benchmarks/stage_two.json, or --ratio),
                     plus its validation time.
  pruning            the same grid again with --prune median: fraction of epochs saved, and whether the
                     config chosen on validation changed.

    python benchmarks/bench_sweep.py            # 256 train images, 3x2 grid, 4 epochs, 1 seed (~8 min here)
    python benchmarks/bench_sweep.py --quick    # 64 images, 2x1 grid, 2 epochs, 1 seed: a smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import print_table, subset_folder  # noqa: E402
from kdpipe import cache_teacher, sweep, sweep_report, teacher  # noqa: E402
from kdpipe.config import CacheConfig, SweepConfig, TrainConfig  # noqa: E402

SHARED = REPO.parent / "shared"
STAGE_TWO = REPO / "benchmarks" / "results" / "benchmarks" / "stage_two.json"
TARGET = 1.05


class Counter:
    """Counts calls of a module function while installed."""

    def __init__(self, module, name: str):
        self.module, self.name, self.calls = module, name, 0
        self.original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        setattr(module, name, counted)

    def restore(self):
        setattr(self.module, self.name, self.original)


def timed_sweep(cfg: SweepConfig) -> tuple[float, sweep_report.SweepSummary, dict]:
    from transformers import AutoModelForImageClassification

    counters = [Counter(teacher, "load_teacher"), Counter(cache_teacher, "teacher_batches"),
                Counter(AutoModelForImageClassification, "from_pretrained")]
    start = time.perf_counter()
    try:
        sweep.run(cfg)
    finally:
        for c in counters:
            c.restore()
    wall = time.perf_counter() - start
    summary = sweep_report.build(cfg.out_dir(), write=False)
    train = val = runs = 0.0
    for run in (cfg.out_dir() / "runs").iterdir():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            train += r["train_time_s"]
            val += r["epoch_time_s"] - r["train_time_s"]
        if (run / "run.json").exists():
            runs += json.loads((run / "run.json").read_text())["total_time_s"]
    return wall, summary, {"train_s": train, "validation_s": val, "runs_s": runs,
                           "teacher_loads": counters[0].calls + counters[2].calls, "teacher_forwards": counters[1].calls}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=SHARED / "beans")
    p.add_argument("--teacher", default=str(SHARED / "teachers" / "beans-efficientnet-lite0"))
    p.add_argument("--images", type=int, default=None, help="train images (default 256; quick 64)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4; quick 2)")
    p.add_argument("--temperature", default=None, help="grid of T (default 2,5,10; quick 2,5)")
    p.add_argument("--alpha", default=None, help="grid of alpha (default 0.5,0.9; quick 0.5)")
    p.add_argument("--seeds", default=None, help="default 0 (timing, not accuracy); quick 0")
    p.add_argument("--ratio", type=float, default=None, help="online/cached epoch ratio [default: stage two's JSON]")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    q = args.quick
    images, epochs = args.images or (64 if q else 256), args.epochs or (2 if q else 4)
    temps, alphas = args.temperature or ("2,5" if q else "2,5,10"), args.alpha or ("0.5" if q else "0.5,0.9")
    seeds = [int(s) for s in (args.seeds or "0").split(",")]
    ratio = args.ratio or json.loads(STAGE_TWO.read_text())["ratios"]["online_over_cached"]
    os.chdir(REPO)  # data/pixels: the decoded-image store kdpipe uses

    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-sweep-") as tmp:
        tmp = Path(tmp)
        data = subset_folder(args.dataset, tmp / "beans-subset", images)
        t0 = time.perf_counter()
        cache_teacher.run(CacheConfig(teacher=args.teacher, dataset=str(data), out=tmp / "cache"))
        teacher_pass = time.perf_counter() - t0
        base = TrainConfig(cache=tmp / "cache", epochs=epochs)
        space = {"temperature": temps, "alpha": alphas}
        results = {}
        for prune in ("none", "median"):
            cfg = SweepConfig(train=base, space=space, seeds=seeds, prune=prune, out=tmp / f"sweep-{prune}")
            results[prune] = timed_sweep(cfg)
            wall, s, t = results[prune]
            print(f"sweep (prune {prune}): {len(s.rows)} configs x {len(seeds)} seeds, wall {wall:.1f} s, "
                  f"epochs {s.epochs['run']}/{s.epochs['planned']}", flush=True)

    wall, full, t = results["none"]
    runs_s = t["train_s"] + t["validation_s"]
    guide_s = t["train_s"] * ratio + t["validation_s"]
    pwall, pruned, pt = results["median"]
    saved = 1 - pruned.epochs["run"] / pruned.epochs["planned"]
    changed = pruned.best.key != full.best.key
    n_runs = len(full.rows) * len(seeds)
    print_table(f"sweep of {len(full.rows)} configs x {len(seeds)} seeds = {n_runs} runs of {epochs} epochs on "
                f"{images} train images (teacher cached once in {teacher_pass:.1f} s)",
                ["measure", "value", "note"], [
                    ["sweep wall time", f"{wall:.1f} s", ""],
                    ["sum of the runs' own wall times", f"{t['runs_s']:.1f} s", "run.json total_time_s: setup, epochs, test, save"],
                    ["overhead: sweep / runs", f"{wall / t['runs_s']:.3f}",
                     f"target <= {TARGET} ({'meets' if wall / t['runs_s'] <= TARGET else 'ABOVE'})"],
                    ["sum of the runs' epoch times", f"{runs_s:.1f} s", f"train {t['train_s']:.1f} + validation {t['validation_s']:.1f}"],
                    ["sweep / epochs only", f"{wall / runs_s:.3f}", "everything that is not an epoch, in the numerator"],
                    ["teacher loads / forwards during the sweep", f"{t['teacher_loads']} / {t['teacher_forwards']}", "must be 0 / 0"],
                    ["guide's way (online teacher), estimated", f"{guide_s:.1f} s", f"train x {ratio:.2f} (stage two) + validation"],
                    ["guide's way / ours", f"{guide_s / wall:.2f}x", "the teacher pass is paid once instead"],
                    ["with --prune median: epochs run", f"{pruned.epochs['run']} / {pruned.epochs['planned']}", f"{saved:.0%} saved"],
                    ["with --prune median: wall time", f"{pwall:.1f} s", f"{1 - pwall / wall:.0%} less"],
                    ["chosen config (validation)", f"{full.best.key} -> {pruned.best.key}", "changed" if changed else "unchanged"],
                ])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "sweep", "settings": {"images": images, "epochs": epochs, "temperature": temps, "alpha": alphas,
                                               "seeds": seeds, "online_over_cached_ratio": ratio, "quick": q},
            "teacher_pass_s": round(teacher_pass, 2), "sweep_wall_s": round(wall, 2), "runs_epoch_s": round(runs_s, 2),
            "runs_wall_s": round(t["runs_s"], 2), "overhead": round(wall / t["runs_s"], 4),
            "over_epochs_only": round(wall / runs_s, 4), "target": TARGET, **{k: v for k, v in t.items()},
            "guide_estimate_s": round(guide_s, 1), "pruned": {"wall_s": round(pwall, 2), "epochs": pruned.epochs,
                                                              "saved_fraction": round(saved, 4), "chosen": pruned.best.key},
            "chosen": full.best.key, "chosen_changed_by_pruning": changed}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
