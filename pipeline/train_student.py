"""Stage two: train a student against cached teacher logits. setup -> fit -> finish; `evaluate` reloads.

The teacher is never loaded here. Images are decoded once into a uint8 store (pixels.py); each step
slices it, normalises on the device and runs the student under autocast in channels_last.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import locking, logit_store, loss, metrics, mixing, model_card, pixels, runtime, views
from .config import TrainConfig, without_new_defaults
from .data import ImageDataset, open_dataset, reopen_dataset
from .errors import KdpipeError
from .logit_store import TopK
from .student import batchnorm_layers, build_student, image_size, save_student, set_bn_momentum

Progress = Callable[[str, int, int, str], None]  # (task, done, total, info)
DEFAULT_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # used only without a cache (alpha = 0): ViT's
LOG_EVERY = 25  # steps between host syncs for the live loss


@dataclass
class SplitData:
    name: str
    ids: list[str]
    pixels: torch.Tensor | None  # (N, H, W, 3) uint8, on the device when it fits; None with a `source`
    labels: torch.Tensor  # (N,) int64
    teacher_logits: torch.Tensor | TopK | None  # (N * V, C) float32, dataset label order; TopK: densified per batch
    views: int = 1  # V stored views per image (cache-teacher --views): pixels and teacher rows i * V + v
    view_of: torch.Tensor | None = None  # (N,) the view each image uses this epoch (views.epoch_views)
    targets: torch.Tensor | None = None  # (N * V, C) float32 label distributions of mixed views, else None
    source: pixels.ViewSource | None = None  # renders rows i * V + v when used, instead of a pixel store

    def __len__(self):
        return len(self.ids)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The stored rows of images `idx` this epoch: i, or with views i * V + view_of[i]."""
        return idx if self.views == 1 else idx * self.views + self.view_of[idx.to(self.view_of.device)].to(idx.device)

    def plan(self, batches: list[torch.Tensor]) -> None:
        """With a `source`, start rendering these batches of images (in the order `batch` will ask for them)
        on its background threads; without one, nothing to do."""
        if self.source is not None:
            self.source.plan([self.rows(idx).cpu().numpy() for idx in batches])

    def batch(self, idx: torch.Tensor, device: torch.device) -> dict:
        """Images `idx` (B,): pixels (B, H, W, 3) uint8, labels (B,) (or (B, C) label distributions of mixed
        views), teacher_logits (B, C) of the same view."""
        rows = self.rows(idx)
        labels = (self.labels[idx.to(self.labels.device)] if self.targets is None
                  else self.targets[rows.to(self.targets.device)])
        u8 = (self.source.take(rows.cpu().numpy()) if self.source is not None
              else self.pixels[rows.to(self.pixels.device)])
        u8 = torch.from_numpy(u8) if isinstance(u8, np.ndarray) else u8  # a DeviceViewSource renders on the device
        out = {"pixels": u8, "labels": labels}
        if isinstance(self.teacher_logits, TopK):
            out["teacher_logits"] = torch.from_numpy(self.teacher_logits.take(rows.cpu().numpy()).dense())  # (B, C)
        elif self.teacher_logits is not None:
            out["teacher_logits"] = self.teacher_logits[rows.to(self.teacher_logits.device)]
        return runtime.to_device(out, device)


@dataclass
class Setup:
    cfg: TrainConfig
    device: torch.device
    precision: str
    model: torch.nn.Module  # the student (uncompiled: its state_dict is what we save)
    forward: Callable  # the model, or its torch.compile'd version
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    splits: dict[str, SplitData]
    label_names: list[str]
    inputs: dict  # size, resample, mean, std: how pixels become the student's input
    out: Path
    provenance: dict
    generator: torch.Generator
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": None, "accuracy": -1.0, "state": None})
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (runtime.grad_scaler); None = plain steps


# --------------------------------------------------------------------------------------------- setup


class SharedData:
    """The opened cache and dataset and the device-resident pixels, kept for the next run in the same
    process (a sweep's trials differ in training settings, not in data): each is read once."""

    def __init__(self):
        self._items: dict[tuple, object] = {}

    def get(self, key: tuple, build: Callable[[], object]):
        if key not in self._items:
            self._items[key] = build()
        return self._items[key]


