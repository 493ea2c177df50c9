"""`kdpipe inspect-cache --verify N`: replay the teacher live on cached rows and compare its logits with the
stored ones, each input rebuilt from the stored parameters alone (teacher_inputs.view_input)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import logit_store, runtime, views
from .data import reopen_dataset
from .errors import KdpipeError
from .teacher import load_teacher
from .teacher_inputs import view_input


def replay(cache_dir: Path, n: int, teacher_spec: str | None = None, dataset_spec: str | None = None,
           device: str = "auto", seed: int = 0) -> dict:
    """Fidelity check: re-run the teacher live on `n` random cached (image, view) rows of every split,
    rebuilding each input from the stored parameters alone (view 0: the teacher's processor; view v > 0:
    views.render with the stored box and flip, blended with the stored partner view where there is one),
    and compare with the cached logits. Returns the largest |Δlogit|, mean and max KL(cached ‖ live) at
    T = 1, and argmax agreement. Top-K caches are compared on
    their dense reconstruction (TopK.dense) and, for |Δlogit|, on the stored top-K entries only."""
    cached = {name: logit_store.read_split(path) for name, path in logit_store.cache_splits(cache_dir).items()}
    meta = next(iter(cached.values())).meta
    teacher = _recorded_teacher(meta["teacher"], teacher_spec)
    dataset = reopen_dataset(meta["dataset"], dataset_spec, list(cached))
    picked = _pick(cached, n, seed)
    inputs = _rebuilt_inputs(cache_dir, cached, dataset, teacher.processor, picked)  # n arrays (3, H, W)
    dev = runtime.resolve_device(device)
    precision = runtime.precision_on(meta["precision"], dev)  # a GPU's fp16 cache is replayed in fp32 on a CPU
    live = _live_logits(teacher.model, inputs, dev, precision)[:, np.asarray(meta["teacher"]["label_map"])]
    rows = [cached[name].take(np.array([j])) for name, j in picked]
    stored = np.stack([row.teacher_logits()[0] for row in rows])  # (n, C) dataset label order
    sparse = None if rows[0].topk is None else [(row.topk.indices[0], row.topk.values[0]) for row in rows]
    report = {"pairs": len(picked), "augmented_views": int(sum(cached[n].view[j] > 0 for n, j in picked)),
              "mixed_views": int(sum(cached[n].mixes is not None and cached[n].mixes.weights[j] > 0 for n, j in picked)),
              **compare_logits(live, stored, sparse), "precision": precision, "cache_precision": meta["precision"],
              "device": runtime.describe(dev), "tolerance": _replay_tolerance(meta, precision),
              "weights_sha256": {"cache": meta["teacher"].get("weights_sha256"), "live": teacher.weights_sha256}}
    report["within_tolerance"] = report["max_abs_diff"] <= report["tolerance"]
    return report


def _recorded_teacher(recorded: dict, teacher_spec: str | None):
    """The teacher the cache records (its folder, or hub id at its revision), or `teacher_spec` instead."""
    if teacher_spec is None and recorded.get("weights_sha256") and not Path(recorded["spec"]).expanduser().is_dir():
        raise KdpipeError(f"--teacher: the recorded teacher folder {recorded['spec']} is gone (moved, deleted, or "
                          "recorded relative to another working folder); pass --teacher PATH to where it is now")
    return load_teacher(teacher_spec or recorded["spec"], None if teacher_spec else recorded["revision"], False)


def _pick(cached: dict, n: int, seed: int) -> list[tuple[str, int]]:
    """`n` (split, row) pairs drawn without replacement from every split's rows, in file order."""
    pool = [(name, j) for name, s in cached.items() for j in range(len(s.ids))]
    return [pool[i] for i in sorted(np.random.default_rng(seed).choice(len(pool), min(n, len(pool)), replace=False))]


def _replay_tolerance(meta: dict, precision: str) -> float:
    """The largest |Δlogit| a faithful cache shows against its teacher replayed at `precision`: the cache's
    precision and the replay's (runtime.logit_tolerance), and fp16's rounding of top-K values stored as fp16."""
    storage = meta.get("logits_storage", logit_store.FULL)
    stored_fp16 = ("fp16",) if storage.get("dtype") == "float16" else ()
    return runtime.logit_tolerance(meta["precision"], precision, *stored_fp16)


def _rebuilt_inputs(cache_dir: Path, cached: dict, dataset, processor, picked: list[tuple[str, int]]) -> list:
    """The teacher's input of each picked (split, row), rebuilt from the image and the row's stored view."""
    meta = next(iter(cached.values())).meta
    inputs = views.processor_inputs(meta["processor"], str(cache_dir)) if any(
        s.boxes is not None for s in cached.values()) else None
    index = {name: {id_: i for i, id_ in enumerate(split.ids)} for name, split in dataset.splits.items()}

    def image(name: str, id_: str, what: str):
        if id_ not in index[name]:
            raise KdpipeError(f"{cache_dir}: {what} {id_!r} is not in the dataset's {name!r} split; "
                              "pass the dataset it was built from with --dataset")
        return dataset.splits[name].image(index[name][id_])

    out = []
    for name, j in picked:
        c = cached[name]
        own = image(name, c.ids[j], "cached id")
        stored_view = None if c.view[j] == 0 else (c.boxes[j], c.flips[j])
        mix = None
        if c.mixes is not None and c.mixes.weights[j]:
            mix = (image(name, c.mixes.partners[j], "mixed-view partner"), c.mixes.boxes[j], c.mixes.flips[j],
                   c.mixes.weights[j])
        out.append(view_input(own, processor, stored_view, inputs, mix))
    return out


def _live_logits(model, inputs: list, dev: torch.device, precision: str, batch: int = 32) -> np.ndarray:
    """The teacher's logits on `inputs`, in its own label order."""
    model = runtime.prepare_model(model, dev)
    runtime.configure_backends(dev, precision)
    live = []
    with torch.inference_mode(), runtime.autocast(dev, precision):
        for start in range(0, len(inputs), batch):
            x = torch.from_numpy(np.stack(inputs[start:start + batch]).astype(np.float32)).to(dev)  # (B, 3, H, W)
            live.append(model(pixel_values=x.contiguous(memory_format=torch.channels_last)).logits.float().cpu())
    return torch.cat(live).numpy()  # (n, C)


def compare_logits(live: np.ndarray, stored: np.ndarray, sparse: list | None) -> dict:
    """Largest |Δlogit| (on the stored top-K entries of a top-K cache), KL(stored ‖ live) at T = 1, agreement."""
    if sparse is None:
        diff = np.abs(live - stored).max()
    else:
        diff = max(np.abs(live[i, idx] - vals).max() for i, (idx, vals) in enumerate(sparse))
    kl = torch.nn.functional.kl_div(torch.log_softmax(torch.from_numpy(live), 1),
                                    torch.log_softmax(torch.from_numpy(stored), 1), log_target=True,
                                    reduction="none").sum(1).numpy()  # (n,)
    return {"max_abs_diff": float(diff), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "agreement": float((live.argmax(1) == stored.argmax(1)).mean())}
