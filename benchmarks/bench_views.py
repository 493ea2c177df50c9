"""What K stored views cost: teacher pass time and storage as a function of K.

On the first --images train images of real Beans (../shared/beans, linked into a temporary folder) with
the real shared teacher, for each K in --ks: `cache-teacher --views K` over that train split only, and
the prebuilt store of rendered views (`pixels.load_or_build_views`: what train-student --views built before
it rendered views when used, from the originals store, whatever K; bench_render.py compares the two loops).
Printed side by side: teacher wall time and its ratio to K = 0, teacher inputs per second, Parquet bytes
per stored view, prebuilt view-store bytes per view.

    python benchmarks/bench_views.py                 # 128 images, K = 0, 2, 8 (~2 min here)
    python benchmarks/bench_views.py --images 32     # a quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import print_table, subset_folder  # noqa: E402
from kdpipe import cache_teacher, data, logit_store, pixels  # noqa: E402
from kdpipe.config import CacheConfig  # noqa: E402

SHARED = REPO.parent / "shared"
RESULT = REPO / "benchmarks" / "results" / "benchmarks" / "views.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--ks", default="0,2,8")
    p.add_argument("--teacher", default=str(SHARED / "teachers" / "beans-efficientnet-lite0"))
    p.add_argument("--dataset", type=Path, default=SHARED / "beans")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-views-") as tmp:
        folder = Path(tmp) / "beans"
        subset_folder(args.dataset, folder, args.images)
        split = data.open_dataset(str(folder), splits=["train"]).splits["train"]
        cache_teacher.run(CacheConfig(teacher=args.teacher, dataset=str(folder), splits=["train"],
                                      out=Path(tmp) / "warm-up"))  # first-use costs (page cache, kernels) not counted
        for k in (int(x) for x in args.ks.split(",")):
            out = Path(tmp) / f"cache-k{k}"
            t0 = time.perf_counter()
            [report] = cache_teacher.run(CacheConfig(teacher=args.teacher, dataset=str(folder), splits=["train"],
                                                     out=out, views=k))
            wall = time.perf_counter() - t0
            stored = logit_store.read_split(report.path)
            size = tuple(stored.meta["processor"]["size"][d] for d in ("height", "width"))
            t0 = time.perf_counter()
            if k:
                store = pixels.load_or_build_views(split, size, 2, stored.boxes.reshape(len(split), k + 1, 4),
                                                   stored.flips.reshape(len(split), k + 1), root=Path(tmp) / "px")
            else:
                store = pixels.load_or_build(split, size, 2, root=Path(tmp) / "px")
            render = time.perf_counter() - t0
            rows = len(stored.ids)
            results.append({"k": k, "rows": rows, "teacher_wall_s": wall, "teacher_inputs_per_s": rows / wall,
                            "parquet_bytes": report.bytes, "parquet_bytes_per_view": report.bytes / rows,
                            "store_bytes_per_view": int(np.prod(store.shape[1:])), "store_build_s": render})
            print(f"K={k}: {rows} rows in {wall:.1f} s", flush=True)
    base = results[0]["teacher_wall_s"]
    print_table(f"{args.images} Beans train images, teacher {Path(args.teacher).name}",
                ["K", "rows", "teacher s", "× K=0", "inputs/s", "Parquet B/view", "view store KB/view", "store build s"],
                [[r["k"], r["rows"], f"{r['teacher_wall_s']:.1f}", f"{r['teacher_wall_s'] / base:.2f}",
                  f"{r['teacher_inputs_per_s']:.1f}", f"{r['parquet_bytes_per_view']:.0f}",
                  f"{r['store_bytes_per_view'] / 1024:.0f}", f"{r['store_build_s']:.1f}"] for r in results])
    if not args.no_save:
        RESULT.write_text(json.dumps({"images": args.images, "teacher": args.teacher, "results": results}, indent=2)
                          + "\n")
        print(f"wrote {RESULT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