def setup(cfg: TrainConfig, progress: Progress | None = None, shared: SharedData | None = None) -> Setup:
    out = cfg.out_dir()
    _claim_out_dir(out, cfg)
    generator = runtime.seed_everything(cfg.seed)
    shared = shared or SharedData()
    source = (str(cfg.cache), cfg.dataset, cfg.image_column, cfg.label_column, cfg.train_split, cfg.val_split,
              cfg.test_split)
    cache, dataset = shared.get(("source", *source), lambda: _open_source(cfg))
    model = build_student(cfg.student, dataset.label_names, cfg.student_config)
    set_bn_momentum(model, cfg.bn_momentum)
    device = runtime.resolve_device(cfg.device)
    precision = runtime.resolve_precision(cfg.precision, device)
    runtime.configure_backends(device, precision)
    inputs = _input_spec(model, cache)  # the training resolution; evaluation at --eval-size when given
    if min(inputs["size"]) < 1:
        raise KdpipeError(f"--student-config: image size {tuple(inputs['size'])} must be at least 1 pixel a side")
    eval_size = (cfg.eval_size, cfg.eval_size) if cfg.eval_size else inputs["size"]
    sizes = {name: eval_size for name in (cfg.val_split, cfg.test_split) if name and name != cfg.train_split}
    view_split = cfg.train_split if cfg.views else None
    splits = shared.get(("splits", *source, inputs["size"], eval_size, inputs["resample"], str(device), view_split),
                        lambda: _load_splits(cache, dataset, inputs, device, progress, view_split, sizes))
    if cfg.alpha > 0 and splits[cfg.train_split].teacher_logits is None:
        raise KdpipeError(f"--cache {cfg.cache} has no {cfg.train_split!r} split; cache it or use --alpha 0")
    _refuse_changed_images(cfg, dataset, _changed_images(cache, dataset))
    if cfg.alpha > 0:
        _check_targets(cfg, splits[cfg.train_split])
    model = runtime.prepare_model(model, device)
    optimizer, scheduler = _optimizer(model, cfg, steps_per_epoch=math.ceil(len(splits[cfg.train_split]) / cfg.batch_size))
    forward = runtime.compile_model(model, device) if cfg.compile else model
    if runtime.distributed()[1] > 1:  # data-parallel: gradients averaged across processes every step
        forward = torch.nn.parallel.DistributedDataParallel(forward, device_ids=[device] if device.type == "cuda" else None)
    provenance = _provenance(cfg, cache, dataset, device, precision)
    return Setup(cfg, device, precision, model, forward, optimizer, scheduler, dict(splits), dataset.label_names,
                 _with_tensors({**inputs, "size": eval_size, "train_size": inputs["size"]}, device), out, provenance,
                 generator, scaler=runtime.grad_scaler(device, precision))


def _check_targets(cfg: TrainConfig, train: SplitData) -> None:
    """Refuse a loss the cached targets cannot serve (docs/training.md, "Top-K caches and mixed targets")."""
    teacher = train.teacher_logits
    if isinstance(teacher, TopK) and teacher.values.shape[1] < teacher.num_classes:
        why = loss.topk_refusal(cfg.loss, cfg.standardize)
        if why:
            raise KdpipeError(f"--loss {cfg.loss}{' --standardize' if cfg.standardize else ''}: {why} (--cache "
                              f"{cfg.cache} keeps {teacher.values.shape[1]} of {teacher.num_classes}); use --loss kd "
                              "or dkd without --standardize, or a cache of full logits")
    if cfg.loss == "dkd" and train.targets is not None:
        raise KdpipeError(f"--loss dkd needs one target class per example, and --cache {cfg.cache} holds views "
                          "blended from two images (--view-mixup); use --loss kd or dist, or a cache without it")


def _open_source(cfg: TrainConfig) -> tuple[dict | None, ImageDataset]:
    cache = _open_cache(cfg.cache) if cfg.cache else None
    return cache, _open_dataset(cfg, cache)


def _load_splits(cache: dict | None, dataset: ImageDataset, inputs: dict, device, progress,
                 view_split: str | None = None, sizes: dict | None = None) -> dict[str, SplitData]:
    """Each split as uint8 pixels at the student's resolution (decoded once, pixels.load_or_build; `sizes`:
    another resolution for some splits, --eval-size), its labels, and the teacher's logits joined by id;
    `view_split` with every view the cache stores for it, rendered when used exactly as the teacher saw
    them (pixels.ViewSource)."""
    splits = {}
    for name, split in dataset.splits.items():
        if name == view_split:
            splits[name] = _load_views(cache, split, inputs, device, progress)
            continue
        u8 = pixels.load_or_build(split, (sizes or {}).get(name, inputs["size"]), inputs["resample"], progress=progress)
        teacher = None
        if cache is not None and name in cache:
            teacher = cache[name].aligned_to(split.ids, split.labels, f"--cache split {name!r}", sparse=True)
            if isinstance(teacher, np.ndarray):
                teacher = torch.from_numpy(teacher).to(device)
        splits[name] = SplitData(name, split.ids, pixels.as_tensor(u8, device), torch.from_numpy(split.labels).to(device),
                                 teacher)
    return splits


def _load_views(cache: dict | None, split, inputs: dict, device, progress) -> SplitData:
    where = f"--views: --cache split {split.name!r}"
    if cache is None or split.name not in cache:
        raise KdpipeError(f"{where} is missing; build the cache with kdpipe cache-teacher --views K")
    stored = cache[split.name].aligned_views(split.ids, split.labels, where)  # rows i * V + v
    v, n = stored.views_per_image, len(split)
    mixes, targets = _mixed_views(stored, split, where)
    originals = pixels.load_or_build_originals(split, progress=progress)  # None over its cap: decode when used
    params = (stored.boxes.reshape(n, v, 4), stored.flips.reshape(n, v), inputs["size"], inputs["resample"])
    if device.type == "cuda" and inputs["resample"] in pixels.FILTERS:  # rendered in batches on the GPU
        array = originals.array if originals is not None else lambda i: np.asarray(split.image(i))
        source = pixels.DeviceViewSource(array, *params, device, mixes)
    else:  # on background threads
        source = pixels.ViewSource(split.image if originals is None else originals.image, *params, mixes)
    teacher = stored.topk if stored.topk is not None else torch.from_numpy(stored.logits).to(device)
    return SplitData(split.name, split.ids, None, torch.from_numpy(split.labels).to(device), teacher, views=v,
                     targets=None if targets is None else targets.to(device), source=source)


