"""Reproduce the guide's Beans experiment with several seeds, and study the student's BatchNorm statistics.

    python benchmarks/reproduce_results.py            # full protocol (hours on a 2-core CPU; resumable)
    python benchmarks/reproduce_results.py --quick    # 1 epoch, 1 seed: a smoke check in a few minutes

Steps, each writing its result files under --results (default docs/results/); a file that exists is not
recomputed, so an interrupted or partial protocol continues where it stopped (also across sessions):

1. `teacher.json`: cache the teacher over all splits (pipeline.cache_teacher.run); accuracy, wall time.
2. `guide/<arm>-seed<k>.json`: the guide's setup (the train-student defaults: AdamW, lr 5e-5, batch 8,
   linear decay, 30 epochs), arms scratch (alpha 0) and distilled (T 5, alpha 0.5), seeds 0,1,2.

   BatchNorm running statistics never influence training (a BN layer in train mode normalises with the
   batch's own statistics), and precise BN runs under `fork_rng`, so one training run yields the exact
   outcome of three runs that differ only in their BN statistics. Each run therefore evaluates, after
   every epoch, on validation and test:
     - "upstream": momentum 0.997 (transformers' MobileNetV2, i.e. the guide);
     - "momentum0.1": PyTorch's default momentum;
     - "precise": statistics recomputed over the train split (train_student.recompute_bn_stats).
   (The first two are EMAs of the same batch statistics, see ShadowBN.) The best epoch is chosen per
   variant on validation accuracy; its test accuracy is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cache_teacher, runtime, train_student  # noqa: E402
from pipeline.config import CacheConfig, TrainConfig  # noqa: E402
from pipeline.student import batchnorm_layers  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
ARMS = {"scratch": {"alpha": 0.0}, "distilled": {"alpha": 0.5, "temperature": 5.0}}
MOMENTA = {"upstream": 0.997, "momentum0.1": 0.1}


class ShadowBN:
    """Running statistics with other momenta, computed from the same batches at almost no cost.

    The model's BN layers run with momentum 1.0, so after each training forward their buffers hold exactly
    that batch's statistics (mean, unbiased variance); a forward hook folds them into one EMA per momentum
    with PyTorch's update rule, running = (1 - m) * running + m * batch, starting from PyTorch's init (0, 1).
    """

    def __init__(self, model: torch.nn.Module, momenta: dict[str, float]):
        self.layers = batchnorm_layers(model)
        for m in self.layers:
            m.momentum = 1.0
        self.momenta = momenta
        self.stats = {name: [(torch.zeros_like(m.running_mean), torch.ones_like(m.running_var)) for m in self.layers]
                      for name in momenta}
        self.index = {m: i for i, m in enumerate(self.layers)}
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]
        self.enabled = True

    @torch.no_grad()
    def _hook(self, module, args, output):
        if not (module.training and self.enabled):
            return
        i = self.index[module]
        for name, m in self.momenta.items():
            rm, rv = self.stats[name][i]
            rm.mul_(1 - m).add_(module.running_mean, alpha=m)
            rv.mul_(1 - m).add_(module.running_var, alpha=m)

    def load(self, name: str) -> None:
        for m, (rm, rv) in zip(self.layers, self.stats[name]):
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)


def evaluate_both(s) -> dict:
    val, _ = train_student.evaluate_split(s, s.cfg.val_split)
    test, _ = train_student.evaluate_split(s, s.cfg.test_split)
    return {"validation": val, "test": test}


def run_with_bn_variants(cfg: TrainConfig) -> dict:
    """Train once, evaluate the three BN variants after every epoch. Resumable: the state after each
    epoch is saved to <out>/state.pt (atomically), so a run cut short (a session's end) continues."""
    s = train_student.setup(cfg)
    shadow = ShadowBN(s.model, MOMENTA)
    epochs, elapsed = load_state(s, shadow, cfg.out_dir() / "state.pt")
    start = time.perf_counter() - elapsed
    for epoch in range(len(epochs), cfg.epochs):
        t0 = time.perf_counter()
        train = train_student.train_epoch(s, epoch)
        train_time = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "train": train, "train_time_s": round(train_time, 2), "variants": {}}
        for name in MOMENTA:
            shadow.load(name)
            record["variants"][name] = evaluate_both(s)
        shadow.enabled = False  # precise BN's forwards are not training batches
        train_student.recompute_bn_stats(s)
        shadow.enabled = True
        record["variants"]["precise"] = evaluate_both(s)
        epochs.append(record)
        save_state(s, shadow, epochs, time.perf_counter() - start, cfg.out_dir() / "state.pt")
        v = {k: f"{r['validation']['accuracy']:.3f}" for k, r in record["variants"].items()}
        print(f"  epoch {epoch + 1:>2}  loss {train['loss']:.4f}  val acc {v}  ({train_time:.0f} s train)", flush=True)
    summary = {}
    for variant in epochs[0]["variants"]:
        val = [e["variants"][variant]["validation"]["accuracy"] for e in epochs]
        best = max(range(len(val)), key=lambda i: (val[i], -i))  # first epoch with the best accuracy
        summary[variant] = {"best_epoch": best + 1, "validation": epochs[best]["variants"][variant]["validation"],
                            "test": epochs[best]["variants"][variant]["test"], "validation_accuracy_per_epoch": val}
    return {"config": cfg.to_dict(), "provenance": s.provenance, "epochs": epochs, "summary": summary,
            "wall_time_s": round(time.perf_counter() - start, 1),
            "train_images_per_s": round(len(s.splits[cfg.train_split]) * cfg.epochs /
                                        sum(e["train_time_s"] for e in epochs), 2)}


