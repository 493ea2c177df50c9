"""Stage one throughput: how close `kdpipe cache-teacher` comes to the teacher's bare forward speed.

What it measures, on real Beans images (the train split by default) and in one run:

  (a) stage one: `kdpipe.teacher_inputs.teacher_batches` exactly as `cache_teacher.run` calls it (teacher
      loaded by `kdpipe.teacher.load_teacher`, prepared by `runtime.prepare_model`, precision
      `runtime.resolve_precision("auto", device)`, the pipeline's default DataLoader workers), i.e. JPEG
      decoding + the teacher processor in workers, overlapped with the teacher's forward pass;
  (b) bare forward: the same teacher on the SAME preprocessed batches, already in memory in channels_last
      (decoded and preprocessed beforehand, not timed): only `model(pixel_values=x)` under
      `torch.inference_mode()` and `runtime.autocast`, at the same batch size.

The ratio (a)/(b) of images per second says what decoding, preprocessing and the loader cost on top of
the forward pass (target >= 0.85). The teacher is ViT-B/16-shaped (transformers' ViTConfig defaults,
3 labels) with random weights: the figures are about time only, never accuracy. Each measurement is
preceded by a warm-up batch; with --repeats R the two are measured alternately R times and the best
(shortest) time of each is kept, which limits the drift of a shared machine.
The "cores busy" column (CPU seconds of the process and its workers per wall second) tells whether a
measurement had the machine to itself: well below torch's thread count means it shared the cores, and a
note says the figures are noisy.

It also times the full Beans cache (every split) with the real shared teacher through
`kdpipe.cache_teacher.run(CacheConfig(..., force=True))` into a temporary folder, and reports rows,
images/s and teacher accuracy per split plus the total wall time (skipped by --skip-full and --quick).

Run from anywhere (paths default to the repository layout; ../shared holds Beans and the teacher):

    python benchmarks/bench_cache_teacher.py                   # 256 train images, 2 repeats, full cache
    python benchmarks/bench_cache_teacher.py --quick           # smoke check, < ~1 minute
    python benchmarks/bench_cache_teacher.py --images 1034 --repeats 3 --json stage_one.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import busy_note, cpu_seconds, print_table, sync  # noqa: E402
from kdpipe import cache_teacher, runtime, teacher_inputs  # noqa: E402
from kdpipe.config import CacheConfig  # noqa: E402
from kdpipe.data import Split, open_dataset  # noqa: E402
from kdpipe.teacher import load_teacher  # noqa: E402

SHARED = REPO.parent / "shared"
BEANS_LABELS = ["angular_leaf_spot", "bean_rust", "healthy"]
TARGET_RATIO = 0.85


def build_vit_teacher(folder: Path, seed: int) -> None:
    """A ViT-B/16-shaped classifier with random weights plus a PIL ViT processor, as save_pretrained."""
    from transformers import ViTConfig, ViTForImageClassification

    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # older transformers: the PIL processor is the default one
        from transformers import ViTImageProcessor as Processor

    torch.manual_seed(seed)
    config = ViTConfig(num_labels=len(BEANS_LABELS), id2label=dict(enumerate(BEANS_LABELS)),
                       label2id={n: i for i, n in enumerate(BEANS_LABELS)})
    ViTForImageClassification(config).save_pretrained(folder)
    Processor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)


def first_rows(split: Split, n: int) -> Split:
    n = min(n, len(split))
    return Split(split.name, split.table.select(range(n)), split.image_column, split.ids[:n], split.labels[:n],
                 split.root)


def time_stage_one(teacher, split: Split, device, precision: str, batch_size: int, workers: int) -> float:
    sync(device)
    start = time.perf_counter()
    logits = np.concatenate([b.logits for b in  # stage one's batches exactly as cache_teacher.run takes them
                             teacher_inputs.teacher_batches(teacher, split, device, precision, batch_size, workers)])
    sync(device)
    elapsed = time.perf_counter() - start
    assert logits.shape == (len(split), teacher.model.config.num_labels)
    return elapsed


def preprocess(teacher, split: Split, batch_size: int, device) -> tuple[list[torch.Tensor], float]:
    """Every image through the pipeline's decoder and the teacher's own processor (one image at a time, as
    stage one's workers do), stacked into channels_last batches on `device`. Returns (batches, seconds)."""
    start = time.perf_counter()
    batches = []
    for lo in range(0, len(split), batch_size):
        items = []
        for i in range(lo, min(lo + batch_size, len(split))):
            pixels = teacher.processor(images=split.image(i), return_tensors="np")["pixel_values"][0]
            items.append(torch.from_numpy(np.ascontiguousarray(pixels)))
        x = torch.stack(items).to(device).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        batches.append(x)
    return batches, time.perf_counter() - start


def time_bare_forward(model, batches: list[torch.Tensor], device, precision: str) -> float:
    with torch.inference_mode(), runtime.autocast(device, precision):
        sync(device)
        start = time.perf_counter()
        for x in batches:
            model(pixel_values=x).logits.float()
        sync(device)
        return time.perf_counter() - start


def full_beans_cache(teacher: str, dataset: str, batch_size: int, device: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-cache-") as tmp:
        start = time.perf_counter()
        reports = cache_teacher.run(CacheConfig(teacher=teacher, dataset=dataset, out=Path(tmp) / "cache",
                                                batch_size=batch_size, device=device, force=True))
        wall = time.perf_counter() - start
    return {"teacher": teacher, "dataset": dataset, "total_wall_s": round(wall, 2),
            "images": sum(r.rows for r in reports),
            "splits": {r.split: {"rows": r.rows, "images_per_s": round(r.images_per_s, 2),
                                 "seconds": round(r.rows / r.images_per_s, 2), "teacher_accuracy": round(r.accuracy, 4)}
                       for r in reports}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(SHARED / "beans"), help="image folder (split/class/*.jpg)")
    p.add_argument("--split", default="train")
    p.add_argument("--images", type=int, default=None, help="first N images of the split (default 256; quick 64)")
    p.add_argument("--batch-size", type=int, default=CacheConfig.batch_size, help="stage one's default")
    p.add_argument("--repeats", type=int, default=None, help="alternate measurements, keep the best (default 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", default=str(SHARED / "teachers" / "beans-efficientnet-lite0"),
                   help="real teacher for the full-cache timing")
    p.add_argument("--skip-full", action="store_true", help="skip timing the full Beans cache with --teacher")
    p.add_argument("--quick", action="store_true", help="64 images, 1 repeat, no full cache: a smoke check")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this path")
    args = p.parse_args(argv)
    images = args.images or (64 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 2)
    skip_full = args.skip_full or args.quick

    load_at_start = os.getloadavg()[0]
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision("auto", device)
    workers = runtime.default_workers()
    dataset = open_dataset(args.dataset, splits=[args.split])
    split = first_rows(dataset.splits[args.split], images)
    print(f"stage one benchmark: {len(split)} {args.split} images of {args.dataset}, batch {args.batch_size}, "
          f"{precision}, {workers} workers, {runtime.describe(device)}; best of {repeats}")

    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-vit-") as tmp:
        build_vit_teacher(Path(tmp), args.seed)
        teacher = load_teacher(tmp)
        teacher.model = runtime.prepare_model(teacher.model, device)
    params = sum(p.numel() for p in teacher.model.parameters())

    batches, preprocess_s = preprocess(teacher, split, args.batch_size, device)
    warm = first_rows(split, args.batch_size)
    time_stage_one(teacher, warm, device, precision, args.batch_size, workers)  # warm-up batch (a)
    time_bare_forward(teacher.model, batches[:1], device, precision)  # warm-up batch (b)
    stage, bare, stage_cpu, bare_cpu = [], [], [], []
    for r in range(repeats):  # alternate the order so slow drift hits both alike
        for which in (("stage", "bare") if r % 2 == 0 else ("bare", "stage")):
            c0 = cpu_seconds()
            if which == "stage":
                stage.append(time_stage_one(teacher, split, device, precision, args.batch_size, workers))
                stage_cpu.append(cpu_seconds() - c0)
            else:
                bare.append(time_bare_forward(teacher.model, batches, device, precision))
                bare_cpu.append(cpu_seconds() - c0)
    n = len(split)
    stage_ips, bare_ips = n / min(stage), n / min(bare)
    ratio = stage_ips / bare_ips
    cores = {"stage one": stage_cpu[stage.index(min(stage))] / min(stage),
             "bare forward": bare_cpu[bare.index(min(bare))] / min(bare)}

    print_table("throughput (ViT-B/16-shaped teacher, random weights)",
                ["measurement", "seconds", "images/s", "cores busy", "all repeats (s)"], [
        ["stage one: teacher_batches (decode+process in workers)", f"{min(stage):.2f}", f"{stage_ips:.1f}",
         f"{cores['stage one']:.2f}", " ".join(f"{t:.2f}" for t in stage)],
        ["bare forward on preprocessed batches in memory", f"{min(bare):.2f}", f"{bare_ips:.1f}",
         f"{cores['bare forward']:.2f}", " ".join(f"{t:.2f}" for t in bare)],
        ["(decode+process alone, 1 process, not overlapped)", f"{preprocess_s:.2f}", f"{n / preprocess_s:.1f}", "", ""],
    ])
    note = busy_note(cores)
    if note:
        print(note)
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
    print(f"\nratio  stage one / bare forward (images/s) = {ratio:.3f}   (target >= {TARGET_RATIO}: {verdict})")

    result = {
        "benchmark": "cache_teacher",
        "settings": {"dataset": args.dataset, "split": args.split, "images": n, "batch_size": args.batch_size,
                     "precision": precision, "workers": workers, "repeats": repeats, "quick": args.quick,
                     "teacher": {"architecture": type(teacher.model).__name__, "parameters": params,
                                 "processor": type(teacher.processor).__name__, "weights": "random"}},
        "environment": {"device": runtime.describe(device), "versions": runtime.versions(),
                        "platform": platform.platform(), "loadavg_1m_at_start": load_at_start},
        "figures": {"stage_one_s": [round(t, 3) for t in stage], "bare_forward_s": [round(t, 3) for t in bare],
                    "stage_one_images_per_s": round(stage_ips, 2), "bare_forward_images_per_s": round(bare_ips, 2),
                    "cores_busy": {k: round(v, 2) for k, v in cores.items()},
                    "preprocess_single_process_s": round(preprocess_s, 3),
                    "preprocess_single_process_images_per_s": round(n / preprocess_s, 2)},
        "ratios": {"stage_one_over_bare": round(ratio, 4), "target_min": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO},
        "full_beans": None,
    }

    if not skip_full:
        print(f"\nfull Beans cache with {args.teacher} (cache_teacher.run, force=True) ...", flush=True)
        full = full_beans_cache(args.teacher, args.dataset, args.batch_size, args.device)
        rows = [[name, s["rows"], f"{s['seconds']:.1f}", f"{s['images_per_s']:.1f}", f"{s['teacher_accuracy']:.4f}"]
                for name, s in full["splits"].items()]
        rows.append(["total (wall, incl. loading and fingerprints)", full["images"], f"{full['total_wall_s']:.1f}",
                     f"{full['images'] / full['total_wall_s']:.1f}", ""])
        print_table(f"full cache: {Path(args.teacher).name} over {Path(args.dataset).name}",
                    ["split", "rows", "seconds", "images/s", "teacher acc"], rows)
        result["full_beans"] = full

    result["environment"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
