"""`kdpipe export RUN`: ship a trained student. Writes `RUN/onnx/` beside `RUN/model/`:

    model.onnx                 the student, fp32, dynamic batch (input pixel_values (B, 3, H, W), output logits (B, C))
    model_int8.onnx            with --int8: static post-training quantisation (QDQ), calibrated on train images
    config.json, preprocessor_config.json   the saved student's, so inputs are prepared as in training

The exporter is torch.onnx's (`--exporter dynamo`, the maintained torch.export one, or `torchscript`), the
quantiser ONNX Runtime's (`quantize_static`; dynamic int8 measured slower than fp32 on this CPU class, #61).
Before anything is written under its final name the export is checked on the run's own validation and test
splits against the PyTorch student, with bounds fixed in ExportConfig before measuring (max |Δlogit|, argmax
agreement; int8: accuracy drop); a bound missed is a KdpipeError and nothing is written. Then teacher and
student are timed side by side (PyTorch eager, and ONNX Runtime on the same threads), and the figures go into
run.json (`export`) and the model card (model_card.render reads them from there).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from . import files, locking, metrics, model_card, pixels, run_folder, runtime, views
from .config import EXPORTERS, ExportConfig
from .data import reopen_dataset
from .errors import KdpipeError, reason
from .evaluate import load_saved, predict
from .student import image_size
from .student_data import SplitData, load_views, open_cache, with_tensors

FP32, INT8 = "model.onnx", "model_int8.onnx"
ONNX_DIR = run_folder.ONNX
INPUT, OUTPUT = "pixel_values", "logits"
BATCH = 32  # throughput batch, and fidelity's batch (evaluate.predict's)
INSTALL = 'pip install -e ".[export]"'

Progress = Callable[[str, int, int, str], None]


def export(run_dir: Path, cfg: ExportConfig, progress: Progress | None = None) -> dict:
    """Export, check and time the student of `run_dir`; returns the record written to run.json's `export`."""
    run_dir = Path(run_dir)
    require_runtime(cfg.exporter)
    run, model, proc = load_saved(run_dir)  # refuses a folder without a run or without its weights
    with locking.exclusive(run_dir, "RUN"):
        inputs = student_inputs(proc)
        data = splits(run, cfg, inputs, progress)
        with files.replacing(run_dir / ONNX_DIR) as tmp:
            tmp.mkdir()
            record = {"exporter": cfg.exporter, "opset": cfg.opset, "versions": _versions(),
                      "device": runtime.describe(torch.device("cpu")),
                      "bounds": {"max_logit_diff": cfg.max_logit_diff, "min_agreement": cfg.min_agreement,
                                 **({"int8_max_drop": cfg.int8_max_drop} if cfg.int8 else {})},
                      "files": {"fp32": f"{ONNX_DIR}/{FP32}"}}
            to_onnx(model, tmp / FP32, inputs["size"], cfg.exporter, cfg.opset, _stamp(run, cfg))
            for name in ("config.json", "preprocessor_config.json"):
                shutil.copy2(run_dir / run_folder.MODEL / name, tmp / name)
            reference = {name: predict(model, split, torch.device("cpu"), "fp32", inputs) for name, split in data.items()
                         if name != "calibration"}
            record["fidelity"] = {"fp32": check_fp32(session(tmp / FP32), data, reference, inputs, cfg)}
            if cfg.int8:
                calibrate = calibration_batches(data["calibration"], inputs, cfg.calibration_images, run)
                record["int8"] = quantize(tmp / FP32, tmp / INT8, calibrate)
                record["int8"]["calibration_inputs"] = ("one stored view of each image (the run trained on views)"
                                                        if data["calibration"].per_image > 1 else "the images")
                record["files"]["int8"] = f"{ONNX_DIR}/{INT8}"
                record["fidelity"]["int8"] = check_int8(session(tmp / INT8), data, reference, inputs, cfg)
            if cfg.speed:
                record["speed"] = speed(model, tmp, run, run_dir, cfg, progress)
                record["summary"] = summary(record["speed"], run, record["fidelity"])
        run["export"] = record
        files.write_json(run_dir / run_folder.RUN_JSON, run)
        files.write_text(run_dir / run_folder.MODEL / "README.md", model_card.render(run, run_dir.name))
    return record


def student_inputs(proc) -> dict:
    """How the saved student's images are prepared (its processor's size, filter, mean and std), as tensors."""
    return with_tensors({"size": (proc.size["height"], proc.size["width"]), "resample": int(proc.resample),
                         "mean": list(proc.image_mean), "std": list(proc.image_std)}, torch.device("cpu"))


