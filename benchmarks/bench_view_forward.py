"""Stage one with --views K: an image's K + 1 views reach the teacher together. One forward over all of them
(what cache-teacher did before the forward was cut to --batch-size) against forwards of each --batch-sizes
value (`teacher_inputs.teacher_logits`, what it does now), side by side in one run, on the same inputs.

    python benchmarks/bench_view_forward.py                  # shared teacher, K = 299 (the patience study), 1 thread
    python benchmarks/bench_view_forward.py --batch-sizes 32,16,8 --json benchmarks/results/benchmarks/view_forward.json
    python benchmarks/bench_view_forward.py --random-vit --views 63 --batch-sizes 32,16,8   # kdpipe's default teacher's shape

A CPU's caches hold a batch of 16 EfficientNet activations at 224 px, not one of 300: the per-input cost of a
forward grows with the batch past some point, which depends on the teacher and the CPU. The variants are
timed in alternating rounds after a warm-up, so a neighbour's load falls on all alike; each speed-up is the
median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import print_table  # noqa: E402
from bench_cache_teacher import build_vit_teacher  # noqa: E402
from kdpipe import files, runtime, teacher_inputs  # noqa: E402
from kdpipe.config import CacheConfig  # noqa: E402
from kdpipe.teacher import load_teacher  # noqa: E402

SHARED_TEACHER = REPO.parent / "shared" / "teachers" / "beans-efficientnet-lite0"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(SHARED_TEACHER), help="a save_pretrained folder or hub id")
    p.add_argument("--random-vit", action="store_true",
                   help="instead of --teacher, a ViT-B/16-shaped teacher with random weights (the default teacher's shape)")
    p.add_argument("--views", type=int, default=299, help="K: the image arrives with K + 1 views")
    p.add_argument("--batch-sizes", default=f"{CacheConfig.batch_size}",
                   help="comma-separated --batch-size values to time (cache-teacher's default first)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the studies run one per process)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this path")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    precision = runtime.resolve_precision(args.precision, device)
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-vit-") as tmp:
        if args.random_vit:
            build_vit_teacher(Path(tmp), seed=0)
        teacher = load_teacher(tmp if args.random_vit else args.teacher)
    teacher_name = "a ViT-B/16-shaped teacher (random weights)" if args.random_vit else Path(args.teacher).name
    teacher.model = runtime.prepare_model(teacher.model, device)
    size = teacher.model.config.image_size
    torch.manual_seed(0)
    x = torch.randn(args.views + 1, 3, size, size)  # (K + 1, 3, H, W): one image's views
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    variants = {"one forward per image": args.views + 1, **{f"forwards of {b}": b for b in sizes}}

    def timed(batch_size: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode(), runtime.autocast(device, precision):
            teacher_inputs.teacher_logits(teacher, x, batch_size)
        return time.perf_counter() - start

    for b in variants.values():
        timed(b)  # warm-up: oneDNN picks and caches its kernels for every shape
    seconds = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, b in variants.items():
            seconds[name].append(timed(b))
    rate = {name: len(x) / statistics.median(s) for name, s in seconds.items()}
    before = seconds["one forward per image"]
    speedup = {name: statistics.median(a / b for a, b in zip(before, s)) for name, s in seconds.items()}
    machine = runtime.describe(device)
    print_table(f"{len(x)} views of one image through {teacher_name} at {size} px, {precision}, "
                f"{args.threads} thread(s), {machine}",
                ["forward", "inputs/s", "seconds per round (median)", "speed-up over one forward (median of rounds)"],
                [[name, f"{rate[name]:.1f}", f"{statistics.median(seconds[name]):.2f}", f"{speedup[name]:.2f}x"]
                 for name in variants])
    out = {"machine": machine, "threads": args.threads, "precision": precision, "torch": torch.__version__,
           "teacher": teacher_name, "views_per_image": len(x), "batch_sizes": sizes, "rounds": args.rounds,
           "inputs_per_s": rate, "seconds": seconds, "speedup": speedup}
    if args.json:
        files.write_text(args.json, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
