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


def teacher_batches(teacher: Teacher, split: Split, device: torch.device, precision: str, batch_size: int,
                    workers: int, progress: Progress | None = None, rows: np.ndarray | None = None):
    """Yield (rows (B,), raw teacher logits (B, C) float32 in the teacher's label order) for every row of
    `split` (or for `rows` of it), in order, one batch at a time."""
    rows = np.arange(len(split)) if rows is None else rows
    loader = torch.utils.data.DataLoader(
        _TeacherInputs(split, teacher.processor, rows), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    done = 0
    with torch.inference_mode(), runtime.autocast(device, precision):
        for batch in loader:
            if "error" in batch:
                raise KdpipeError(batch["error"])
            batch = runtime.to_device(batch, device)
            pixel_values = batch["pixel_values"].contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
            logits = teacher.model(pixel_values=pixel_values).logits.float()  # (B, C)
            done += len(logits)
            if progress:
                progress(split.name, done, len(rows))
            yield rows[batch["rows"].cpu().numpy()], logits.cpu().numpy()


def teacher_logits(teacher: Teacher, split: Split, device: torch.device, precision: str, batch_size: int,
                   workers: int, progress: Progress | None = None, rows: np.ndarray | None = None) -> np.ndarray:
    """All of teacher_batches at once: (N, C) float32."""
    return np.concatenate([logits for _, logits in
                           teacher_batches(teacher, split, device, precision, batch_size, workers, progress, rows)])


def run(cfg: CacheConfig, progress: Progress | None = None) -> list[SplitReport]:
    """Cache the teacher's logits for every requested split; reuse files made from the same inputs.
    One writer per --out folder (locking.exclusive). Rows stream from the teacher into the Parquet file
    in row groups, so memory stays flat however large the split. Under `torchrun`/`accelerate launch`
    with N processes, each caches every N-th row of each split into its own Parquet part and rank 0
    merges the parts into the split's file (_merge_parts)."""
    rank, world = runtime.distributed()
    if world > 1:
        runtime.start_distributed(runtime.resolve_device(cfg.device))
    with locking.exclusive_for_job(cfg.out_dir()):
        return _run(cfg, progress, rank, world)


def _part_path(out_dir: Path, split: str, rank: int, world: int) -> Path:
    return out_dir / ".parts" / f"{split}.part{rank}of{world}.parquet"


def _merge_parts(split: Split, out_dir: Path, world: int, batch_size: int):
    """Yield (rows, logits) in dataset order from the ranks' parts (part r holds rows r, r + N, ...),
    reading them a batch at a time in lockstep, after verifying each part's checksum; then delete them."""
    paths = [_part_path(out_dir, split.name, r, world) for r in range(world)]
    for r, path in enumerate(paths):
        if logit_store.verify(path)["rows"] != len(range(r, len(split), world)):
            raise KdpipeError(f"{path}: holds other rows than rank {r} should have; rerun with --force")
    streams = [logit_store.RowStream(p, ["id", "logits"]) for p in paths]
    done = 0
    while done < len(split):
        chunks = [s.take(batch_size) for s in streams]  # part r's next rows: local j -> global (j * N + r)
        key = np.concatenate([np.arange(len(c)) * world + r for r, c in enumerate(chunks)])
        order = np.argsort(key, kind="stable")
        rows = done + np.arange(len(order))
        ids = [i for c in chunks for i in c.column("id").to_pylist()]
        if [ids[j] for j in order] != [split.ids[i] for i in rows]:
            raise KdpipeError(f"{paths[0].parent}: the parts hold other rows than this dataset; rerun with --force")
        logits = np.concatenate([c.column("logits").combine_chunks().flatten().to_numpy().reshape(len(c), -1)
                                 for c in chunks])
        done += len(order)
        yield rows, logits[order]
    for path in paths:
        path.unlink()


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
        batches = teacher_batches(teacher, split, device, precision, cfg.batch_size, workers, progress,
                                  np.arange(rank, len(split), world))
        if world > 1:  # every rank writes its part; rank 0 merges them once all are complete
            with logit_store.SplitWriter(_part_path(out_dir, split.name, rank, world), len(perm)) as part:
                for rows, logits in batches:
                    part.write([split.ids[i] for i in rows], split.labels[rows], logits)  # teacher order
                part.close({"split": split.name, "part": rank, "parts": world})
            torch.distributed.barrier()
            if rank != 0:  # wait for rank 0's file, then report from it
                torch.distributed.barrier()
                meta = logit_store.read_meta(path)
                reports.append(SplitReport(split.name, meta["rows"], meta["teacher_accuracy"], None,
                                           path.stat().st_size, path, False))
                continue
            batches = _merge_parts(split, out_dir, world, cfg.batch_size)
        correct = 0
        with logit_store.SplitWriter(path, len(perm), cfg.topk, cfg.topk_dtype) as writer:
            for rows, logits in batches:
                logits = logits[:, perm]  # (B, C) dataset label order
                correct += int((logits.argmax(1) == split.labels[rows]).sum())
                writer.write([split.ids[i] for i in rows], split.labels[rows], logits)
            wall = time.perf_counter() - start
            accuracy = correct / len(split)
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
            writer.close(meta)
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