def _mixed_views(stored: logit_store.LogitSplit, split, where: str) -> tuple[views.Mixes | None, torch.Tensor | None]:
    """For a cache of mixed views: their Mixes with partners as split indices, and each view's label
    distribution (1 - w) * onehot(y) + w * onehot(y_partner) (N * V, C), mixup's target for the CE term."""
    if stored.mixes is None:
        return None, None
    index = {id_: i for i, id_ in enumerate(split.ids)}
    m = stored.mixes
    mixed = m.weights > 0
    missing = sorted({p for p in m.partners[mixed] if p not in index})
    if missing:
        raise KdpipeError(f"{where}: mixed views blend images missing from the dataset (e.g. {missing[0]}); "
                          "use the dataset the cache was built from")
    partners = np.array([index[p] if w > 0 else -1 for p, w in zip(m.partners, m.weights)], dtype=np.int64)
    rows = np.repeat(np.arange(len(split)), stored.views_per_image)
    w = torch.from_numpy(m.weights.astype(np.float32))[:, None]  # (N * V, 1)
    eye = torch.eye(stored.meta["num_classes"])
    own = eye[torch.from_numpy(split.labels[rows])]
    other = eye[torch.from_numpy(split.labels[np.where(partners >= 0, partners, rows)])]
    return views.Mixes(partners, m.boxes, m.flips, m.weights), (1 - w) * own + w * other


# What a run folder may hold; state.pt is benchmarks/reproduce_results.py's per-epoch state of its BN variants.
RUN_FILES = ("checkpoint.pt", "checkpoint.sha256", "metrics.jsonl", "run.json", "model", "tensorboard", "state.pt")


