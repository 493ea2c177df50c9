"""Does bf16 autocast pay on this CPU? fp32 against bf16, side by side in one run, for the two jobs kdpipe
runs: the student's training step (MobileNetV2 from config, channels_last, the KD loss) and the teacher's
forward (the shared EfficientNet-Lite0 teacher when ../shared is present, else a random EfficientNet-B0).

    python benchmarks/bench_precision.py                    # 1 thread (as the studies run), sizes 128 and 224
    python benchmarks/bench_precision.py --threads 2 --json benchmarks/results/precision.json

`--precision auto` takes bf16 wherever the CPU computes it natively (runtime.cpu_has_fast_bf16: AMX or
AVX512-BF16). AMX was measured at ~2.4x (student step) and ~3x (ViT-B forward) over fp32; an AVX512-BF16 CPU
without AMX runs bf16 dot products on its vector units only, so the gain there has to be measured, not
assumed. The variants are timed in alternating rounds (fp32, bf16, fp32, bf16, ...) so that a neighbour's
load falls on both alike; the ratio is the median of the per-round ratios.
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

from _common import kd_step, print_table  # noqa: E402
from kdpipe import files, runtime  # noqa: E402
from kdpipe.student import build_student  # noqa: E402

SHARED_TEACHER = REPO.parent / "shared" / "teachers" / "beans-efficientnet-lite0"
PRECISIONS = ("fp32", "bf16")


def student_job(size: int, batch: int, precision: str):
    """One training step of a fresh MobileNetV2 at `size` px, batch `batch`: a callable, images per call."""
    torch.manual_seed(0)
    model = runtime.prepare_model(build_student(None, ["a", "b", "c"], {"image_size": size}),
                                  torch.device("cpu"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
    labels = torch.randint(0, 3, (batch,))  # (B,)
    teacher_logits = torch.randn(batch, 3)  # (B, C)

    def step():
        kd_step(model, optimizer, x, labels, teacher_logits, torch.device("cpu"), precision, 5.0, 0.9)

    return step


def load_teacher(teacher: Path | None) -> torch.nn.Module:
    """The teacher at `teacher` (a save_pretrained folder), or a random EfficientNet-B0 at 224 px."""
    from transformers import AutoModelForImageClassification, EfficientNetConfig, EfficientNetForImageClassification

    torch.manual_seed(0)
    if teacher is not None:
        return AutoModelForImageClassification.from_pretrained(teacher)
    return EfficientNetForImageClassification(EfficientNetConfig(num_labels=3, image_size=224))


def teacher_job(model: torch.nn.Module, batch: int, precision: str):
    """One teacher forward at its own input size, under inference_mode."""
    model = runtime.prepare_model(model.eval(), torch.device("cpu"))
    size = model.config.image_size
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)

    def step():
        with torch.inference_mode(), runtime.autocast(torch.device("cpu"), precision):
            model(pixel_values=x)

    return step


def timed(step, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return time.perf_counter() - start


def compare(name: str, make, images_per_call: int, rounds: int, calls: int) -> dict:
    """fp32 and bf16 of one job, in alternating rounds after a warm-up; images/s per precision, the ratio."""
    steps = {p: make(p) for p in PRECISIONS}
    for step in steps.values():
        timed(step, 2)  # warm-up: oneDNN picks and caches its kernels
    seconds = {p: [] for p in PRECISIONS}
    for _ in range(rounds):
        for p in PRECISIONS:
            seconds[p].append(timed(steps[p], calls))
    rate = {p: images_per_call * calls / statistics.median(s) for p, s in seconds.items()}
    ratio = statistics.median(a / b for a, b in zip(seconds["fp32"], seconds["bf16"]))
    return {"job": name, "fp32_images_per_s": rate["fp32"], "bf16_images_per_s": rate["bf16"],
            "bf16_speedup": ratio, "rounds": rounds, "calls_per_round": calls}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the studies run one per process)")
    p.add_argument("--sizes", default="128,224", help="student resolutions")
    p.add_argument("--batch-size", type=int, default=32, help="the recipe's")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3, help="steps per round")
    p.add_argument("--teacher", type=Path, default=SHARED_TEACHER if SHARED_TEACHER.exists() else None)
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this path")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [compare(f"student step, {size} px, batch {args.batch_size}",
                    lambda prec, size=int(size): student_job(size, args.batch_size, prec), args.batch_size,
                    args.rounds, args.calls) for size in args.sizes.split(",")]
    teacher = load_teacher(args.teacher)
    rows.append(compare(f"teacher forward, {teacher.config.image_size} px, batch {args.batch_size} "
                        f"({args.teacher.name if args.teacher else 'random EfficientNet-B0'})",
                        lambda prec: teacher_job(teacher, args.batch_size, prec), args.batch_size,
                        args.rounds, args.calls))
    machine = runtime.describe(torch.device("cpu"))
    auto = runtime.resolve_precision("auto", torch.device("cpu"))
    print_table(f"fp32 vs bf16 autocast on {machine}; --precision auto takes {auto} here",
                ["job", "fp32 img/s", "bf16 img/s", "bf16 speed-up (median of rounds)"],
                [[r["job"], f"{r['fp32_images_per_s']:.1f}", f"{r['bf16_images_per_s']:.1f}",
                  f"{r['bf16_speedup']:.2f}x"] for r in rows])
    out = {"machine": machine, "auto_precision": auto, "threads": args.threads, "torch": torch.__version__,
           "rows": rows}
    if args.json:
        files.write_text(args.json, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
