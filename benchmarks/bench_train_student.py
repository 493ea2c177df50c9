"""Stage two speed: what distillation costs per epoch, cached logits against the guide's online teacher,
and how much the pipeline's training loop adds to a bare one. All measured side by side in one run.

Every variant trains the same student (MobileNetV2 from random init, `kdpipe.student.build_student`,
a fresh one per variant from the same seed) on the same first N images of the Beans train split, with
the same batch size (8, the guide's) and precision (`auto`: bf16 on a CPU with native bf16):

  plain CE      `train_student.train_epoch` after `train_student.setup(TrainConfig(alpha=0, dataset=...))`,
                i.e. `kdpipe train-student --dataset <beans> --alpha 0` (no cache, no teacher)
  KD cached     `train_student.train_epoch` after `setup(TrainConfig(cache=<cache>, alpha=0.5))`, i.e.
                `kdpipe train-student --cache <cache>`: soft targets are the cached teacher logits
  KD online     the HF guide's way (its ImageDistilTrainer): a ViT-B/16-shaped teacher (ViTConfig() defaults,
                3 labels, random weights, eval mode, channels_last) forwarded under inference_mode and
                autocast on every training batch. A small loop here, identical to train_epoch except for
                that forward; it reuses the pipeline's pieces (Setup.splits, pixels.normalise,
                loss.distillation_loss, runtime.autocast)
  bare loop     forward / distillation_loss / backward / AdamW step over pre-normalised float batches
                already in a list (the same pixels, labels and cached logits): no gathering, no
                normalising, no scheduler, no loss bookkeeping

Ratios (of epoch times):
  KD overhead      KD cached / plain CE                 target <= 1.05
  guide vs ours    KD online / KD cached                (how much the cache saves per epoch)
  loop efficiency  KD cached (train_epoch) / bare loop  target <= 1.10

Each variant is warmed up on two batches first (one with --quick). With --repeats R each variant is timed R times, in
alternating order (ABCD, DCBA, ...) so that drift on a shared machine hits all alike, and the best
(shortest) time is kept. Times are also given normalised to the full train split (1034 images on Beans).
The "cores busy" column (CPU seconds of the process and its workers per wall second) tells whether a
measurement had the machine to itself: well below torch's thread count means it shared the cores, and a
note says the figures are noisy.

Needs the teacher-logit cache of stage one (default data/cache/beans-efficientnet-lite0/beans, built by
`kdpipe cache-teacher --dataset ../shared/beans --teacher ../shared/teachers/beans-efficientnet-lite0`).
It runs in the repository root so the decoded-pixel store (data/pixels) is the one `kdpipe` uses.

    python benchmarks/bench_train_student.py                  # 256 train images, 2 repeats
    python benchmarks/bench_train_student.py --quick          # smoke check, < ~1 minute
    python benchmarks/bench_train_student.py --images 1034 --repeats 3 --json stage_two.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import busy_note, cpu_seconds, kd_step, print_table, sync  # noqa: E402
from kdpipe import logit_store, pixels, runtime, train_student  # noqa: E402
from kdpipe.config import RECIPES, TrainConfig  # noqa: E402
from kdpipe.loss import distillation_loss  # noqa: E402
from kdpipe.student import build_student, set_bn_momentum  # noqa: E402
from kdpipe.train_student import Setup, SplitData  # noqa: E402

DEFAULT_CACHE = REPO / "data" / "cache" / "beans-efficientnet-lite0" / "beans"
BUILD_DEFAULT_CACHE = "kdpipe cache-teacher --dataset ../shared/beans --teacher ../shared/teachers/beans-efficientnet-lite0"
TARGETS = {"kd_overhead": 1.05, "loop_efficiency": 1.10}
VARIANTS = ("plain_ce", "kd_cached", "kd_online", "bare_loop")
LABELS = {"plain_ce": "plain CE (alpha 0, no cache)", "kd_cached": "KD, cached logits (train_epoch)",
          "kd_online": "KD, online ViT-B/16 teacher (guide)", "bare_loop": "bare fwd/bwd/step loop (KD loss)"}


def restrict(s: Setup, n: int, keep_teacher_logits: bool = True) -> int:
    """Keep the first n rows of the train split (and drop the other splits: nothing is evaluated here).
    Returns the full train split's size."""
    d = s.splits[s.cfg.train_split]
    full = len(d)
    n = min(n, full)
    logits = d.teacher_logits[:n] if keep_teacher_logits and d.teacher_logits is not None else None
    s.splits = {d.name: SplitData(d.name, d.ids[:n], d.pixels[:n], d.labels[:n], logits)}
    return full


def make_setup(args, alpha: float, cache: Path | None, dataset: str | None, out: Path) -> Setup:
    cfg = TrainConfig(cache=cache, dataset=dataset, alpha=alpha, temperature=args.temperature, epochs=1, recipe="guide",
                      batch_size=args.batch_size, precision=args.precision, device=args.device, seed=args.seed,
                      test_split=None, out=out, log_tensorboard=False)
    return train_student.setup(cfg)