def _claim_out_dir(out: Path, cfg: TrainConfig) -> None:
    held = sorted(p.name for p in out.iterdir() if p.name != locking.LOCK_NAME) if out.is_dir() else []
    if held and not set(held) & set(RUN_FILES):  # a cache, a sweep, someone's documents: never written into
        raise KdpipeError(f"--out {out} is not a train-student run folder (it holds {', '.join(held[:3])}"
                          f"{', ...' if len(held) > 3 else ''}), so there is no run to --resume there; choose a new or "
                          "empty --out")
    if held and not cfg.resume:
        raise KdpipeError(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def _open_cache(cache_dir: Path) -> dict[str, logit_store.LogitSplit]:
    cache = {name: logit_store.read_split(path) for name, path in logit_store.cache_splits(cache_dir).items()}
    logit_store.check_one_source({name: split.meta for name, split in cache.items()}, f"--cache {cache_dir}")
    return cache


def _open_dataset(cfg: TrainConfig, cache: dict | None) -> ImageDataset:
    flags = {s: flag for flag, s in (("--test-split", cfg.test_split), ("--val-split", cfg.val_split),
                                     ("--train-split", cfg.train_split)) if s}  # a split asked twice: the first flag
    wanted = list(dict.fromkeys(s for s in (cfg.train_split, cfg.val_split, cfg.test_split) if s))
    if cache is None:
        return open_dataset(cfg.dataset, splits=wanted, image_column=cfg.image_column, label_column=cfg.label_column,
                            flags=flags)
    meta = next(iter(cache.values())).meta
    dataset = reopen_dataset(meta["dataset"], cfg.dataset, wanted, cfg.image_column, cfg.label_column, flags)
    if dataset.label_names != meta["label_names"]:
        raise KdpipeError(f"--dataset {dataset.spec} has labels {dataset.label_names} but --cache {cfg.cache} has "
                          f"{meta['label_names']}; use the dataset the cache was built from")
    return dataset


def _input_spec(model, cache: dict | None) -> dict:
    """Student inputs: the student's resolution, with the teacher processor's filter and statistics
    (the guide feeds the student the teacher processor's pixels)."""
    mean, std, resample = *DEFAULT_MEAN_STD, 2
    if cache is not None:
        proc = next(iter(cache.values())).meta["processor"]
        mean, std = proc.get("image_mean", mean), proc.get("image_std", std)
        resample = proc.get("resample", resample)
    return {"size": image_size(model), "resample": int(resample), "mean": list(mean), "std": list(std)}


def _with_tensors(inputs: dict, device: torch.device) -> dict:
    return {**inputs, "mean_t": torch.tensor(inputs["mean"], device=device),
            "std_t": torch.tensor(inputs["std"], device=device)}


def _optimizer(model, cfg: TrainConfig, steps_per_epoch: int):
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no decay on biases and norm scales
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _consistency(cfg: TrainConfig, cache: dict | None) -> dict:
    """Whether the student's inputs are the inputs the cached teacher logits belong to."""
    stored = cache[cfg.train_split].meta.get("augment") if cache and cfg.train_split in cache else None
    out = {"views": bool(cfg.views), "stored_views": stored, "online_augment": cfg.augment,
           "consistent": cfg.augment == "none" or cfg.alpha == 0}
    if not out["consistent"]:
        out["warning"] = (f"--augment {cfg.augment} with --allow-inconsistent: the student's inputs are not the "
                          "inputs of the cached teacher logits it is distilled from")
    if cfg.mix != "none":
        out["mix"] = {"kind": cfg.mix, "alpha": cfg.mix_alpha,
                      "note": "inputs mixed within each batch, teacher distributions mixed in the same proportion: "
                              "an approximation, the teacher never saw the mixed images"}
    return out


def _provenance(cfg, cache, dataset: ImageDataset, device, precision) -> dict:
    out = {"config": cfg.to_dict(), "versions": runtime.versions(), "device": runtime.describe(device),
           "precision": precision, "processes": runtime.distributed()[1], "dataset": dataset.identity,
           "dataset_fingerprints": {n: s.fingerprint() for n, s in dataset.splits.items()},
           "consistency": _consistency(cfg, cache)}
    if cache is not None:
        meta = next(iter(cache.values())).meta
        out["cache"] = {"dir": str(cfg.cache), "teacher": meta["teacher"], "processor": meta["processor"],
                        "precision": meta["precision"],
                        "splits": {n: {"content_sha256": s.meta["content_sha256"],
                                       "dataset_fingerprint": s.meta["dataset_fingerprint"],
                                       "teacher_accuracy": s.meta["teacher_accuracy"]} for n, s in cache.items()}}
        changed = _changed_images(cache, dataset)
        out["cache_matches_dataset_contents"] = not changed
        if changed:  # only reached with --allow-changed-data (_refuse_changed_images)
            out["changed_data"] = {"accepted": True, "flag": "--allow-changed-data", "splits": changed,
                                   "warning": f"trained with --allow-changed-data: {_describe_changed(changed)}; "
                                              "the cached teacher logits of those examples belong to other pixels"}
    return out


def _changed_images(cache: dict | None, dataset: ImageDataset) -> dict[str, dict]:
    """Per split in both the cache and the dataset whose contents differ from those the cache was built
    from (dataset fingerprint): how many images changed under the same id and the first of them, from the
    per-image SHA-256s the cache stores; `examples` None for a cache written before it stored them. Ids and
    labels were checked already (LogitSplit.aligned_to); rows merely in another order count as unchanged."""
    out = {}
    for name, split in dataset.splits.items():
        if cache is None or name not in cache or split.fingerprint() == cache[name].meta["dataset_fingerprint"]:
            continue
        changed = cache[name].changed_images(split.ids, split.digests())
        if changed is None or changed:
            out[name] = {"examples": None if changed is None else len(changed), "of": len(split),
                         "example": changed[0] if changed else None}
    return out


def _describe_changed(changed: dict[str, dict]) -> str:
    counts = [c["examples"] for c in changed.values()]
    if None in counts:  # an older cache: which images is unknown
        return (f"the images of split {next(iter(changed))!r} differ from those the cache was built from (it predates "
                "per-image digests: rebuilding it names them)")
    per = ", ".join(f"split {name!r}: {c['examples']} of {c['of']}" for name, c in changed.items())
    example = next(iter(changed.values()))["example"]
    return f"{sum(counts)} example{'s' if sum(counts) != 1 else ''} changed since the cache was built ({per}; e.g. {example})"


def _refuse_changed_images(cfg: TrainConfig, dataset: ImageDataset, changed: dict[str, dict]) -> None:
    """Training against logits of other pixels is the one silent error a logit cache invites: refused
    unless --allow-changed-data (then recorded in run.json as `changed_data`)."""
    if changed and not cfg.allow_changed_data:
        raise KdpipeError(f"--dataset {dataset.spec}: {_describe_changed(changed)}, so their teacher logits in --cache "
                          f"{cfg.cache} belong to other pixels; rebuild the cache with kdpipe cache-teacher --force, "
                          "or pass --allow-changed-data to train anyway (recorded in run.json)")


# ----------------------------------------------------------------------------------------------- fit


def student_inputs(s: Setup, batch: dict) -> torch.Tensor:
    return pixels.normalise(batch["pixels"], s.inputs["mean_t"], s.inputs["std_t"])  # (B, 3, H, W)


def train_epoch(s: Setup, epoch: int, progress: Progress | None = None) -> dict:
    """One pass over the train split in batches of cfg.batch_size. Under torchrun each of N processes
    takes every N-th example of each batch (same order everywhere: same seed), DDP averages the
    gradients, and a final batch smaller than N is skipped so no process idles in a step."""
    cfg, data = s.cfg, s.splits[s.cfg.train_split]
    rank, world = runtime.distributed()
    s.model.train()
    if data.views > 1:  # this epoch's view of every image; its teacher targets come with it (consistent)
        data.view_of = torch.from_numpy(views.epoch_views(len(data), data.views, epoch, cfg.seed))
    order = torch.randperm(len(data), generator=s.generator)
    names = loss.PARTS[cfg.loss]  # loss, ce, kd and the loss's own parts
    sums = torch.zeros(len(names) + 1, device=s.device)  # each part summed over examples, then the examples
    batches = order.split(cfg.batch_size)  # every process sees the same batches; it takes its share of each
    steps = len(batches)
    data.plan([b[rank::world] for b in batches])  # views rendered ahead, off this thread (pixels.ViewSource)
    bad_at = torch.full((len(names),), steps, dtype=torch.long, device=s.device)  # first non-finite step per part
    for step, whole in enumerate(batches):
        if world > 1 and len(whole) < world:
            continue
        idx = whole[rank::world]
        batch = data.batch(idx, s.device)
        if cfg.augment == "flip":  # online, not seen by the teacher: only with alpha 0 or --allow-inconsistent
            flip = (torch.rand(len(idx), generator=s.generator) < 0.5).to(s.device)
            batch["pixels"] = torch.where(flip[:, None, None, None], batch["pixels"].flip(2), batch["pixels"])
        x = student_inputs(s, batch)  # (B, 3, H, W)
        mix = mixing.sample(cfg.mix, cfg.mix_alpha, x.shape, s.generator) if cfg.mix != "none" else None
        with runtime.autocast(s.device, s.precision):
            student_logits = s.forward(pixel_values=mixing.apply(x, mix) if mix else x).logits  # (B, C)
        parts = loss.compute(cfg.loss, student_logits, batch["labels"], batch.get("teacher_logits"),
                             temperature=cfg.temperature, alpha=cfg.alpha, mix=mix, standardize=cfg.standardize,
                             dkd_beta=cfg.dkd_beta, dist_gamma=cfg.dist_gamma)
        if s.scaler is not None:  # fp16: scaled backward, unscaled (or skipped) step
            s.scaler.scale(parts["loss"]).backward()
            s.scaler.step(s.optimizer)
            s.scaler.update()
        else:
            parts["loss"].backward()
            s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        n = len(batch["labels"])
        values = torch.stack([parts[k].detach().float() for k in names])
        bad_at = torch.where(torch.isfinite(values), bad_at, bad_at.clamp(max=step))  # on the device: no sync
        sums += torch.cat([values * n, torch.tensor([float(n)], device=s.device)])
        if step % LOG_EVERY == 0:  # a host sync every LOG_EVERY steps, as for the live loss
            _stop_if_non_finite(bad_at, names, epoch, steps, world)
        if progress and (step % LOG_EVERY == 0 or step == steps - 1):
            progress(f"epoch {epoch + 1}/{cfg.epochs}", step + 1, steps, f"loss {(sums[0] / sums[-1]).item():.4f}")
    _stop_if_non_finite(bad_at, names, epoch, steps, world)
    if world > 1:
        torch.distributed.all_reduce(sums)  # every process's examples
    return dict(zip(names, (sums[:-1] / sums[-1]).tolist()))


def _stop_if_non_finite(bad_at: torch.Tensor, names: tuple, epoch: int, steps: int, world: int) -> None:
    """Stop the run when a loss term was inf or NaN at some step so far (`bad_at`: per part of the loss, the
    first such step, `steps` if none), naming the epoch, the step and the terms; the epoch is not
    checkpointed, so nothing non-finite reaches the checkpoint, metrics.jsonl or the saved student."""
    if world > 1:  # every process stops alike (the same steps on all)
        torch.distributed.all_reduce(bad_at, op=torch.distributed.ReduceOp.MIN)
    first = int(bad_at.min())
    if first >= steps:
        return
    terms = [k for k, at in zip(names, bad_at.tolist()) if at == first and k != "loss"] or ["loss"]
    raise KdpipeError(f"the loss became non-finite at epoch {epoch + 1}, step {first + 1} of {steps} "
                      f"({'term' if len(terms) == 1 else 'terms'}: {', '.join(terms)}); the run stopped and nothing "
                      "of this epoch was written (an earlier epoch's checkpoint is kept): lower --lr, raise -T, "
                      "or use --precision fp32")


@torch.no_grad()
def recompute_bn_stats(s: Setup) -> None:
    """Precise BatchNorm (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): set every BN layer's
    running mean/variance to the exact mean/unbiased variance of its inputs over the whole train split,
    with the model in train mode (the activations it trains on) and the training batch size."""
    layers = batchnorm_layers(s.model)
    if not layers:
        return
    batches = {m: [] for m in layers}  # per batch: (count, mean, variance) per channel

    def hook(module, args):
        x = args[0].detach().float()  # (B, C, H, W)
        dims = [d for d in range(x.ndim) if d != 1]
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        batches[module].append((x.numel() // x.shape[1], mean.double(), var.double()))

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    data, bs = s.splits[s.cfg.train_split], s.cfg.batch_size
    data.plan([torch.arange(start, min(start + bs, len(data))) for start in range(0, len(data), bs)])
    s.model.train()
    # fork_rng: dropout draws in these forwards must not change the training run's random stream
    try:
        with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []), \
                runtime.autocast(s.device, s.precision):
            for start in range(0, len(data), bs):
                batch = data.batch(torch.arange(start, min(start + bs, len(data))), s.device)
                s.model(pixel_values=student_inputs(s, batch))
    finally:
        for h in handles:
            h.remove()
    for m, parts in batches.items():
        mean, var = _pooled_mean_var(parts)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))


