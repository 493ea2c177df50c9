"""One run on two threads, or two runs on one thread each? The student's training step (MobileNetV2 from
config, channels_last, the KD loss) at each thread count, side by side in one run.

    python benchmarks/bench_threads.py                        # 160 px (the patience study's size), 1 vs 2 threads
    python benchmarks/bench_threads.py --sizes 128,224 --threads 1,2 --json benchmarks/results/benchmarks/threads.json

It decides how a long study uses a 2-core machine: two one-thread runs side by side finish the most runs per
hour, but a run longer than the machine is held must run faster alone (docs/results.md §5). The thread counts
are timed in alternating rounds (1, 2, 1, 2, ...) after a warm-up, so a neighbour's load falls on both alike;
the speed-up is the median of the per-round ratios against the first count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import print_table  # noqa: E402
from bench_precision import student_job, timed  # noqa: E402
from kdpipe import files, runtime  # noqa: E402


def compare(size: int, batch: int, precision: str, threads: list[int], rounds: int, calls: int) -> dict:
    """The student step at `size` px on each thread count: images/s (median round) and speed-up over threads[0]."""
    step = student_job(size, batch, precision)
    for t in threads:  # warm-up: oneDNN picks its kernels per thread count
        torch.set_num_threads(t)
        timed(step, 2)
    seconds = {t: [] for t in threads}
    for _ in range(rounds):
        for t in threads:
            torch.set_num_threads(t)
            seconds[t].append(timed(step, calls))
    first = threads[0]
    return {"job": f"student step, {size} px, batch {batch}, {precision}",
            "images_per_s": {str(t): batch * calls / statistics.median(s) for t, s in seconds.items()},
            "speedup": {str(t): statistics.median(a / b for a, b in zip(seconds[first], s))
                        for t, s in seconds.items()},
            "rounds": rounds, "calls_per_round": calls}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="torch thread counts, the first is the reference")
    p.add_argument("--sizes", default="160", help="student resolutions")
    p.add_argument("--batch-size", type=int, default=32, help="the recipe's")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | auto (what train-student would take here)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3, help="steps per round")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this path")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    precision = runtime.resolve_precision(args.precision, torch.device("cpu"))
    before = torch.get_num_threads()
    try:
        rows = [compare(int(size), args.batch_size, precision, threads, args.rounds, args.calls)
                for size in args.sizes.split(",")]
    finally:
        torch.set_num_threads(before)
    machine = runtime.describe(torch.device("cpu"))
    print_table(f"threads per run on {machine}",
                ["job", *(f"{t} thread(s) img/s" for t in threads), *(f"{t} vs {threads[0]}" for t in threads[1:])],
                [[r["job"], *(f"{r['images_per_s'][str(t)]:.1f}" for t in threads),
                  *(f"{r['speedup'][str(t)]:.2f}x" for t in threads[1:])] for r in rows])
    out = {"machine": machine, "precision": precision, "threads": threads, "torch": torch.__version__, "rows": rows}
    if args.json:
        files.write_text(args.json, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