def build_vit_teacher(device: torch.device, num_labels: int, seed: int) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(num_labels=num_labels)).eval()
    return runtime.prepare_model(model, device)


def online_epoch(s: Setup, teacher: torch.nn.Module) -> dict:
    """train_epoch with the guide's online teacher: teacher logits come from a forward pass on every batch."""
    cfg, data = s.cfg, s.splits[s.cfg.train_split]
    s.model.train()
    order = torch.randperm(len(data), generator=s.generator)
    sums = torch.zeros(3, device=s.device)
    for step in range(math.ceil(len(data) / cfg.batch_size)):
        batch = data.batch(order[step * cfg.batch_size:(step + 1) * cfg.batch_size], s.device)
        x = pixels.normalise(batch["pixels"], s.inputs["mean_t"], s.inputs["std_t"])  # (B, 3, H, W)
        with torch.inference_mode(), runtime.autocast(s.device, s.precision):
            teacher_logits = teacher(pixel_values=x).logits.float()  # (B, C)
        with runtime.autocast(s.device, s.precision):
            student_logits = s.forward(pixel_values=x).logits
        parts = distillation_loss(student_logits, batch["labels"], teacher_logits, cfg.temperature, cfg.alpha)
        parts["loss"].backward()
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        sums += torch.stack([parts["loss"].detach(), parts["ce"], parts["kd"]]) * len(batch["labels"])
    loss, ce, kd = (sums / len(data)).tolist()
    return {"loss": loss, "ce": ce, "kd": kd}


