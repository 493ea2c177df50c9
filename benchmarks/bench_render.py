"""Views rendered when used: what they cost the training loop, what a lower student resolution buys, and
what a view costs in the cache (issue 25).

On the first --images train images of real Beans (../shared/beans, linked into a temporary folder) with the
real shared teacher, one cache with --views K (mixed views at --view-mixup-p, function matching), then
`train_student.train_epoch` (the real loop, alpha 1) timed side by side in one run, the arms interleaved
epoch by epoch (A B C A B C ...) so that machine load hits them alike; each ratio is the median over the
rounds of that round's ratio:

  on the fly   views rendered when used from the decode-once originals (view_source.ViewSource on a background
               thread, what train-student --views does), student at 224 px
  prebuilt     the same loop on the prebuilt pixel store of every view (pixels.load_or_build_views, what
               train-student --views did before), 224 px                       target: on the fly <= 1.10 x
  128 px       on the fly, student at 128 px (the same boxes, flips and blends)  target: >= 2.5 x img/s of 224 px

Also: one thread rendering an epoch's views alone (views/s at 224 and 128 px), and the cache's bytes per view
at K = 16 and K = 300 on tiny generated data with a tiny random teacher (target <= 64 B per view, with and
without mixed views).

    python benchmarks/bench_render.py                     # 128 images, K 4, 5 rounds (~10 min on a quiet 2-core CPU)
    python benchmarks/bench_render.py --images 32 --epochs 1 --no-save   # a quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import busy_note, cpu_seconds, print_table, subset_folder  # noqa: E402
from kdpipe import cache_teacher, logit_store, pixels, runtime, student_data, train_student, view_source  # noqa: E402
from kdpipe.config import CacheConfig, TrainConfig  # noqa: E402
from kdpipe.views import ViewPolicy  # noqa: E402

SHARED = REPO.parent / "shared"
RESULT = REPO / "benchmarks" / "results" / "benchmarks" / "render.json"
TARGETS = {"on_the_fly_over_prebuilt": 1.10, "img_s_128_over_224": 2.5, "cache_bytes_per_view": 64}


def arm_setup(cache: Path, out: Path, size: int, prebuilt_root: Path | None = None, batch_size: int = 32):
    """A train-student setup on the cache's views at `size` px; with `prebuilt_root`, its train split is
    swapped for the prebuilt pixel store of every view (the same rows, the same loop)."""
    cfg = TrainConfig(cache=cache, views=True, alpha=1.0, temperature=1.0, lr=3e-3, batch_size=batch_size, epochs=100,
                      schedule="constant", test_split=None, out=out,
                      student_config={"image_size": size, "classifier_dropout_prob": 0.2})
    s = train_student.setup(cfg)
    if prebuilt_root is not None:
        d = s.splits[cfg.train_split]
        src = d.source
        store = pixels.load_or_build_views(_split(cache), src.size, src.resample, src.layout.grid(src.boxes),
                                           src.layout.grid(src.flips), root=prebuilt_root, mixes=src.mixes)
        s.splits[cfg.train_split] = student_data.SplitData(d.name, d.ids, pixels.as_tensor(store, s.device), d.labels,
                                                            d.teacher_logits, d.per_image, targets=d.targets)
    return s


def _split(cache: Path):
    from kdpipe.data import reopen_dataset

    meta = logit_store.read_meta(cache / "train.parquet")
    return reopen_dataset(meta["dataset"], None, ["train"]).splits["train"]


def timed_epochs(arms: dict, epochs: int) -> dict:
    """Interleave one epoch of each arm, `epochs` times; per arm the seconds of each epoch and CPU use."""
    times = {name: [] for name in arms}
    cores = {name: [] for name in arms}
    for epoch in range(epochs + 1):  # epoch 0 warms up (allocator, page cache, first renders): not counted
        for name, s in arms.items():
            c0, t0 = cpu_seconds(), time.perf_counter()
            train_student.train_epoch(s, epoch)
            wall = time.perf_counter() - t0
            if epoch:
                times[name].append(wall)
                cores[name].append((cpu_seconds() - c0) / wall)
            print(f"  {name:<10} epoch {epoch}: {wall:.1f} s{'  (warm-up)' if not epoch else ''}", flush=True)
    return {name: {"epoch_s": times[name], "cores": statistics.mean(cores[name])} for name in arms}


def render_alone(s, repeats: int = 2) -> float:
    """Views per second of one thread rendering an epoch's views of the train split (no training)."""
    d = s.splits[s.cfg.train_split]
    rows = np.arange(len(d)) * d.views + np.arange(len(d)) % d.views
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        d.source.render(rows)
        best = max(best, len(rows) / (time.perf_counter() - t0))
    return best