def require_runtime(exporter: str) -> None:
    """onnx, onnxruntime (and onnxscript for the dynamo exporter) are the optional extra `.[export]`."""
    needed = ("onnx", "onnxruntime") + (("onnxscript",) if exporter == "dynamo" else ())
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise KdpipeError(f"kdpipe export needs {', '.join(missing)}, not installed: {INSTALL}")


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {**runtime.versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _stamp(run: dict, cfg: ExportConfig) -> dict[str, str]:
    """Provenance written into the ONNX file itself (metadata_props): what it was exported from, and how."""
    student = run.get("student", {})
    return {"kdpipe.version": runtime.versions()["kdpipe"], "kdpipe.exporter": cfg.exporter,
            "kdpipe.student_weights_sha256": str(student.get("weights_sha256")),
            "kdpipe.labels": json.dumps(run.get("label_names", [])), "kdpipe.inputs": json.dumps(student.get("inputs", {}))}


# ----------------------------------------------------------------------------------------------- export


class Logits(torch.nn.Module):
    """A transformers classifier as pixel_values (B, 3, H, W) -> logits (B, C): one input, one output."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def to_onnx(model: torch.nn.Module, path: Path, size: tuple[int, int], exporter: str, opset: int,
            stamp: dict[str, str] | None = None) -> None:
    """`model` as one self-contained ONNX file with a dynamic batch dimension; a model that does not export is
    a KdpipeError naming the operator."""
    import onnx

    wrapper = Logits(model).eval()  # the exporter restores the wrapper's mode afterwards: eval, as the model's
    example = (torch.zeros(2, 3, *size),)
    kwargs = dict(input_names=[INPUT], output_names=[OUTPUT], opset_version=opset, verbose=False)
    if exporter == "dynamo":
        kwargs.update(dynamo=True, external_data=False, dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}})
    else:
        kwargs.update(dynamo=False, dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its steps
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, example, str(path), **kwargs)
    except Exception as e:  # noqa: BLE001  any failure of the exporter is the model's, not kdpipe's
        other = next(x for x in EXPORTERS if x != exporter)
        raise KdpipeError(f"{type(model).__name__} does not export with --exporter {exporter} --opset {opset} "
                          f"({_operator(e)}); try --exporter {other}, or another --opset") from None
    finally:
        model.eval()
    proto = onnx.load(str(path))
    for key, value in (stamp or {}).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def _operator(e: BaseException) -> str:
    """The operator an exporter or runtime failed on, from its message (or its cause's), else its first line."""
    texts = [str(e), str(e.__cause__ or "")]
    for text in texts:
        found = re.search(r"aten(?:::|\.)(\w+)", text) or re.search(r"implementation for (\w+)\(", text)
        if found:
            return f"operator {found.group(1)} is not supported"
    return reason(e)


def session(path: Path):
    """An ONNX Runtime CPU session on torch's thread count, so that the two runtimes are timed alike."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors reach us as exceptions
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  onnxruntime's own exception types
        raise KdpipeError(f"ONNX Runtime cannot load the exported {path.name} ({_operator(e)}); try another "
                          "--opset or --exporter") from None


def run_onnx(sess, data: SplitData, inputs: dict) -> np.ndarray:
    """Logits (N, C) of an ONNX model over a whole split, from the same normalised pixels as evaluate.predict."""
    out = []
    for batch in _normalised(data, inputs):
        out.append(sess.run([OUTPUT], {INPUT: batch.numpy()})[0])
    return np.concatenate(out)


def _normalised(data: SplitData, inputs: dict, batch_size: int = BATCH) -> Iterator[torch.Tensor]:
    for start in range(0, len(data), batch_size):
        u8 = data.batch(torch.arange(start, min(start + batch_size, len(data))), torch.device("cpu"))["pixels"]
        yield pixels.normalise(u8, inputs["mean_t"], inputs["std_t"])  # (B, 3, H, W) float32


# ----------------------------------------------------------------------------------------------- data


def splits(run: dict, cfg: ExportConfig, inputs: dict, progress: Progress | None) -> dict[str, SplitData]:
    """The run's validation and test splits as the student sees them, and with --int8 its train split
    (`calibration`: stored views where the run trained on them)."""
    config = run["config"]
    evaluated = [s for s in (config.get("val_split", "validation"), config.get("test_split")) if s]
    train = config.get("train_split", "train")
    wanted = evaluated + ([train] if cfg.int8 else [])
    flags = {s: "--dataset" for s in wanted}
    try:
        ds = reopen_dataset(run["dataset"], cfg.dataset, wanted, flags=flags)
    except KdpipeError as e:
        if cfg.int8 and train in str(e):
            raise KdpipeError(f"--int8: calibration data missing: the run's train split {train!r} cannot be read "
                              f"({e}); pass --dataset PATH to the run's dataset, or export without --int8") from None
        raise
    out = {}
    for name in evaluated:
        split = ds.splits[name]
        u8 = pixels.load_or_build(split, inputs["size"], inputs["resample"], progress=progress)
        out[name] = SplitData(name, split.ids, torch.from_numpy(u8), torch.from_numpy(split.labels), None)
    if cfg.int8:
        out["calibration"] = train_split(run, ds.splits[train], inputs, progress)
    return out


def train_split(run: dict, split, inputs: dict, progress: Progress | None) -> SplitData:
    """The train split as the student trained on it: its stored views (rendered when used) or its images."""
    if not run["config"].get("views"):
        u8 = pixels.load_or_build(split, inputs["size"], inputs["resample"], progress=progress)
        return SplitData(split.name, split.ids, torch.from_numpy(u8), torch.from_numpy(split.labels), None)
    cache_dir = run["config"].get("cache")
    if not cache_dir or not Path(cache_dir).is_dir():
        raise KdpipeError(f"--int8: calibration data missing: the run trained on the stored views of its cache "
                          f"{cache_dir}, which is gone; restore it, or export without --int8")
    return load_views(open_cache(Path(cache_dir)), split, inputs, torch.device("cpu"), progress)


def calibration_batches(data: SplitData, inputs: dict, count: int, run: dict) -> list[np.ndarray]:
    """`count` train images (all, if fewer), chosen with the run's seed; one stored view of each (a random one of
    its views, the image itself among them) where the run trained on views. Batches of BATCH, normalised."""
    seed = int(run.get("seed", 0))
    chosen = np.sort(np.random.default_rng([seed, 61]).permutation(len(data))[:count])
    if data.per_image > 1:
        data.view_of = torch.from_numpy(views.epoch_views(len(data), data.per_image, 0, seed))
    batches = [torch.from_numpy(chosen[i:i + BATCH]) for i in range(0, len(chosen), BATCH)]
    data.plan(batches)
    return [pixels.normalise(data.batch(b, torch.device("cpu"))["pixels"], inputs["mean_t"], inputs["std_t"]).numpy()
            for b in batches]


# ----------------------------------------------------------------------------------------------- fidelity


def check_fp32(sess, data: dict[str, SplitData], reference: dict[str, np.ndarray], inputs: dict,
               cfg: ExportConfig) -> dict:
    """Per split: max |Δlogit| and argmax agreement of the ONNX model against the PyTorch student, and both
    accuracies; refused when a bound is missed."""
    out = {}
    for name, torch_logits in reference.items():
        onnx_logits, labels = run_onnx(sess, data[name], inputs), data[name].labels.numpy()
        m = {"max_abs_logit_diff": float(np.abs(onnx_logits - torch_logits).max()),
             "max_abs_logit": float(np.abs(torch_logits).max()),  # the scale the difference is measured against
             "agreement": metrics.agreement(onnx_logits, torch_logits),
             "accuracy_pytorch": metrics.accuracy(torch_logits, labels),
             "accuracy": metrics.accuracy(onnx_logits, labels), "n": len(labels)}
        out[name] = m
        if m["max_abs_logit_diff"] > cfg.max_logit_diff or m["agreement"] < cfg.min_agreement:
            raise KdpipeError(f"the fp32 ONNX model differs from the PyTorch student on {name}: max |Δlogit| "
                              f"{m['max_abs_logit_diff']:.2e} at logits up to {m['max_abs_logit']:.3g} "
                              f"(bound --max-logit-diff {cfg.max_logit_diff:g}), "
                              f"argmax agreement {m['agreement']:.2%} (bound --min-agreement {cfg.min_agreement:g}); "
                              "nothing was written: try --exporter "
                              f"{next(x for x in EXPORTERS if x != cfg.exporter)}")
    return out


def check_int8(sess, data: dict[str, SplitData], reference: dict[str, np.ndarray], inputs: dict,
               cfg: ExportConfig) -> dict:
    """Per split: the int8 model's accuracy, its drop below the fp32 PyTorch student and its argmax agreement
    with it; refused when the drop exceeds --int8-max-drop."""
    out = {}
    for name, torch_logits in reference.items():
        int8_logits, labels = run_onnx(sess, data[name], inputs), data[name].labels.numpy()
        m = {"accuracy": metrics.accuracy(int8_logits, labels),
             "accuracy_drop": metrics.accuracy(torch_logits, labels) - metrics.accuracy(int8_logits, labels),
             "agreement_with_fp32": metrics.agreement(int8_logits, torch_logits),
             "max_abs_logit_diff": float(np.abs(int8_logits - torch_logits).max()), "n": len(labels)}
        out[name] = m
        if m["accuracy_drop"] > cfg.int8_max_drop + 1e-12:
            raise KdpipeError(f"the int8 model loses {100 * m['accuracy_drop']:.1f} pp of accuracy on {name} "
                              f"(bound --int8-max-drop {cfg.int8_max_drop:g}; agreement with the fp32 student "
                              f"{m['agreement_with_fp32']:.2%}); nothing was written: export without --int8, or "
                              "calibrate on more --calibration-images")
    return out


# ----------------------------------------------------------------------------------------------- int8


class Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over prepared batches."""

    def __init__(self, batches: list[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}


def quantize(fp32: Path, out: Path, batches: list[np.ndarray]) -> dict:
    """Static post-training quantisation with ONNX Runtime: QDQ format, int8 weights per output channel (a
    depthwise convolution's channels differ by orders of magnitude) and int8 activations with MinMax ranges
    from `batches`. Returns how, for run.json."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = files.temporary(out, ".onnx")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(prepared))  # shape inference and graph fusions first, as ORT advises
            quantize_static(str(prepared), str(out), Calibration(batches), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    except Exception as e:  # noqa: BLE001  the quantiser's failure on this graph
        raise KdpipeError(f"--int8: ONNX Runtime's quantiser failed on the exported model ({_operator(e)}); export "
                          "without --int8") from None
    finally:
        prepared.unlink(missing_ok=True)
    return {"method": "static", "format": "QDQ", "weights": "int8, per channel", "activations": "int8",
            "calibration": "MinMax", "calibration_images": int(sum(len(b) for b in batches))}


# ----------------------------------------------------------------------------------------------- speed


def timings(forward: Callable[[np.ndarray], object], size: tuple[int, int], runs: int, batches: int) -> dict:
    """Latency at batch 1 (median and p90 of `runs` forwards, ms) and throughput at batch BATCH (images/s over
    `batches` forwards), after a warm-up of each. Inputs are seeded noise: these models have no data-dependent
    paths, so the time is that of any image."""
    rng = np.random.default_rng(0)
    one, many = (rng.standard_normal((n, 3, *size), dtype=np.float32) for n in (1, BATCH))
    forward(one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        forward(one)
        times.append(1e3 * (time.perf_counter() - start))
    forward(many)
    start = time.perf_counter()
    for _ in range(batches):
        forward(many)
    per_s = BATCH * batches / (time.perf_counter() - start)
    return {"latency_ms_median": statistics.median(times), "latency_ms_p90": float(np.percentile(times, 90)),
            "throughput_per_s": per_s}


def _eager(model: torch.nn.Module, precision: str) -> Callable[[np.ndarray], object]:
    device = torch.device("cpu")

    def forward(x: np.ndarray):
        with torch.inference_mode(), runtime.autocast(device, precision):
            return model(pixel_values=torch.from_numpy(x)).logits

    return forward


def _ort(sess) -> Callable[[np.ndarray], object]:
    return lambda x: sess.run([OUTPUT], {INPUT: x})


def speed(student: torch.nn.Module, folder: Path, run: dict, run_dir: Path, cfg: ExportConfig,
          progress: Progress | None) -> dict:
    """One row per model, timed in this process one after another: the teacher (PyTorch eager, and exported
    the same way as the student, fp32), the student (PyTorch eager fp32, bf16 where this CPU computes it
    natively), its ONNX fp32 and int8 models. Parameters and file bytes beside each."""
    rows, size = [], image_size(student.config)
    steps = [("student", "pytorch fp32")]
    models = {"student": student}
    teacher = _teacher(run, cfg)
    if teacher is not None:
        models["teacher"] = teacher.model
        steps = [("teacher", "pytorch fp32"), ("teacher", "onnx fp32")] + steps
    if runtime.cpu_has_fast_bf16():
        steps.append(("student", "pytorch bf16"))
    steps.append(("student", "onnx fp32"))
    if (folder / INT8).exists():
        steps.append(("student", "onnx int8"))
    student_weights = run_dir / run_folder.MODEL / "model.safetensors"
    for i, (who, how) in enumerate(steps):
        if progress:
            progress("timing", i, len(steps), f"{who} {how}")
        model = models[who]
        shape = size if who == "student" else image_size(model.config)
        row = {"model": who, "runtime": how, "parameters": sum(p.numel() for p in model.parameters()),
               "input_size": list(shape)}
        if how.startswith("pytorch"):
            forward, row["file_bytes"] = _eager(model, how.split()[1]), (
                student_weights.stat().st_size if who == "student" else _weights_bytes(teacher.spec))
        else:
            path = folder / (INT8 if how.endswith("int8") else FP32)
            if who == "teacher":
                path = folder / ".teacher.onnx"
                to_onnx(model, path, shape, cfg.exporter, cfg.opset)
            forward, row["file_bytes"] = _ort(session(path)), path.stat().st_size
        row.update(timings(forward, shape, cfg.latency_runs, cfg.throughput_batches))
        rows.append(row)
        if who == "teacher" and how.startswith("onnx"):
            path.unlink()  # measured; not part of the student's folder
    if progress:
        progress("timing", len(steps), len(steps), "")
    return {"threads": torch.get_num_threads(), "batch": BATCH, "latency_runs": cfg.latency_runs,
            "throughput_batches": cfg.throughput_batches, "cpu": runtime.cpu_model(),
            "kernels": torch.backends.cpu.get_cpu_capability(), "rows": rows,
            **({} if runtime.cpu_has_fast_bf16() else {"bf16": "not timed: this CPU emulates bf16 (no AMX or AVX512-BF16)"}),
            **({} if teacher is not None else {"teacher": "not timed: the run has no teacher (no cache)"})}


def _teacher(run: dict, cfg: ExportConfig):
    """The run's teacher (the cache's, or --teacher), loaded to be timed; None for a run without one."""
    from .teacher import load_teacher

    spec = cfg.teacher or ((run.get("cache") or {}).get("teacher") or {}).get("spec")
    if spec is None:
        return None
    teacher = load_teacher(spec)
    teacher.model.eval()
    return teacher


def _weights_bytes(spec: str) -> int | None:
    folder = Path(spec).expanduser()
    found = (sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))) if folder.is_dir() else []
    return sum(p.stat().st_size for p in found) or None


def summary(speed: dict, run: dict, fidelity: dict) -> dict:
    """What the user gets, in one line: the deployed student (int8 if written, else ONNX fp32) against the
    teacher exported the same way (ONNX fp32): × faster at batch 1 (median), × smaller on disk, and the
    accuracy difference on the test split (the student's deployed model minus the teacher's cached logits)."""
    rows = {(r["model"], r["runtime"]): r for r in speed["rows"]}
    deployed = "onnx int8" if ("student", "onnx int8") in rows else "onnx fp32"
    student, teacher = rows[("student", deployed)], rows.get(("teacher", "onnx fp32"))
    test = run["config"].get("test_split") or run["config"].get("val_split", "validation")
    acc = fidelity["int8" if deployed == "onnx int8" else "fp32"].get(test, {}).get("accuracy")
    out = {"deployed": deployed, "split": test, "accuracy": acc}
    if teacher is None:
        return out
    teacher_acc = (((run.get("cache") or {}).get("splits") or {}).get(test) or {}).get("teacher_accuracy")
    out.update(speedup=teacher["latency_ms_median"] / student["latency_ms_median"],
               throughput_gain=student["throughput_per_s"] / teacher["throughput_per_s"],
               smaller=teacher["file_bytes"] / student["file_bytes"], teacher_accuracy=teacher_acc,
               accuracy_pp=None if acc is None or teacher_acc is None else 100 * (acc - teacher_acc))
    return out


def headline(summary: dict) -> str:
    """'N× faster and M× smaller than its teacher at X pp' (the model card's and the CLI's line)."""
    if "speedup" not in summary:
        return f"{summary['deployed']}: no teacher to compare with"
    pp = f"{summary['accuracy_pp']:+.1f} pp {summary['split']} accuracy" if summary["accuracy_pp"] is not None else \
        "an unmeasured accuracy difference"
    return (f"{summary['speedup']:.1f}× faster (batch-1 latency) and {summary['smaller']:.1f}× smaller than its "
            f"teacher, both as ONNX ({summary['deployed']} student, fp32 teacher), at {pp}")