def _pooled_mean_var(parts: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and unbiased variance of the union of batches from their (count, mean, biased var):
    M2 = sum_b n_b * (var_b + (mean_b - mean)^2)."""
    n = sum(c for c, _, _ in parts)
    mean = sum(c * mu for c, mu, _ in parts) / n
    m2 = sum(c * (v + (mu - mean) ** 2) for c, mu, v in parts)
    return mean, m2 / max(1, n - 1)


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


def evaluate_split(s: Setup, name: str) -> tuple[dict, np.ndarray]:
    data = s.splits[name]
    net = s.forward.module if isinstance(s.forward, torch.nn.parallel.DistributedDataParallel) else s.forward
    logits = predict(net, data, s.device, s.precision, s.inputs)  # every process evaluates the whole split
    teacher = data.teacher_logits
    teacher = teacher.dense() if isinstance(teacher, TopK) else teacher.cpu().numpy() if teacher is not None else None
    return metrics.classification_report(logits, data.labels.cpu().numpy(), teacher), logits


def fit(s: Setup, progress: Progress | None = None, on_epoch: Callable[[dict], None] | None = None) -> None:
    """Train the remaining epochs; after each: (precise BN), validate, keep the best, checkpoint."""
    board = _tensorboard(s)
    try:
        _fit_epochs(s, progress, on_epoch, board)
    finally:
        if board is not None:
            board.close()
            if sys.exc_info()[0] is not None and not (s.out / "checkpoint.pt").exists():
                shutil.rmtree(s.out / "tensorboard", ignore_errors=True)  # stopped before a first checkpoint


def _fit_epochs(s: Setup, progress, on_epoch, board) -> None:
    for epoch in range(len(s.history), s.cfg.epochs):
        start = time.perf_counter()
        train = train_epoch(s, epoch, progress)
        train_time = time.perf_counter() - start
        if s.cfg.precise_bn:
            recompute_bn_stats(s)
        val, _ = evaluate_split(s, s.cfg.val_split)
        record = {"epoch": epoch + 1, "lr": s.scheduler.get_last_lr()[0], "train": train, "validation": val,
                  "train_time_s": round(train_time, 3), "epoch_time_s": round(time.perf_counter() - start, 3),
                  "train_images_per_s": round(len(s.splits[s.cfg.train_split]) / train_time, 2)}
        s.history.append(record)
        if val["accuracy"] > s.best["accuracy"]:
            s.best = {"epoch": epoch + 1, "accuracy": val["accuracy"], "state": _cpu_state(s.model)}
        if _writes(s):
            _write_checkpoint(s)
        if board is not None:
            _log_scalars(board, record)
        if on_epoch:
            on_epoch(record)


def _tensorboard(s: Setup):
    """A SummaryWriter on `<out>/tensorboard` when asked for and the `tensorboard` extra is installed.
    On --resume, events after the resumed epoch (from the interrupted attempt) are purged."""
    if not s.cfg.log_tensorboard or not _writes(s):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the optional extra is absent: metrics.jsonl has everything
        return None
    return SummaryWriter(str(s.out / "tensorboard"), purge_step=len(s.history) + 1)


def _log_scalars(board, record: dict) -> None:
    step = record["epoch"]
    for part, value in record["train"].items():
        board.add_scalar(f"train/{part}", value, step)
    for key, value in record["validation"].items():
        if key != "n" and isinstance(value, (int, float)):
            board.add_scalar(f"validation/{key}", value, step)
    board.add_scalar("lr", record["lr"], step)
    board.add_scalar("train/images_per_s", record["train_images_per_s"], step)
    board.flush()


def _writes(s: Setup) -> bool:
    """Only the first process of a torchrun job writes checkpoints, metrics, the model and run.json."""
    return runtime.distributed()[0] == 0


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ checkpoint and outputs


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finite_json(value):
    """`value` with every non-finite float replaced by None (null): JSON has no NaN or Infinity, and a bare
    NaN, which json.dumps writes by default, is refused by strict readers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _json_line(record: dict) -> str:
    return json.dumps(_finite_json(record), allow_nan=False) + "\n"


def _write_checkpoint(s: Setup) -> None:
    """Everything needed to resume, written to a temporary file and renamed: never half-written.
    checkpoint.sha256 lists the digests a valid checkpoint.pt may have (the new one first, then the one
    it replaces, so a crash between the two renames is not mistaken for corruption)."""
    state = {"model": _cpu_state(s.model), "optimizer": s.optimizer.state_dict(),
             "scheduler": s.scheduler.state_dict(), "generator": s.generator.get_state(),
             "torch_rng": torch.get_rng_state(),  # dropout draws from the global generator
             "device_rng": runtime.device_rng_state(s.device),  # ... or, on a GPU, from the GPU's
             "scaler": s.scaler.state_dict() if s.scaler is not None else {},
             "best_epoch": s.best["epoch"], "best_accuracy": s.best["accuracy"], "best_state": s.best["state"],
             "config": s.cfg.to_dict(), "history": json.dumps(s.history)}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path, sums = s.out / "checkpoint.pt", s.out / "checkpoint.sha256"
    before = sums.read_text() if sums.exists() else None
    previous = before.split()[:1] if before else []
    tmp = path.with_name(f".checkpoint.pt.tmp-{os.getpid()}")
    try:
        _atomic_write_text(sums, "\n".join([hashlib.sha256(data).hexdigest(), *previous]) + "\n")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _atomic_write_text(s.out / "metrics.jsonl", "".join(map(_json_line, s.history)))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if not path.exists() or before is not None and _digest_of(path) in before.split():
            _restore(sums, before)  # the new checkpoint did not land: the digests are those of the one there
        raise KdpipeError(f"cannot write checkpoint in {s.out}: {e.strerror or e}; free space and --resume") from None


def _digest_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _restore(path: Path, text: str | None) -> None:
    """Put back a small file as it was (None: absent), on a best-effort basis: the disk may still be full."""
    try:
        if text is None:
            path.unlink(missing_ok=True)
        else:
            _atomic_write_text(path, text)
    except OSError:
        pass


def _read_checkpoint(path: Path) -> dict:
    """Load a checkpoint after checking its digest; never unpickles arbitrary objects (weights_only)."""
    data = path.read_bytes()
    sums = path.with_name("checkpoint.sha256")
    fix = f"delete {path} to restart the run from epoch 1, or choose another --out"
    if not sums.exists() or hashlib.sha256(data).hexdigest() not in sums.read_text().split():
        raise KdpipeError(f"{path} does not match its checksum (corrupted or edited); {fix}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a valid digest of an unreadable file: written by something else
        raise KdpipeError(f"{path} cannot be read ({type(e).__name__}); {fix}") from None


def _refuse_other_settings(cfg: TrainConfig, saved: dict, out: Path) -> None:
    """--resume continues a run (interrupted or finished) only with the settings it was started with."""
    now = without_new_defaults(cfg.to_dict(), saved)
    ignored = ("resume", "out", "device", "workers", "allow_changed_data")  # where it runs, and a permission
    differs = [k for k in now if k not in ignored and saved.get(k) != now[k]]
    if differs:
        raise KdpipeError(f"--resume: {out} was started with other settings ({', '.join(differs)}); "
                          "use the same flags, or another --out")


def resume(s: Setup) -> bool:
    """Load the last checkpoint of `s.out` into `s`; False when there is none."""
    path = s.out / "checkpoint.pt"
    if not path.exists():
        return False
    state = _read_checkpoint(path)
    _refuse_other_settings(s.cfg, dict(state["config"]), s.out)
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    s.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    runtime.set_device_rng_state(s.device, state.get("device_rng"))  # None from a CPU run; absent in older checkpoints
    if s.scaler is not None and state.get("scaler"):
        s.scaler.load_state_dict(state["scaler"])
    s.best = {"epoch": state["best_epoch"], "accuracy": state["best_accuracy"], "state": state["best_state"]}
    s.history = json.loads(state["history"])  # the checkpoint's own, never ahead of or behind its weights
    return True


@dataclass
class RunReport:
    out: Path
    best_epoch: int
    validation: dict
    test: dict | None
    confusion_matrix: list | None
    label_names: list[str]
    wall_time_s: float
    history: list[dict]
    run: dict  # the run.json contents


def finish(s: Setup, wall_time: float) -> RunReport:
    """Load the best epoch, evaluate it on test, save the student and run.json. (Its validation metrics
    are those recorded after that epoch: same weights, same BN statistics.)"""
    s.model.load_state_dict(s.best["state"])
    val = s.history[s.best["epoch"] - 1]["validation"]
    test = confusion = None
    if s.cfg.test_split:
        test, logits = evaluate_split(s, s.cfg.test_split)
        labels = s.splits[s.cfg.test_split].labels.cpu().numpy()
        confusion = metrics.confusion_matrix(logits.argmax(1), labels, len(s.label_names)).tolist()
    model_dir = s.out / "model"
    if not _writes(s):  # another process of the job: wait for the first to write everything
        torch.distributed.barrier()
        return load_report(s.out)
    tmp = s.out / f".model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(s.model.to(memory_format=torch.contiguous_format), tmp, s.inputs["size"], s.inputs["mean"],
                 s.inputs["std"], s.inputs["resample"])
    epochs = s.history
    train_images = sum(len(s.splits[s.cfg.train_split]) for _ in epochs)
    run = {**s.provenance, "status": "complete", "seed": s.cfg.seed, "best_epoch": s.best["epoch"],
           "validation": val, "test": test, "test_confusion_matrix": confusion, "label_names": s.label_names,
           "student": {"architecture": type(s.model).__name__, "parameters": sum(p.numel() for p in s.model.parameters()),
                       "weights_sha256": _sha256(tmp / "model.safetensors"),
                       "inputs": {k: s.inputs[k] for k in ("size", "train_size", "resample", "mean", "std")}},
           "epoch_time_s": [r["epoch_time_s"] for r in epochs],
           "train_images_per_s": round(train_images / sum(r["train_time_s"] for r in epochs), 2),
           "total_time_s": round(wall_time, 2),
           "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (tmp / "README.md").write_text(model_card.render(run, s.out.name))  # the Hub's model card, inside model/
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
    _atomic_write_text(s.out / "run.json", json.dumps(_finite_json(run), indent=2, allow_nan=False))
    for name in ("checkpoint.pt", "checkpoint.sha256"):  # the run is complete; model/ is the result
        (s.out / name).unlink(missing_ok=True)
    if runtime.distributed()[1] > 1:
        torch.distributed.barrier()
    return RunReport(s.out, s.best["epoch"], val, test, confusion, s.label_names, wall_time, epochs, run)


def run(cfg: TrainConfig, progress: Progress | None = None, on_epoch: Callable[[dict], None] | None = None,
        shared: SharedData | None = None) -> RunReport:
    """setup -> (resume) -> fit -> finish. A finished run with --resume returns its saved report."""
    start = time.perf_counter()
    finished = cfg.out_dir() / "run.json"
    if cfg.resume and finished.exists():  # nothing to train: its report, if these are its settings
        report = load_report(cfg.out_dir())
        _refuse_other_settings(cfg, report.run.get("config", {}), cfg.out_dir())
        return report
    if runtime.distributed()[1] > 1:
        runtime.start_distributed(runtime.resolve_device(cfg.device))
    with locking.exclusive_for_job(cfg.out_dir()):
        s = setup(cfg, progress, shared)
        earlier = 0.0  # seconds the interrupted attempts spent on the epochs resumed from
        if cfg.resume and resume(s):
            earlier = sum(r["epoch_time_s"] for r in s.history)
        fit(s, progress, on_epoch)
        return finish(s, time.perf_counter() - start + earlier)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_report(out: Path) -> RunReport:
    try:
        r = json.loads((Path(out) / "run.json").read_text())
        history = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]
        assert isinstance(r, dict) and {"best_epoch", "validation", "test", "test_confusion_matrix", "label_names",
                                         "total_time_s"} <= r.keys()
    except (OSError, ValueError, AssertionError) as e:
        raise KdpipeError(f"{out}: its run.json or metrics.jsonl is missing or damaged "
                          f"({type(e).__name__}); train it again in another --out") from None
    return RunReport(Path(out), r["best_epoch"], r["validation"], r["test"], r["test_confusion_matrix"],
                     r["label_names"], r["total_time_s"], history, r)


def evaluate(run_dir: Path, split: str = "test", dataset: str | None = None, device: str = "auto",
             progress: Progress | None = None) -> dict:
    """Reload a saved student (model/ with its preprocessor_config.json) and evaluate it on `split`,
    independently of training: inputs are rebuilt from the saved processor, labels from the dataset."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise KdpipeError(f"{run_dir}: no run.json; pass a folder written by kdpipe train-student")
    r = load_report(run_dir).run
    weights = run_dir / "model" / "model.safetensors"
    if not weights.is_file():
        raise KdpipeError(f"{weights} is missing: the saved student is incomplete; restore the run's model/ folder, "
                          "or train again")
    expected = r.get("student", {}).get("weights_sha256")
    if expected and _sha256(weights) != expected:
        raise KdpipeError(f"{weights} does not match the checksum in run.json "
                          "(corrupted or replaced); retrain, or restore the file")
    try:
        model = AutoModelForImageClassification.from_pretrained(run_dir / "model")
        proc = AutoImageProcessor.from_pretrained(run_dir / "model")
    except (OSError, ValueError) as e:  # config.json or preprocessor_config.json missing or damaged
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KdpipeError(f"{run_dir / 'model'}: cannot load the saved student ({first}); restore the run's "
                          "model/ folder, or train again") from None
    ds = reopen_dataset(r["dataset"], dataset, [split], flags={split: "--split"})
    if ds.label_names != [model.config.id2label[i] for i in range(model.config.num_labels)]:
        raise KdpipeError(f"--dataset {ds.spec}: labels {ds.label_names} differ from the student's")
    dev = runtime.resolve_device(device)
    inputs = _with_tensors({"size": (proc.size["height"], proc.size["width"]), "resample": int(proc.resample),
                            "mean": list(proc.image_mean), "std": list(proc.image_std)}, dev)
    source = ds.splits[split]
    teacher = None
    cache_dir = r["config"].get("cache")
    if cache_dir and Path(cache_dir, f"{split}.parquet").exists():
        cached = logit_store.read_split(logit_store.split_path(Path(cache_dir), split))
        teacher = torch.from_numpy(cached.aligned_to(source.ids, source.labels, f"cache split {split!r}"))
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
    return report
