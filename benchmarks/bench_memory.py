"""Peak memory as the dataset grows: it must not grow with the number of images.

Generated data (--classes classes, tiny PNGs; a validation split of one image per class) at each of
--sizes train images, a tiny random ViT teacher with a --classes-way head. Each measurement runs in a
fresh process (workers 0, so one process holds everything) and reports its peak resident set
(ru_maxrss), side by side for the sizes:

  stage one           kdpipe cache-teacher (full float32 logits): rows stream from the teacher into
                      Parquet row groups (logit_store.SplitWriter), so the peak is bounded by one row
                      group, not by N x C x 4 bytes of logits.
  stage two, top-K    kdpipe train-student, 1 epoch, on a --topk 10 cache: targets stay sparse (N x K)
                      and are densified per batch; the uint8 pixel store is a memory map.
  stage two, full     the same on the full-logit cache: the (N, C) float32 targets are held in memory,
                      so this one grows by about N x C x 4 bytes (printed beside it): expected, and the
                      reason to use --topk for large label spaces.

    python benchmarks/bench_memory.py                    # 1,000 vs 10,000 images, 1000 classes (~5 min here)
    python benchmarks/bench_memory.py --sizes 200 2000   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIZE = 16  # image, teacher and student resolution
RESULT = REPO / "benchmarks" / "results" / "benchmarks" / "memory.json"


def make_data(root: Path, n_train: int, classes: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("validation", classes)):
        for i in range(n):
            c = i % classes
            folder = root / split / f"class_{c:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return root


def make_teacher(path: Path, classes: int) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    names = [f"class_{c:04d}" for c in range(classes)]
    torch.manual_seed(0)
    config = ViTConfig(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=classes, id2label=dict(enumerate(names)),
                       label2id={n: i for i, n in enumerate(names)})
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(path)
    return path


def child(stage: str, work: Path) -> dict:
    """One measurement in this (fresh) process: peak RSS in MiB and wall time."""
    from kdpipe import cache_teacher, train_student
    from kdpipe.config import CacheConfig, TrainConfig

    start = time.perf_counter()
    if stage == "stage one":
        cache_teacher.run(CacheConfig(teacher=str(work / "teacher"), dataset=str(work / "data"), out=work / "cache",
                                      precision="fp32", workers=0, batch_size=64, force=True))
    else:
        cache = work / ("cache-topk" if stage == "stage two, top-K" else "cache")
        train_student.run(TrainConfig(cache=cache, dataset=str(work / "data"), out=work / f"run-{cache.name}", epochs=1,
                                      batch_size=64, lr=1e-3, test_split=None, precision="fp32", device="cpu",
                                      student_config={"image_size": SIZE, "depth_multiplier": 0.35}, log_tensorboard=False))
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_s": time.perf_counter() - start}


def measure(stage: str, work: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", stage, "--work", str(work)], cwd=work,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{stage} failed on {work}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000], help="train images: small, large")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--no-save", action="store_true", help=f"do not write {RESULT.relative_to(REPO)}")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work)))
        return

    stages = ("stage one", "stage two, top-K", "stage two, full")
    results = {}
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-memory-") as tmp:
        # one datasets cache for this process and the measured ones (read by datasets when imported)
        os.environ.update(HF_DATASETS_CACHE=str(Path(tmp) / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        from _common import print_table
        from kdpipe import cache_teacher, data
        from kdpipe.config import CacheConfig

        for n in args.sizes:
            work = Path(tmp) / f"n{n}"
            make_data(work / "data", n, args.classes)
            make_teacher(work / "teacher", args.classes)
            # datasets converts an image folder to Arrow once, holding per-file metadata while it does
            # (its cost, not kdpipe's, and paid once per dataset); do it here, outside the measurement
            data.open_dataset(str(work / "data"))
            results[n] = {"stage one": measure("stage one", work)}
            cache_teacher.run(CacheConfig(teacher=str(work / "teacher"), dataset=str(work / "data"),
                                          out=work / "cache-topk", precision="fp32", workers=0, topk=10))
            for stage in stages[1:]:
                results[n][stage] = measure(stage, work)
            print(f"{n} images: " + ", ".join(f"{s} {r['peak_rss_mib']:.0f} MiB" for s, r in results[n].items()),
                  flush=True)

    small, large = args.sizes
    logits_mib = lambda n: n * args.classes * 4 / 2**20  # noqa: E731  (N, C) float32
    rows = []
    for stage in stages:
        a, b = results[small][stage]["peak_rss_mib"], results[large][stage]["peak_rss_mib"]
        rows.append([stage, f"{a:.0f}", f"{b:.0f}", f"{b - a:+.0f}", f"{b / a:.3f}",
                     f"{logits_mib(large) - logits_mib(small):.0f}"])
    print_table(f"Peak RSS (MiB), {small:,} vs {large:,} generated images, {args.classes} classes, one process each",
                ["", f"{small:,} images", f"{large:,} images", "growth", "ratio", "N x C x 4 B growth"], rows)
    summary = {"sizes": args.sizes, "classes": args.classes, "results": {str(n): r for n, r in results.items()},
               "ratio": {s: results[large][s]["peak_rss_mib"] / results[small][s]["peak_rss_mib"] for s in stages}}
    if not args.no_save:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nwrote {RESULT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
