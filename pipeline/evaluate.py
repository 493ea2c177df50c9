"""Evaluation: a student's logits over a split (`predict`, shared with training's per-epoch validation), and
`saved`, which reloads a finished run's student from its model/ folder, as a user would, and evaluates it
independently of training (kdpipe evaluate)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import files, logit_store, metrics, pixels, run_folder, runtime
from .data import reopen_dataset
from .errors import CONFIG_ERRORS, KdpipeError, reason
from .student_data import SplitData, with_tensors

@torch.no_grad()
def predict(model, data: SplitData, device, precision, inputs: dict, batch_size: int = 32) -> np.ndarray:
    """Student logits (N, C) float32 for a whole split, in eval mode. Batch 32: on a 2-core CPU larger
    batches spill the caches (128 was 1.7x slower on MobileNetV2 at 224 px)."""
    model.eval()
    out = []
    with torch.inference_mode(), runtime.autocast(device, precision):
        for start in range(0, len(data), batch_size):
            batch = data.batch(torch.arange(start, min(start + batch_size, len(data))), device)
            x = pixels.normalise(batch["pixels"], inputs["mean_t"], inputs["std_t"])
            out.append(model(pixel_values=x).logits.float().cpu())
    return torch.cat(out).numpy()


def saved(run_dir: Path, split: str = "test", dataset: str | None = None, device: str = "auto",
          progress: Callable[[str, int, int, str], None] | None = None) -> dict:
    """Reload a saved student (model/ with its preprocessor_config.json) and evaluate it on `split`,
    independently of training: inputs are rebuilt from the saved processor, labels from the dataset."""
    r, model, proc = load_saved(Path(run_dir))
    ds = reopen_dataset(r["dataset"], dataset, [split], flags={split: "--split"})
    if ds.label_names != [model.config.id2label[i] for i in range(model.config.num_labels)]:
        raise KdpipeError(f"--dataset {ds.spec}: labels {ds.label_names} differ from the student's")
    dev = runtime.resolve_device(device)
    inputs = with_tensors({"size": (proc.size["height"], proc.size["width"]), "resample": int(proc.resample),
                            "mean": list(proc.image_mean), "std": list(proc.image_std)}, dev)
    source = ds.splits[split]
    teacher, teacher_note = _cached_teacher(r["config"].get("cache"), source)
    data = SplitData(split, source.ids,
                     pixels.as_tensor(pixels.load_or_build(source, inputs["size"], inputs["resample"],
                                                           progress=progress), dev),
                     torch.from_numpy(source.labels), teacher)
    model = runtime.prepare_model(model, dev)
    precision = runtime.precision_on(r["precision"], dev)  # a GPU's fp16 run is evaluated in fp32 on a CPU
    runtime.configure_backends(dev, precision)
    logits = predict(model, data, dev, precision, inputs)
    report = metrics.classification_report(logits, source.labels, teacher.numpy() if teacher is not None else None)
    report["confusion_matrix"] = metrics.confusion_matrix(logits.argmax(1), source.labels, len(ds.label_names)).tolist()
    report["label_names"] = ds.label_names
    if teacher_note:
        report["teacher_note"] = teacher_note
    return report


def _cached_teacher(cache_dir: str | None, source) -> tuple[torch.Tensor | None, str | None]:
    """The run's cached teacher logits for this split's images, to measure agreement with the teacher: only where
    the cache holds exactly these images (its dataset fingerprint); another dataset is evaluated without them,
    with the reason."""
    path = logit_store.split_path(Path(cache_dir), source.name) if cache_dir else None
    if path is None or not path.exists():
        return None, None
    cached = logit_store.read_split(path)
    if cached.meta["dataset_fingerprint"] != source.fingerprint():
        return None, f"teacher agreement not measured: {_how_they_differ(cached, source)}"
    return torch.from_numpy(cached.aligned_to(source.ids, source.labels, f"cache split {source.name!r}")), None


def _how_they_differ(cached, source) -> str:
    """Why the cache's split is not this dataset's: its example ids, or (same ids) the image bytes or labels.
    The same pixels in another format (PNG folder, Parquet) differ in ids or in bytes, never in nothing."""
    name, ids = source.name, set(source.ids)
    missing = len(ids - set(cached.ids))
    if missing or len(ids) != len(set(cached.ids)):
        return (f"the run's cache has other example ids for split {name!r} ({missing} of this dataset's {len(ids)} "
                f"ids are not in it; the cache has {len(set(cached.ids))}): images are matched by id")
    return (f"the run's cache has the same ids for split {name!r} but other image bytes or labels (another format "
            "or re-encoded images are other bytes: the teacher saw other pixels, or other labels)")


def load_saved(run_dir: Path):
    """(run.json, model, image processor) of a finished run, its weights checked against run.json's sha256."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if not (run_dir / run_folder.RUN_JSON).exists():
        if (run_dir / run_folder.CHECKPOINT).exists():
            done = len(run_folder.read_history(run_dir)) if (run_dir / run_folder.METRICS).exists() else 0
            raise KdpipeError(f"{run_dir}: its training was interrupted after epoch {done}, before the student was "
                              f"saved; finish it with kdpipe train-student --out {run_dir} --resume and the flags it "
                              "was started with, then evaluate it")
        raise KdpipeError(f"{run_dir}: no run.json; pass a folder written by kdpipe train-student")
    r = run_folder.load_report(run_dir).run
    model_dir = run_dir / run_folder.MODEL
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise KdpipeError(f"{weights} is missing: the saved student is incomplete; restore the run's model/ folder, "
                          "or train again")
    expected = r.get("student", {}).get("weights_sha256")
    if expected and files.sha256(weights) != expected:
        raise KdpipeError(f"{weights} does not match the checksum in run.json "
                          "(corrupted or replaced); retrain, or restore the file")
    try:
        return r, AutoModelForImageClassification.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, RuntimeError, *CONFIG_ERRORS) as e:  # config.json or preprocessor_config.json damaged
        raise KdpipeError(f"{model_dir}: cannot load the saved student ({reason(e)}); restore the run's "
                          "model/ folder, or train again") from None


