"""Stage one with --views K: an image's K + 1 views reach the teacher together. One forward over all of them
(what cache-teacher did before the forward was cut to --batch-size) against forwards of --batch-size inputs
(`cache_teacher.teacher_logits`, what it does now), side by side in one run, on the same inputs.

    python benchmarks/bench_view_forward.py                  # shared teacher, K = 299 (the patience study), 1 thread
    python benchmarks/bench_view_forward.py --threads 2 --json benchmarks/results/benchmarks/view_forward.json

A CPU's caches hold a batch of 32 EfficientNet activations at 224 px, not one of 300: the per-input cost of a
forward grows with the batch past that point. The variants are timed in alternating rounds after a warm-up,
so a neighbour's load falls on both alike; the ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import print_table  # noqa: E402
from kdpipe import cache_teacher, files, runtime  # noqa: E402
from kdpipe.config import CacheConfig  # noqa: E402
from kdpipe.teacher import load_teacher  # noqa: E402

SHARED_TEACHER = REPO.parent / "shared" / "teachers" / "beans-efficientnet-lite0"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(SHARED_TEACHER), help="a save_pretrained folder or hub id")
    p.add_argument("--views", type=int, default=299, help="K: the image arrives with K + 1 views")
    p.add_argument("--batch-size", type=int, default=CacheConfig.batch_size, help="cache-teacher's default")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the studies run one per process)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this path")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    precision = runtime.resolve_precision(args.precision, device)
    teacher = load_teacher(args.teacher)
    teacher.model = runtime.prepare_model(teacher.model, device)
    size = teacher.model.config.image_size
    torch.manual_seed(0)
    x = torch.randn(args.views + 1, 3, size, size)  # (K + 1, 3, H, W): one image's views
    variants = {"one forward per image": args.views + 1, f"forwards of {args.batch_size}": args.batch_size}

    def timed(batch_size: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode(), runtime.autocast(device, precision):
            cache_teacher.teacher_logits(teacher, x, batch_size)
        return time.perf_counter() - start

    for b in variants.values():
        timed(b)  # warm-up: oneDNN picks and caches its kernels for both shapes
    seconds = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, b in variants.items():
            seconds[name].append(timed(b))
    rate = {name: len(x) / statistics.median(s) for name, s in seconds.items()}
    before, now = seconds.values()
    speedup = statistics.median(a / b for a, b in zip(before, now))
    machine = runtime.describe(device)
    print_table(f"{len(x)} views of one image through {Path(args.teacher).name} at {size} px, {precision}, "
                f"{args.threads} thread(s), {machine}", ["forward", "inputs/s", "seconds per round (median)"],
                [[name, f"{rate[name]:.1f}", f"{statistics.median(seconds[name]):.2f}"] for name in variants])
    print(f"\nforwards of {args.batch_size} / one forward per image: {speedup:.2f}x (median of {args.rounds} rounds)")
    out = {"machine": machine, "threads": args.threads, "precision": precision, "torch": torch.__version__,
           "teacher": args.teacher, "views_per_image": len(x), "batch_size": args.batch_size,
           "inputs_per_s": rate, "seconds": seconds, "speedup": speedup}
    if args.json:
        files.write_text(args.json, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
