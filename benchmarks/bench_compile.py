"""Is `train-student --compile` worth it here? Eager against torch.compile'd training steps, side by side.

The same student (MobileNetV2 from random init, `kdpipe.student.build_student`, channels_last via
`runtime.prepare_model`) takes the same AdamW steps (`_common.kd_step`) on the same random batch with the
KD loss (T 5, alpha 0.9, random teacher logits), under the pipeline's precision
(`runtime.resolve_precision("auto")`: bf16 autocast on a CPU with native bf16). Each variant first takes
two warm-up steps (for the compiled one, that is where compilation happens, into an empty inductor cache,
as on a first run), then --repeats timings of --steps steps each, the variants alternating (AB, BA, ...) so
drift on a shared machine hits both alike; the best timing of each is kept.

Prints images/s of each, the speed-up (eager step time / compiled step time) and the break-even: how
many images a run must train on before the compile time is paid back.

    python benchmarks/bench_compile.py                # batch 32 (the recipe's), 3 x 8 timed steps
    python benchmarks/bench_compile.py --batch-size 8 --steps 32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# a cold compile, as in a first run (later runs on the same machine reuse inductor's on-disk cache)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="kdpipe-bench-inductor-")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import kd_step, print_table, sync  # noqa: E402
from kdpipe import runtime  # noqa: E402
from kdpipe.student import build_student  # noqa: E402


class Trainer:
    """A fresh student (same seed for both variants) and its AdamW; step() is one training step on `batch`."""

    def __init__(self, compiled: bool, batch: dict, device, precision):
        torch.manual_seed(0)
        model = runtime.prepare_model(build_student(None, ["a", "b", "c"], {"classifier_dropout_prob": 0.2}), device)
        self.forward = torch.compile(model) if compiled else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.batch, self.device, self.precision = batch, device, precision

    def step(self) -> None:
        b = self.batch
        kd_step(self.forward, self.optimizer, b["x"], b["labels"], b["teacher"], self.device, self.precision, 5.0, 0.9)

    def seconds(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timings per variant, alternating; the best is kept")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision("auto", device)
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(args.batch_size, 3, 224, 224, generator=g).to(device, memory_format=torch.channels_last),
             "labels": torch.randint(0, 3, (args.batch_size,), generator=g).to(device),
             "teacher": torch.randn(args.batch_size, 3, generator=g).to(device)}
    print(f"{runtime.describe(device)}, precision {precision}, batch {args.batch_size}, torch {torch.__version__}")
    trainers = {name: Trainer(name == "compiled", batch, device, precision) for name in ("eager", "compiled")}
    warm = {name: t.seconds(2) for name, t in trainers.items()}
    best = {name: float("inf") for name in trainers}
    for r in range(args.repeats):  # alternating order, so drift on a shared machine hits both alike
        for name in (list(trainers) if r % 2 == 0 else list(trainers)[::-1]):
            best[name] = min(best[name], trainers[name].seconds(args.steps) / args.steps)
    results = {name: (warm[name], best[name]) for name in trainers}
    print_table("training steps", ["variant", "warm-up (2 steps) s", "s / step (best)", "images/s"],
                [[name, f"{w:.1f}", f"{dt:.3f}", f"{args.batch_size / dt:.1f}"] for name, (w, dt) in results.items()])
    (warm_e, eager), (warm_c, compiled) = results["eager"], results["compiled"]
    speedup = eager / compiled
    print(f"\nspeed-up, eager / compiled step time: {speedup:.2f}")
    if speedup > 1:
        steps_to_pay = (warm_c - warm_e) / (eager - compiled)
        print(f"break-even: compile time paid back after {steps_to_pay:.0f} steps "
              f"({steps_to_pay * args.batch_size:,.0f} images, {steps_to_pay * args.batch_size / 1034:.1f} Beans epochs)")
    else:
        print("break-even: never (compiled steps are not faster here)")


if __name__ == "__main__":
    main()