def save_state(s, shadow: ShadowBN, epochs: list, elapsed: float, path: Path) -> None:
    state = {"model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
             "generator": s.generator.get_state(), "torch_rng": torch.get_rng_state(),
             "shadow": {k: [list(pair) for pair in v] for k, v in shadow.stats.items()},
             "epochs": json.dumps(epochs), "elapsed": elapsed, "config": json.dumps(s.cfg.to_dict())}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(s, shadow: ShadowBN, path: Path) -> tuple[list, float]:
    if not path.exists():
        return [], 0.0
    state = torch.load(path, map_location="cpu", weights_only=True)  # our own file, still never a pickle
    if json.loads(state["config"]) != s.cfg.to_dict():
        raise SystemExit(f"{path} was written with other settings; delete it to start that run again")
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    s.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    for name, pairs in state["shadow"].items():
        for (rm, rv), (m, v) in zip(shadow.stats[name], pairs):
            rm.copy_(m)
            rv.copy_(v)
    epochs = json.loads(state["epochs"])
    print(f"  resumed after epoch {len(epochs)} from {path}", flush=True)
    return epochs, state["elapsed"]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, results under /tmp")
    p.add_argument("--dataset", default=str(SHARED / "beans"))
    p.add_argument("--teacher", default=str(SHARED / "teachers" / "beans-efficientnet-lite0"))
    p.add_argument("--results", type=Path, default=Path("docs/results"))
    p.add_argument("--work", type=Path, default=Path("data/reproduce"), help="caches and run folders")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args()
    if args.quick:
        args.results, args.seeds, args.epochs = Path("/tmp/kdpipe-quick/results"), "0", 1
        args.work = Path("/tmp/kdpipe-quick/work")
    cache = args.work / "cache"
    teacher_file = args.results / "teacher.json"
    if not teacher_file.exists():
        t0 = time.perf_counter()
        reports = cache_teacher.run(CacheConfig(teacher=args.teacher, dataset=args.dataset, out=cache, force=True))
        write_json(teacher_file, {
            "teacher": args.teacher, "dataset": args.dataset, "wall_time_s": round(time.perf_counter() - t0, 1),
            "machine": {"platform": platform.platform(), "device": runtime.describe(torch.device("cpu"))},
            "splits": {r.split: {"rows": r.rows, "accuracy": r.accuracy, "images_per_s": r.images_per_s,
                                 "bytes": r.bytes} for r in reports}})
    else:
        cache_teacher.run(CacheConfig(teacher=args.teacher, dataset=args.dataset, out=cache))  # reuses it
    print(json.loads(teacher_file.read_text()))
    for seed in [int(x) for x in args.seeds.split(",")]:
        for arm, overrides in ARMS.items():
            path = args.results / "guide" / f"{arm}-seed{seed}.json"
            if path.exists():
                print(f"{path} exists: skipped")
                continue
            print(f"{arm} seed {seed}: {args.epochs} epochs", flush=True)
            out = args.work / "runs" / f"guide-{arm}-seed{seed}"  # a run cut short resumes from out/state.pt
            # bn_momentum=1.0: buffers hold each batch's statistics; ShadowBN turns them into the variants
            cfg = TrainConfig(cache=cache, seed=seed, epochs=args.epochs, bn_momentum=1.0, out=out, resume=True,
                              **overrides)
            write_json(path, run_with_bn_variants(cfg))
            print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
