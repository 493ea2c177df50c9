"""Stage one: run the teacher once over every split (no augmentation) and write its raw logits.

Decoding and preprocessing run in DataLoader workers so they overlap the teacher's forward pass;
the teacher runs in eval mode under `torch.inference_mode` and autocast.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import locking, logit_store, runtime
from .config import CacheConfig
from .data import Split, open_dataset
from .errors import KdpipeError
from .teacher import Teacher, label_mapping, load_teacher

Progress = Callable[[str, int, int], None]  # (split, rows done, rows total)


@dataclass
class SplitReport:
    split: str
    rows: int
    accuracy: float
    images_per_s: float | None  # None when the file was reused
    bytes: int
    path: Path
    reused: bool


class _TeacherInputs(torch.utils.data.Dataset):
    """(pixel_values, row) pairs made by the teacher's own processor; errors travel as messages so the
    main process can raise them as one-line KdpipeErrors (DataLoader would wrap them in a traceback)."""

    def __init__(self, split: Split, processor, rows: np.ndarray):
        self.split, self.processor, self.rows = split, processor, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        try:
            image = self.split.image(int(self.rows[i]))
        except KdpipeError as e:
            return None, i, str(e)
        pixels = self.processor(images=image, return_tensors="np")["pixel_values"][0]
        return torch.from_numpy(np.ascontiguousarray(pixels)), i, None


def _collate(items):
    for _, _, error in items:
        if error:
            return {"error": error}
    return {"pixel_values": torch.stack([p for p, _, _ in items]), "rows": torch.tensor([i for _, i, _ in items])}


def teacher_logits(teacher: Teacher, split: Split, device: torch.device, precision: str, batch_size: int,
                   workers: int, progress: Progress | None = None, rows: np.ndarray | None = None) -> np.ndarray:
    """Raw teacher logits (N, C) for every row of `split` (or for `rows` of it, in that order), in the
    teacher's label order, as float32."""
    rows = np.arange(len(split)) if rows is None else rows
    loader = torch.utils.data.DataLoader(
        _TeacherInputs(split, teacher.processor, rows), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    out = np.empty((len(rows), teacher.model.config.num_labels), dtype=np.float32)
    done = 0
    with torch.inference_mode(), runtime.autocast(device, precision):
        for batch in loader:
            if "error" in batch:
                raise KdpipeError(batch["error"])
            batch = runtime.to_device(batch, device)
            pixel_values = batch["pixel_values"].contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
            logits = teacher.model(pixel_values=pixel_values).logits.float()  # (B, C)
            out[batch["rows"].cpu().numpy()] = logits.cpu().numpy()
            done += len(logits)
            if progress:
                progress(split.name, done, len(rows))
    return out


def run(cfg: CacheConfig, progress: Progress | None = None) -> list[SplitReport]:
    """Cache the teacher's logits for every requested split; reuse files made from the same inputs.
    One writer per --out folder (locking.exclusive). Under `torchrun`/`accelerate launch` with N
    processes, each caches every N-th row of each split into its own Parquet part and rank 0 joins the
    parts into the split's file (see _shard_logits)."""
    rank, world = runtime.distributed()
    if world > 1:
        runtime.start_distributed(runtime.resolve_device(cfg.device))
    with locking.exclusive_for_job(cfg.out_dir()):
        return _run(cfg, progress, rank, world)


def _shard_logits(teacher, split, device, precision, cfg, workers, progress, out_dir, rank, world) -> np.ndarray | None:
    """This rank's rows (rank, rank + world, ...) to `.parts/<split>.part<rank>of<world>.parquet`; after a
    barrier rank 0 reads every part (checksums verified), puts the rows back in dataset order and returns
    all logits; other ranks return None."""
    import torch.distributed as dist

    parts = out_dir / ".parts"
    rows = np.arange(rank, len(split), world)
    logits = teacher_logits(teacher, split, device, precision, cfg.batch_size, workers, progress, rows)
    logit_store.write_split(parts / f"{split.name}.part{rank}of{world}.parquet", [split.ids[i] for i in rows],
                            split.labels[rows], logits, {"part": rank, "parts": world})
    dist.barrier()
    if rank != 0:
        return None
    out = np.empty((len(split), logits.shape[1]), dtype=np.float32)
    for r in range(world):
        path = parts / f"{split.name}.part{r}of{world}.parquet"
        part = logit_store.read_split(path)
        if part.ids != [split.ids[i] for i in range(r, len(split), world)]:
            raise KdpipeError(f"{path}: holds other rows than rank {r} should have; rerun with --force")
        out[r::world] = part.logits
        path.unlink()
    return out


def _run(cfg: CacheConfig, progress: Progress | None, rank: int = 0, world: int = 1) -> list[SplitReport]:
    dataset = open_dataset(cfg.dataset, splits=cfg.splits, image_column=cfg.image_column,
                           label_column=cfg.label_column, revision=cfg.dataset_revision)
    teacher = load_teacher(cfg.teacher, cfg.revision, cfg.trust_remote_code)
    perm = label_mapping(teacher.label_names, dataset.label_names)  # teacher column for each dataset label
    device = runtime.resolve_device(cfg.device)
    precision = runtime.resolve_precision(cfg.precision, device)
    teacher.model = runtime.prepare_model(teacher.model, device)
    workers = runtime.default_workers() if cfg.workers is None else cfg.workers
    out_dir = cfg.out_dir()
    common = _jsonable({
        "teacher": {**teacher.identity, "label_map": perm.tolist()},
        "processor": teacher.processor.to_dict(),
        "label_names": dataset.label_names,
        "precision": precision,
        "format_version": logit_store.FORMAT_VERSION,
        "logits_storage": _storage(cfg, len(dataset.label_names)),
    })
    reports = []
    for split in dataset.splits.values():
        path = logit_store.split_path(out_dir, split.name)
        key = {**common, "dataset_fingerprint": split.fingerprint()}
        reused = _reusable(path, key) if not cfg.force else None
        if reused is not None:
            reports.append(SplitReport(split.name, reused["rows"], reused["teacher_accuracy"], None,
                                       path.stat().st_size, path, True))
            continue
        start = time.perf_counter()
        if world == 1:
            logits = teacher_logits(teacher, split, device, precision, cfg.batch_size, workers, progress)
        else:
            logits = _shard_logits(teacher, split, device, precision, cfg, workers, progress, out_dir, rank, world)
            if logits is None:  # rank > 0: rank 0 writes the split; wait for it, then report from its file
                torch.distributed.barrier()
                meta = logit_store.read_meta(path)
                reports.append(SplitReport(split.name, meta["rows"], meta["teacher_accuracy"], None,
                                           path.stat().st_size, path, False))
                continue
        logits = logits[:, perm]
        wall = time.perf_counter() - start
        accuracy = float((logits.argmax(1) == split.labels).mean())
        meta = {
            **key,
            "kdpipe_version": runtime.versions()["kdpipe"],
            "versions": runtime.versions(),
            "split": split.name,
            "dataset": dataset.identity,
            "device": runtime.describe(device),
            "batch_size": cfg.batch_size,
            "wall_time_s": round(wall, 3),
            "images_per_s": round(len(split) / wall, 2),
            "teacher_accuracy": accuracy,
            "views": 1,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if world > 1:
            meta["processes"] = world
        logit_store.write_split(path, split.ids, split.labels, logits, meta, topk=cfg.topk, topk_dtype=cfg.topk_dtype)
        if world > 1:
            torch.distributed.barrier()  # the split's file is complete: the other ranks may read it
        reports.append(SplitReport(split.name, len(split), accuracy, len(split) / wall, path.stat().st_size,
                                   path, False))
    return reports


def _storage(cfg: CacheConfig, num_classes: int) -> dict:
    if cfg.topk is None:
        return logit_store.FULL
    if cfg.topk >= num_classes:
        raise KdpipeError(f"--topk {cfg.topk} must be below the number of classes ({num_classes}); leave it out "
                          "to store every logit")
    return {"kind": "topk", "k": cfg.topk, "dtype": cfg.topk_dtype}


def _jsonable(value: dict) -> dict:
    """As it will read back from the file's JSON metadata (tuples become lists), so keys compare equal."""
    return json.loads(json.dumps(value))


def _reusable(path: Path, key: dict) -> dict | None:
    """The existing file's metadata if it was made from exactly these inputs and is intact, else None."""
    if not path.exists():
        return None
    try:
        meta = logit_store.read_meta(path)
        if not logit_store.matches(meta, key):
            return None
        logit_store.read_split(path)  # verifies the checksum: a corrupted file is rebuilt, not reused
        return meta
    except KdpipeError:
        return None