def cache_sizes(work: Path, ks=(16, 300)) -> list[dict]:
    """Parquet bytes per view of a train split cached with K views, on tiny generated data (36 images of
    40 px, 3 classes) with a tiny random ViT teacher; with and without mixed views."""
    from tests.helpers import make_image_folder, make_teacher

    folder, teacher = make_image_folder(work / "tiny"), make_teacher(work / "tiny-teacher")
    out = []
    for mixup in (0.0, 1.0):
        for k in ks:
            [r] = cache_teacher.run(CacheConfig(teacher=str(teacher), dataset=str(folder), splits=["train"], views=k,
                                                augment=ViewPolicy(mixup=mixup), precision="fp32",
                                                out=work / f"tiny-k{k}-m{mixup:g}"))
            out.append({"k": k, "mixed": bool(mixup), "rows": r.rows, "bytes": r.bytes,
                        "bytes_per_view": r.bytes / r.rows, "teacher_s": r.seconds})
            print(f"  tiny cache K={k} mixup={mixup:g}: {r.rows} rows, {r.bytes} B", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=128, help="train images (the first, across classes)")
    p.add_argument("--views", type=int, default=4, help="K stored views per image")
    p.add_argument("--view-mixup-p", type=float, default=0.5, help="share of the views blended with another image")
    p.add_argument("--epochs", type=int, default=5, help="timed rounds: one epoch of each arm (after a warm-up round)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher", default=str(SHARED / "teachers" / "beans-efficientnet-lite0"))
    p.add_argument("--dataset", type=Path, default=SHARED / "beans")
    p.add_argument("--no-sizes", action="store_true", help="skip the tiny-data cache sizes at K = 16 and 300")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-render-") as tmp:
        tmp = Path(tmp)
        folder = subset_folder(args.dataset, tmp / "beans", args.images)
        cache = tmp / "cache"
        [report] = cache_teacher.run(CacheConfig(teacher=args.teacher, dataset=str(folder), splits=["train"], out=cache,
                                                 views=args.views, augment=ViewPolicy(mixup=1.0,
                                                                                      mixup_p=args.view_mixup_p)))
        print(f"teacher pass: {report.rows} views in {report.seconds:.1f} s", flush=True)
        arms = {"on the fly": arm_setup(cache, tmp / "fly", 224, batch_size=args.batch_size),
                "prebuilt": arm_setup(cache, tmp / "pre", 224, tmp / "prebuilt", args.batch_size),
                "128 px": arm_setup(cache, tmp / "low", 128, batch_size=args.batch_size)}
        render = {size: render_alone(arms[name]) for size, name in ((224, "on the fly"), (128, "128 px"))}
        timing = timed_epochs(arms, args.epochs)
        sizes = [] if args.no_sizes else cache_sizes(tmp)
    n = args.images
    med = {name: statistics.median(t["epoch_s"]) for name, t in timing.items()}
    img_s = {name: n / m for name, m in med.items()}
    # each round ran the arms back to back: its own ratio is the least exposed to the machine's load drifting
    rounds = {"on_the_fly_over_prebuilt": [a / b for a, b in zip(timing["on the fly"]["epoch_s"],
                                                                 timing["prebuilt"]["epoch_s"])],
              "img_s_128_over_224": [a / b for a, b in zip(timing["on the fly"]["epoch_s"],
                                                           timing["128 px"]["epoch_s"])]}
    ratios = {k: statistics.median(v) for k, v in rounds.items()}
    device = runtime.describe(torch.device("cpu"))
    print_table(f"train_student.train_epoch, {n} Beans train images, K {args.views} views (mixed p "
                f"{args.view_mixup_p:g}), alpha 1, batch {args.batch_size}, {device}, "
                f"precision {arms['on the fly'].precision}, median of {args.epochs} epochs",
                ["arm", "s / epoch", "img/s", "cores busy", "epochs (s)"],
                [[name, f"{med[name]:.2f}", f"{img_s[name]:.1f}", f"{t['cores']:.2f}",
                  " ".join(f"{x:.1f}" for x in t["epoch_s"])] for name, t in timing.items()])
    print(f"\non the fly / prebuilt (time per epoch): {ratios['on_the_fly_over_prebuilt']:.3f}  "
          f"(target <= {TARGETS['on_the_fly_over_prebuilt']}; median of the rounds: "
          f"{' '.join(f'{r:.2f}' for r in rounds['on_the_fly_over_prebuilt'])})")
    print(f"128 px / 224 px (img/s):                {ratios['img_s_128_over_224']:.2f}  "
          f"(target >= {TARGETS['img_s_128_over_224']}; median of the rounds: "
          f"{' '.join(f'{r:.2f}' for r in rounds['img_s_128_over_224'])})")
    print(f"one thread rendering alone: {render[224]:.0f} views/s at 224 px, {render[128]:.0f} views/s at 128 px")
    if sizes:
        print_table("cache bytes per view, tiny generated data (36 images, 3 classes, tiny random teacher)",
                    ["K", "mixed", "rows", "bytes", "B / view"],
                    [[r["k"], r["mixed"], r["rows"], r["bytes"], f"{r['bytes_per_view']:.1f}"] for r in sizes])
    note = busy_note({name: t["cores"] for name, t in timing.items()})
    if note:
        print(note)
    if not args.no_save:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps({
            "benchmark": "render", "images": n, "views": args.views, "view_mixup_p": args.view_mixup_p,
            "batch_size": args.batch_size, "device": device, "precision": arms["on the fly"].precision,
            "torch_threads": torch.get_num_threads(), "render_threads": view_source.default_render_threads(),
            "epochs": {name: t["epoch_s"] for name, t in timing.items()},
            "cores_busy": {name: t["cores"] for name, t in timing.items()},
            "images_per_s": img_s, "ratios": ratios, "ratios_per_round": rounds, "targets": TARGETS,
            "render_views_per_s": render,
            "cache_sizes": sizes, "note": note}, indent=2) + "\n")
        print(f"wrote {RESULT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
