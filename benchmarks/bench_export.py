"""What `kdpipe export` buys on real Beans with the shared EfficientNet-Lite0 teacher, in one run: a short
distilled student (MobileNetV2, small image size to keep the CPU cost to minutes), exported to ONNX fp32 and
int8, its fidelity on validation and test, and teacher and student timed side by side (export.export does the
measuring; this script only builds the run it measures and prints the figures).

    python benchmarks/bench_export.py                      # 3 epochs at 64 px: ~15 CPU minutes on 2 cores
    python benchmarks/bench_export.py --epochs 12 --image-size 96  # a better student (~9 min an epoch on a busy 2-core box)
    python benchmarks/bench_export.py --run data/runs/kd-seed0     # an existing trained run, as it is (no training)

Results (the export record of run.json) go to benchmarks/results/export/<image-size>px.json, or with --run to
benchmarks/results/export/<run folder name>.json. Speed figures are from one run on whatever CPU this is: compare
the ratios, not the milliseconds, with another machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from kdpipe import cache_teacher, export, runtime, train_student
from kdpipe.config import CacheConfig, ExportConfig, TrainConfig
from kdpipe.errors import KdpipeError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when imported by the tests
from _common import cpu_seconds, print_table, run_main, write_result  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="measure this trained run (a train-student folder) instead of building "
                                            "one; its own dataset and teacher unless --dataset/--teacher say otherwise")
    p.add_argument("--dataset", help=f"the Beans image folder (default {SHARED / 'beans'})")
    p.add_argument("--teacher", help=f"the teacher (default {SHARED / 'teachers' / 'beans-efficientnet-lite0'})")
    p.add_argument("--work", type=Path, default=Path("data/bench-export"), help="cache and run folders")
    p.add_argument("--image-size", type=int, default=64, help="the student's resolution (the teacher's is 224)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-images", type=int, default=ExportConfig.calibration_images,
                   help="train images that calibrate the int8 model (kdpipe export's --calibration-images)")
    p.add_argument("--latency-runs", type=int, default=ExportConfig.latency_runs, help="kdpipe export's")
    p.add_argument("--throughput-batches", type=int, default=ExportConfig.throughput_batches, help="kdpipe export's")
    p.add_argument("--json", type=Path, help="where the results go (default: benchmarks/results/export/<image-size>px"
                                             ".json, or <run folder name>.json with --run)")
    return run_main(p, argv, measure)


def build_run(args: argparse.Namespace) -> Path:
    """The teacher's cache and a short distilled student on it (both reused when already there)."""
    dataset, teacher = args.dataset or str(SHARED / "beans"), args.teacher or str(SHARED / "teachers" /
                                                                                  "beans-efficientnet-lite0")
    cache = args.work / "cache"
    cache_teacher.run(CacheConfig(teacher=teacher, dataset=dataset, out=cache, precision="fp32"))
    run = args.work / f"run-{args.image_size}px-{args.epochs}ep-seed{args.seed}"
    if not (run / "run.json").exists():  # the sweep's recipe (README), a short budget
        train_student.run(TrainConfig(cache=cache, out=run, epochs=args.epochs, alpha=0.9, temperature=5.0, lr=3e-3,
                                      batch_size=32, schedule="cosine", seed=args.seed, precision="fp32",
                                      student_config={"image_size": args.image_size}))
    return run


def measure(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    run = args.run if args.run is not None else build_run(args)
    # dataset and teacher None: the run's own (its dataset, its cache's teacher)
    cfg = ExportConfig(int8=True, calibration_images=args.calibration_images, dataset=args.dataset,
                       teacher=args.teacher, latency_runs=args.latency_runs, throughput_batches=args.throughput_batches)
    trained, cpu_before, load_before = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
    refused = None
    try:
        record = export.export(run, cfg)
    except KdpipeError as e:  # a bound refused the int8 model: say so, and measure the fp32 export alone
        refused = str(e)
        print(f"int8 refused: {e}")
        record = export.export(run, dataclasses.replace(cfg, int8=False))
    done, cpu_used, load_after = time.perf_counter(), cpu_seconds() - cpu_before, os.getloadavg()[0]

    print(f"\n{runtime.describe(runtime.resolve_device('cpu'))}")
    for kind, per_split in record["fidelity"].items():
        for split, m in per_split.items():
            agree = m.get("agreement", m.get("agreement_with_fp32"))
            print(f"ONNX {kind} {split}: accuracy {m['accuracy']:.2%} (PyTorch "
                  f"{m.get('accuracy_pytorch', m['accuracy'] + m.get('accuracy_drop', 0)):.2%}), agreement {agree:.2%}, "
                  f"max |Δlogit| {m['max_abs_logit_diff']:.1e}")
    print_table("speed and size (one run, same process)", ["model", "runtime", "input", "b1 median ms", "b1 p90 ms",
                                                           "b32 images/s", "params M", "file MiB"],
                [[r["model"], r["runtime"], r["input_size"][0], f"{r['latency_ms_median']:.1f}",
                  f"{r['latency_ms_p90']:.1f}", f"{r['throughput_per_s']:.1f}", f"{r['parameters'] / 1e6:.2f}",
                  f"{r['file_bytes'] / 2**20:.1f}" if r.get("file_bytes") else "-"] for r in record["speed"]["rows"]])
    rows = {(r["model"], r["runtime"]): r for r in record["speed"]["rows"]}
    for who, how in [k for k in (("student", "onnx fp32"), ("student", "onnx int8")) if k in rows]:
        for base in (("teacher", "pytorch fp32"), ("teacher", "onnx fp32"), ("student", "pytorch fp32")):
            a, b = rows[(who, how)], rows[base]
            print(f"{who} {how} vs {' '.join(base)}: latency ×{b['latency_ms_median'] / a['latency_ms_median']:.2f}, "
                  f"throughput ×{a['throughput_per_s'] / b['throughput_per_s']:.2f}, size ÷{b['file_bytes'] / a['file_bytes']:.2f}")
    print(export.headline(record["summary"]))
    before = "cache + training" if args.run is None else "loading"
    print(f"wall: {before} {trained - start:.0f} s, export + checks + timing {done - trained:.0f} s "
          f"({cpu_used / (done - trained):.2f} CPU seconds per wall second; load average {load_before:.1f} before, "
          f"{load_after:.1f} after)")
    name = f"{args.image_size}px" if args.run is None else Path(args.run).resolve().name
    out = args.json or Path(__file__).parent / "results" / "export" / f"{name}.json"
    return write_result(out, "bench_export.py", args.argv, {
        "args": {k: str(v) for k, v in vars(args).items() if k != "argv"}, "run": str(run),
        "wall_s": {before.replace(" + ", "_and_"): round(trained - start, 1), "export": round(done - trained, 1)},
        "export_cpu_s": round(cpu_used, 1), "load_average": [load_before, load_after],
        "int8_refused": refused, "export": record})


if __name__ == "__main__":
    main()
