"""Top-K logits against full logits on a 1000-class problem: bytes per example, and the student's accuracy.

Generated data with structure a teacher can pass on: 1000 classes, one per colour on a 10 x 10 x 10
RGB grid, each with a fixed 16x16 texture; every image is its class's prototype plus noise, so a
teacher's second choices are the neighbouring colours (the "dark knowledge" that top-K must keep). Steps, all through kdpipe's own functions:

Models are small ViTs with one 16 x 16 patch (in effect MLPs over the pixels, with attention over two
tokens), so the whole experiment runs in minutes on a CPU; a 16-px MobileNetV2 learnt this 1000-way
task far too slowly here.

1. teacher: a ViT (hidden 256) trained from random init with cross-entropy (train_student, alpha 0); its
   saved folder is an ordinary teacher for cache-teacher.
2. cache the teacher twice: full float32 logits, and `--topk K --topk-dtype float16`; bytes per example
   from the split files (Parquet, snappy).
3. students (ViT, hidden 64), distilled from each cache with the same settings and seeds (T 2, alpha
   0.9), and the same student from scratch (alpha 0) as the floor; test accuracy of the best validation
   epoch, mean ± std over seeds, and agreement with the teacher.

    python benchmarks/bench_topk.py            # 1000 classes, 12k train images, 3 seeds (a few minutes here)
    python benchmarks/bench_topk.py --quick    # 100 classes, 1 seed, 2 epochs: a smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIZE = 16
RESULT = REPO / "benchmarks" / "results" / "benchmarks" / "topk.json"


def make_data(root: Path, classes: int, per_split: dict[str, int], noise: float, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = round(classes ** (1 / 3))  # classes = side^3 colours on an RGB grid; a group varies only in blue
    grid = np.stack(np.meshgrid(*[np.linspace(30, 225, side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:classes]
    protos = grid[:, None, None, :] + rng.normal(0, 12, (classes, SIZE, SIZE, 3))  # (C, 16, 16, 3) class texture
    for split, per_class in per_split.items():
        for c in range(classes):
            folder = root / split / f"class_{c:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(protos[c] + rng.normal(0, noise, protos[c].shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def vit(path: Path, hidden: int, classes: int) -> Path:
    """A random-init ViT with a single 16 x 16 patch, saved as a folder train-student can start from."""
    from transformers import ViTConfig, ViTForImageClassification

    names = [f"class_{c:04d}" for c in range(classes)]
    ViTForImageClassification(ViTConfig(
        image_size=SIZE, patch_size=SIZE, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=2 * hidden, num_labels=classes, id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)})).save_pretrained(path)
    return path


def train(work: Path, name: str, *, student: Path, cache: Path | None, alpha: float, seed: int, epochs: int,
          dataset: Path | None = None):
    from kdpipe import train_student
    from kdpipe.config import TrainConfig

    cfg = TrainConfig(cache=cache, dataset=str(dataset) if dataset else None, student=str(student), alpha=alpha,
                      temperature=2.0, seed=seed, epochs=epochs, batch_size=128, lr=2e-3, weight_decay=0.05,
                      schedule="cosine", warmup_ratio=0.05, precision="fp32", out=work / "runs" / name,
                      log_tensorboard=False)
    return train_student.run(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.classes, args.seeds, args.epochs, args.no_save = 100, "0", 2, True
    seeds = [int(s) for s in args.seeds.split(",")]

    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-topk-") as tmp:
        work = Path(tmp)
        os.environ.update(HF_DATASETS_CACHE=str(work / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        os.chdir(work)  # pixel stores under ./data
        from kdpipe import cache_teacher
        from kdpipe.config import CacheConfig

        t0 = time.perf_counter()
        data = make_data(work / "data-images", args.classes, {"train": 12, "validation": 3, "test": 3}, noise=30)
        teacher = train(work, "teacher", student=vit(work / "vit-256", 256, args.classes), cache=None, alpha=0.0,
                        seed=0, epochs=2 * args.epochs, dataset=data)
        print(f"teacher: test accuracy {teacher.test['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        caches, storage = {}, {}
        for kind, extra in (("full", {}), (f"top-{args.topk} fp16", {"topk": args.topk, "topk_dtype": "float16"})):
            out = work / "cache" / kind.replace(" ", "-")
            reports = cache_teacher.run(CacheConfig(teacher=str(teacher.out / "model"), dataset=str(data), out=out,
                                                    workers=0, **extra))
            caches[kind] = out
            rows = sum(r.rows for r in reports)
            storage[kind] = {"bytes": sum(r.bytes for r in reports), "rows": rows,
                             "bytes_per_example": sum(r.bytes for r in reports) / rows}
        small = vit(work / "vit-64", 64, args.classes)
        results = {kind: [] for kind in ["scratch", *caches]}
        for seed in seeds:
            for kind in results:
                r = train(work, f"{kind.replace(' ', '-')}-seed{seed}", student=small,
                          cache=caches.get(kind, caches["full"]), alpha=0.0 if kind == "scratch" else 0.9, seed=seed,
                          epochs=args.epochs)
                results[kind].append({"seed": seed, "test_accuracy": r.test["accuracy"],
                                      "validation_accuracy": r.validation["accuracy"],
                                      "test_teacher_agreement": r.test.get("teacher_agreement")})
                print(f"{kind} seed {seed}: test {r.test['accuracy']:.3f}", flush=True)

    def ms(values):
        return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan"))

    print(f"\n{args.classes} classes, teacher (ViT, hidden 256) test accuracy {teacher.test['accuracy']:.3f}; "
          f"students ViT hidden 64, {args.epochs} epochs, T 2, alpha 0.9, seeds {seeds}")
    print(f"  {'targets':<16} {'bytes/example':>14} {'test accuracy':>16} {'agreement':>10}")
    for kind, runs in results.items():
        m, s = ms([r["test_accuracy"] for r in runs])
        agree = ms([r["test_teacher_agreement"] for r in runs])[0] if kind != "scratch" else float("nan")
        size = f"{storage[kind]['bytes_per_example']:.0f}" if kind in storage else "-"
        print(f"  {kind:<16} {size:>14} {100 * m:>9.1f} ± {100 * s:.1f} {100 * agree:>9.1f}")
    full, sparse = (ms([r["test_accuracy"] for r in results[k]])[0] for k in list(caches))
    print(f"\n  top-{args.topk} minus full: {100 * (sparse - full):+.1f} pp test accuracy, "
          f"{storage[list(caches)[1]]['bytes_per_example'] / storage['full']['bytes_per_example']:.3f} x the bytes")
    if not args.no_save:
        RESULT.write_text(json.dumps({"classes": args.classes, "epochs": args.epochs, "seeds": seeds,
                                      "teacher_test_accuracy": teacher.test["accuracy"], "storage": storage,
                                      "results": results}, indent=2) + "\n")
        print(f"wrote {RESULT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