class BareLoop:
    """The minimum a training step needs: batches already normalised, in channels_last, in a list."""

    def __init__(self, s: Setup, label_names: list[str]):
        cfg = s.cfg
        runtime.seed_everything(cfg.seed)
        model = build_student(cfg.student, label_names, cfg.student_config)
        set_bn_momentum(model, cfg.bn_momentum)
        self.model = runtime.prepare_model(model, s.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.device, self.precision, self.cfg = s.device, s.precision, cfg
        data, bs = s.splits[cfg.train_split], cfg.batch_size
        self.batches = []
        for lo in range(0, len(data), bs):
            b = data.batch(torch.arange(lo, min(lo + bs, len(data))), s.device)
            x = pixels.normalise(b["pixels"], s.inputs["mean_t"], s.inputs["std_t"]).contiguous(
                memory_format=torch.channels_last)
            self.batches.append((x, b["labels"], b["teacher_logits"]))

    def epoch(self, limit: int | None = None) -> None:
        self.model.train()
        for x, y, t in self.batches[:limit]:
            kd_step(self.model, self.optimizer, x, y, t, self.device, self.precision, self.cfg.temperature,
                    self.cfg.alpha)


def warm_up(s: Setup, run, steps: int = 2) -> None:
    """Run `steps` batches through the variant so one-time costs (allocations, kernel selection) are paid."""
    d = s.splits[s.cfg.train_split]
    n = min(len(d), steps * s.cfg.batch_size)
    s.splits[d.name] = SplitData(d.name, d.ids[:n], d.pixels[:n], d.labels[:n],
                                 d.teacher_logits[:n] if d.teacher_logits is not None else None)
    try:
        run()
    finally:
        s.splits[d.name] = d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="stage one's cache folder")
    p.add_argument("--dataset", default=None, help="default: the dataset the cache was built from")
    p.add_argument("--images", type=int, default=None, help="first N train images (default 256; quick 64)")
    p.add_argument("--batch-size", type=int, default=RECIPES["guide"]["batch_size"], help="default 8, the guide's")
    p.add_argument("--repeats", type=int, default=None,
                   help="times each variant is measured, the best is kept (default 2; quick 1)")
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight of the distilled variants")
    p.add_argument("--temperature", type=float, default=TrainConfig.temperature)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="64 images, 1 repeat, 1 warm-up batch: a smoke check")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this path")
    args = p.parse_args(argv)
    images = args.images or (64 if args.quick else 256)
    args.repeats = args.repeats or (1 if args.quick else 2)
    warm_steps = 1 if args.quick else 2
    if args.repeats < 1 or images < 1 or not 0 < args.alpha <= 1:
        p.error("--repeats and --images must be >= 1, --alpha in (0, 1]")
    cache = args.cache.expanduser().resolve()
    json_path = args.json.expanduser().resolve() if args.json else None  # before the chdir below
    if not (cache / "train.parquet").exists():
        how = BUILD_DEFAULT_CACHE if cache == DEFAULT_CACHE else \
            f"kdpipe cache-teacher --dataset <dataset> --teacher <teacher> --out {args.cache}"
        print(f"no teacher-logit cache at {args.cache} (no train.parquet); build it first, from {REPO}:\n    {how}",
              file=sys.stderr)
        return 1
    dataset = args.dataset or logit_store.read_meta(logit_store.split_path(cache, "train"))["dataset"]["root"]
    if args.dataset and Path(args.dataset).exists():
        dataset = str(Path(args.dataset).resolve())
    load_at_start = os.getloadavg()[0]
    os.chdir(REPO)  # data/pixels: the decoded-image store kdpipe itself uses (built once, then reused)

    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-train-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        setups = {"plain_ce": make_setup(args, 0.0, None, dataset, tmp / "ce"),
                  "kd_cached": make_setup(args, args.alpha, cache, None, tmp / "kd"),
                  "kd_online": make_setup(args, args.alpha, cache, None, tmp / "online")}
        full = restrict(setups["plain_ce"], images)
        restrict(setups["kd_cached"], images)
        restrict(setups["kd_online"], images, keep_teacher_logits=False)  # the guide has no cache
        kd = setups["kd_cached"]
        device, precision = kd.device, kd.precision
        teacher = build_vit_teacher(device, len(kd.label_names), args.seed)
        bare = BareLoop(kd, kd.label_names)
        setup_s = time.perf_counter() - t0
        n = len(kd.splits[kd.cfg.train_split])
        print(f"stage two benchmark: {n} of {full} train images, batch {args.batch_size}, {precision}, "
              f"{runtime.describe(device)}; student {type(kd.model).__name__}; best of {args.repeats} "
              f"(setup {setup_s:.0f} s)", flush=True)

        runs = {"plain_ce": lambda: train_student.train_epoch(setups["plain_ce"], 0),
                "kd_cached": lambda: train_student.train_epoch(kd, 0),
                "kd_online": lambda: online_epoch(setups["kd_online"], teacher),
                "bare_loop": lambda: bare.epoch()}
        for name in VARIANTS:
            if name == "bare_loop":
                bare.epoch(limit=warm_steps)
            else:
                warm_up(setups[name], runs[name], warm_steps)
        times = {name: [] for name in VARIANTS}
        cpu = {name: [] for name in VARIANTS}
        for r in range(args.repeats):
            for name in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                sync(device)
                c0, start = cpu_seconds(), time.perf_counter()
                runs[name]()
                sync(device)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(cpu_seconds() - c0)

    best = {k: min(v) for k, v in times.items()}
    cores = {k: cpu[k][times[k].index(best[k])] / best[k] for k in VARIANTS}
    ratios = {"kd_overhead": best["kd_cached"] / best["plain_ce"],
              "online_over_cached": best["kd_online"] / best["kd_cached"],
              "loop_efficiency": best["kd_cached"] / best["bare_loop"]}
    scale = full / n
    print_table("epoch times (best of repeats)",
                ["variant", f"s / {n} images", "images/s", f"s / epoch of {full}", "cores busy", "all repeats (s)"],
                [[LABELS[k], f"{best[k]:.2f}", f"{n / best[k]:.1f}", f"{best[k] * scale:.1f}", f"{cores[k]:.2f}",
                  " ".join(f"{t:.2f}" for t in times[k])] for k in VARIANTS])
    note = busy_note(cores)
    if note:
        print(note)
    verdict = {k: ("meets" if ratios[k] <= t else "ABOVE") for k, t in TARGETS.items()}
    print_table("ratios (measured side by side in this run)", ["ratio", "value", "target"], [
        ["KD overhead: KD cached / plain CE", f"{ratios['kd_overhead']:.3f}",
         f"<= {TARGETS['kd_overhead']} ({verdict['kd_overhead']})"],
        ["guide vs ours: KD online / KD cached", f"{ratios['online_over_cached']:.2f}", "(cache speed-up)"],
        ["loop efficiency: train_epoch / bare loop", f"{ratios['loop_efficiency']:.3f}",
         f"<= {TARGETS['loop_efficiency']} ({verdict['loop_efficiency']})"],
    ])

    if json_path:
        result = {
            "benchmark": "train_student",
            "settings": {"cache": str(cache), "dataset": dataset, "images": n, "train_split_images": full,
                         "batch_size": args.batch_size, "precision": precision, "alpha": args.alpha,
                         "temperature": args.temperature, "repeats": args.repeats, "seed": args.seed,
                         "quick": args.quick, "student": type(kd.model).__name__,
                         "online_teacher": {"architecture": type(teacher).__name__, "weights": "random",
                                            "parameters": sum(p.numel() for p in teacher.parameters())}},
            "environment": {"device": runtime.describe(device), "versions": runtime.versions(),
                            "platform": platform.platform(), "loadavg_1m_at_start": load_at_start,
                            "loadavg_1m_at_end": os.getloadavg()[0]},
            "figures": {k: {"seconds": [round(t, 3) for t in times[k]], "best_s": round(best[k], 3),
                            "images_per_s": round(n / best[k], 2), "cores_busy": round(cores[k], 2),
                            "full_epoch_equivalent_s": round(best[k] * scale, 2)} for k in VARIANTS},
            "ratios": {k: round(v, 4) for k, v in ratios.items()},
            "targets": {k: {"max": t, "meets": ratios[k] <= t} for k, t in TARGETS.items()},
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
