"""Which of ONNX Runtime's static-quantisation options keeps a trained student's int8 model closest to it, chosen
on *validation* only; the test split is then measured once, for the chosen configuration alone.

    python benchmarks/bench_int8.py --run data/bench-export/run-96px-16ep-seed0

Each configuration is one `quantize_static` call on the run's student exported to fp32 ONNX as `kdpipe export`
does it (dynamo, opset 20; then `quant_pre_process`), varying only the quantiser's documented options: per-channel weights, the
calibration method (MinMax, Entropy, Percentile) and image count, reduce_range, the activation type, the first
convolution and the classifier kept in fp32, QDQ against QOperator. The rule, fixed before measuring: among the
configurations within the bound (int8 accuracy at most --max-drop below the PyTorch student on validation), the
highest argmax agreement with the PyTorch student on validation, ties broken by the lower mean |Δlogit| there.
Results go to benchmarks/results/export/int8-<run folder name>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from kdpipe import export, metrics
from kdpipe.config import ExportConfig
from kdpipe.evaluate import load_saved, predict

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when imported by the tests
from _common import run_main, write_result  # noqa: E402

# kdpipe export --int8's settings (export.quantize); each configuration below changes one or two of them
DEFAULT = dict(per_channel=True, activation="QInt8", method="MinMax", reduce_range=False, fmt="QDQ")
# name -> (calibration images, changes to DEFAULT, nodes kept in fp32: "first" conv / "last" Conv or Gemm)
CONFIGS = {
    "default (kdpipe export --int8)": (128, {}, ()),
    "all train images": (10**9, {}, ()),
    "per-tensor weights": (128, {"per_channel": False}, ()),
    "reduce_range": (128, {"reduce_range": True}, ()),
    "uint8 activations": (128, {"activation": "QUInt8"}, ()),
    "Entropy": (128, {"method": "Entropy"}, ()),
    "Percentile 99.999": (128, {"method": "Percentile"}, ()),
    "first conv in fp32": (128, {}, ("first",)),
    "classifier in fp32": (128, {}, ("last",)),
    "first conv and classifier in fp32": (128, {}, ("first", "last")),
    "QOperator": (128, {"fmt": "QOperator"}, ()),
}


def quantise(prepared: Path, out: Path, batches: list[np.ndarray], options: dict, keep: tuple[str, ...]) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    o = {**DEFAULT, **options}
    if o["method"] != "MinMax" and len({len(b) for b in batches}) > 1:  # the histogram collectors stack the batches
        batches = [b[i:i + 1] for b in batches for i in range(len(b))]  # of one shape: one image a batch, the same values
    nodes = [n for n in onnx.load(str(prepared)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    exclude = ([nodes[0].name] if "first" in keep else []) + ([nodes[-1].name] if "last" in keep else [])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quantize_static(str(prepared), str(out), export.Calibration(batches),
                        quant_format=getattr(QuantFormat, o["fmt"]), per_channel=o["per_channel"],
                        reduce_range=o["reduce_range"], activation_type=getattr(QuantType, o["activation"]),
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, o["method"]),
                        nodes_to_exclude=exclude,  # MinMax: the same ranges, merged every 8 batches
                        extra_options={"CalibMaxIntermediateOutputs": 8} if o["method"] == "MinMax" else {})


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict:
    return {"accuracy": metrics.accuracy(logits, labels),
            "accuracy_drop": metrics.accuracy(reference, labels) - metrics.accuracy(logits, labels),
            "agreement": metrics.agreement(logits, reference),
            "mean_abs_logit_diff": float(np.abs(logits - reference).mean()),
            "max_abs_logit_diff": float(np.abs(logits - reference).max()), "n": len(labels)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a finished train-student run folder")
    p.add_argument("--dataset", help="where the run's dataset is now (default: the run's)")
    p.add_argument("--max-drop", type=float, default=ExportConfig.int8_max_drop, help="the bound (kdpipe export's)")
    p.add_argument("--json", type=Path, help="where the results go (default: benchmarks/results/export/"
                                             "int8-<run folder name>.json)")
    return run_main(p, argv, search)


def search(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    run, model, proc = load_saved(args.run)
    inputs = export.student_inputs(proc)
    data = export.splits(run, ExportConfig(int8=True, dataset=args.dataset), inputs, None)
    val, test = run["config"].get("val_split", "validation"), run["config"].get("test_split")
    reference = {s: predict(model, data[s], torch.device("cpu"), "fp32", inputs) for s in (val, test) if s}
    labels = {s: data[s].labels.numpy() for s in reference}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        fp32, prepared = Path(tmp) / "model.onnx", Path(tmp) / "prepared.onnx"
        export.to_onnx(model, fp32, inputs["size"], "dynamo", ExportConfig.opset)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(prepared))
        for name, (count, options, keep) in CONFIGS.items():
            start, out = time.perf_counter(), Path(tmp) / "int8.onnx"
            batches = export.calibration_batches(data["calibration"], inputs, count, run)
            quantise(prepared, out, batches, options, keep)
            sess = export.session(out)
            rows[name] = {"calibration_images": min(count, len(data["calibration"])), "options": {**DEFAULT, **options},
                          "fp32_nodes": list(keep), "seconds": round(time.perf_counter() - start, 1),
                          val: compare(export.run_onnx(sess, data[val], inputs), reference[val], labels[val])}
            m = rows[name][val]
            print(f"{name:36s} {val}: drop {100 * m['accuracy_drop']:+.1f} pp, agreement {m['agreement']:.2%}, "
                  f"mean |Δlogit| {m['mean_abs_logit_diff']:.3f}, max {m['max_abs_logit_diff']:.2f}", flush=True)
        passing = [n for n in rows if rows[n][val]["accuracy_drop"] <= args.max_drop + 1e-12]
        chosen = min(passing, key=lambda n: (-rows[n][val]["agreement"], rows[n][val]["mean_abs_logit_diff"]),
                     default=None)
        if chosen is not None and test:  # the test split, once, for the configuration validation chose
            count, options, keep = CONFIGS[chosen]
            out = Path(tmp) / "int8.onnx"
            quantise(prepared, out, export.calibration_batches(data["calibration"], inputs, count, run), options, keep)
            rows[chosen][test] = compare(export.run_onnx(export.session(out), data[test], inputs), reference[test],
                                         labels[test])
            m = rows[chosen][test]
            print(f"chosen on {val}: {chosen}; {test}: accuracy {m['accuracy']:.2%} (PyTorch "
                  f"{metrics.accuracy(reference[test], labels[test]):.2%}), drop {100 * m['accuracy_drop']:+.1f} pp, "
                  f"agreement {m['agreement']:.2%}")
        else:
            print(f"no configuration within {100 * args.max_drop:g} pp on {val}: test not measured")
    out = args.json or Path(__file__).parent / "results" / "export" / f"int8-{Path(args.run).resolve().name}.json"
    return write_result(out, "bench_int8.py", args.argv, {
        "run": str(args.run), "bound": args.max_drop, "rule": __doc__.split("\n\n")[2].strip(),
        "pytorch_accuracy": {s: metrics.accuracy(reference[s], labels[s]) for s in reference},
        "chosen": chosen, "configs": rows})


if __name__ == "__main__":
    main()
