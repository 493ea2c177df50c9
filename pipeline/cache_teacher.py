"""Stage one: run the teacher once over every split and write its raw logits (logit_store.py).

Each split's teacher batches (teacher_inputs.teacher_batches: view 0, and with `--views K` K augmented views
per image on --view-splits) stream into its Parquet file; a file made from the same inputs is reused. A pass
over many views journals its batches and resumes mid-split after a kill (cache_journal.py); under torchrun
each rank takes every N-th image and rank 0 merges the parts (merge_parts). `inspect-cache --verify`'s
replay of the teacher is cache_verify.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import cache_journal, locking, logit_store, runtime, views
from .config import CacheConfig
from .data import Split, left_out_note, open_dataset
from .errors import KdpipeError
from .teacher import Teacher, label_mapping, load_teacher
from .teacher_inputs import Batch, Progress, ViewSpec, per_image, teacher_batches, writer_columns


@dataclass
class SplitReport:
    split: str
    rows: int
    accuracy: float
    images_per_s: float | None  # None when the file was reused
    bytes: int
    path: Path
    reused: bool
    seconds: float | None = None  # the teacher pass, summed over the attempts a resumed split took
    resumed_images: int = 0  # images whose teacher outputs came from a killed attempt's journal (cache_journal)
    note: str | None = None  # what the dataset holds that no split uses (data.left_out_note), said once per run


def run(cfg: CacheConfig, progress: Progress | None = None) -> list[SplitReport]:
    """Cache the teacher's logits for every requested split; reuse files made from the same inputs.
    One writer per --out folder (locking.exclusive). Rows stream from the teacher into the Parquet file
    in row groups, so memory stays flat however large the split. Under `torchrun`/`accelerate launch`
    with N processes, each caches every N-th row of each split into its own Parquet part and rank 0
    merges the parts into the split's file (merge_parts)."""
    rank, world = runtime.distributed()
    _check_out(cfg)
    if world > 1:
        runtime.start_distributed(runtime.resolve_device(cfg.device))
    with locking.exclusive_for_job(cfg.out_dir()):
        return _run(cfg, progress, rank, world)


def part_path(out_dir: Path, split: str, rank: int, world: int) -> Path:
    """Where rank `rank` of `world` writes its part of a split under torchrun."""
    return out_dir / ".parts" / f"{split}.part{rank}of{world}.parquet"


def merge_parts(split: Split, out_dir: Path, world: int, batch_size: int, per_image: int) -> Iterator[Batch]:
    """Yield Batches in dataset order from the ranks' parts (part r holds images r, r + N, ..., each with
    its `per_image` views), reading them a batch at a time in lockstep, after verifying each part's
    checksum; then delete them."""
    paths = [part_path(out_dir, split.name, r, world) for r in range(world)]
    for r, path in enumerate(paths):
        if logit_store.verify(path)["rows"] != len(range(r, len(split), world)) * per_image:
            raise KdpipeError(f"{path}: holds other rows than rank {r} should have; rerun with --force")
    streams = [logit_store.RowStream(p) for p in paths]
    step = max(1, batch_size // per_image) * per_image  # whole images
    done = 0  # images
    while done < len(split):
        chunks = [logit_store.Rows.from_table(s.take(step)) for s in streams]
        batch = _interleaved(chunks, done, world, per_image)
        if batch.ids[::per_image] != [split.ids[i] for i in batch.rows[::per_image]]:
            raise KdpipeError(f"{paths[0].parent}: the parts hold other rows than this dataset; rerun with --force")
        done += len(batch.ids) // per_image
        yield batch
    for path in paths:
        path.unlink()


def _interleaved(chunks: list[logit_store.Rows], done: int, world: int, per_image: int) -> Batch:
    """The ranks' next rows (part r's j-th image = dataset image j * N + r, counted from image `done`) as one
    Batch in dataset order: image by image, each image's views in order."""
    layout = views.ViewRows(max(len(c.ids) for c in chunks) // per_image, per_image)  # a chunk's rows
    key = np.concatenate([layout.image(np.arange(len(c.ids))) * world + r for r, c in enumerate(chunks)])
    order = np.argsort(key, kind="stable")  # (R,)
    images = done + np.arange(len(order) // per_image)
    return Batch.of(logit_store.Rows.concat(chunks).take(order), rows=images[layout.image(np.arange(len(order)))])


@dataclass
class _Job:
    """Everything stage one needs for every split, opened once."""
    cfg: CacheConfig
    dataset: object  # data.ImageDataset
    teacher: Teacher
    perm: np.ndarray  # teacher column for each dataset label
    device: torch.device
    precision: str
    workers: int
    out_dir: Path
    spec: ViewSpec | None  # the views of --view-splits
    common: dict  # metadata shared by every split (and part of the reuse key)

    def raw_writer(self, path: Path, spec: ViewSpec | None) -> logit_store.SplitWriter:
        """A writer of batches as the teacher gives them (its label order, no digests): journal chunks, parts."""
        return logit_store.SplitWriter(path, len(self.perm), **writer_columns(spec))


OTHER_KINDS = ("run.json", "checkpoint.pt", "metrics.jsonl", "sweep.json", "study.journal")  # train-student, sweep


def _check_out(cfg: CacheConfig) -> None:
    """Before anything is locked or written: --out is not a run or sweep folder, nor inside the dataset."""
    out = cfg.out_dir()
    other = [name for name in OTHER_KINDS if (out / name).exists()]
    if other:
        raise KdpipeError(f"--out {out} holds {other[0]}: it is a train-student run or a sweep, not a cache; choose "
                          "another --out")
    dataset = Path(cfg.dataset).expanduser()
    if dataset.is_dir() and out.resolve().is_relative_to(dataset.resolve()):
        raise KdpipeError(f"--out {out} is inside --dataset {cfg.dataset}: the split files would become part of the "
                          "dataset; choose a folder outside it")


def _setup(cfg: CacheConfig) -> _Job:
    """Open the dataset and the teacher, match their labels, and place the teacher on its device."""
    dataset = open_dataset(cfg.dataset, splits=cfg.splits, image_column=cfg.image_column,
                           label_column=cfg.label_column, revision=cfg.dataset_revision,
                           allow_outside=cfg.allow_outside_images)
    teacher = load_teacher(cfg.teacher, cfg.revision, cfg.trust_remote_code)
    perm = label_mapping(teacher.label_names, dataset.label_names, cfg.labels_by_index)
    device = runtime.resolve_device(cfg.device)
    precision = runtime.resolve_precision(cfg.precision, device)
    runtime.configure_backends(device, precision)
    teacher.model = runtime.prepare_model(teacher.model, device)
    processor = teacher.processor.to_dict()
    spec = _view_spec(cfg, dataset, processor)
    workers = runtime.default_workers(device) if cfg.workers is None else cfg.workers
    return _Job(cfg, dataset, teacher, perm, device, precision, workers, cfg.out_dir(), spec,
                _common(cfg, dataset, teacher, perm, processor, precision))


def _view_spec(cfg: CacheConfig, dataset, processor: dict) -> ViewSpec | None:
    """The views of --view-splits (--views K), or None without views."""
    if not cfg.views:
        return None
    missing = [s for s in cfg.view_splits if s not in dataset.splits]
    if missing:
        raise KdpipeError(f"--view-splits {','.join(missing)}: not in the dataset (splits: "
                          f"{', '.join(dataset.splits)})")
    return ViewSpec(cfg.views, cfg.augment, views.processor_inputs(processor, f"--teacher {cfg.teacher}"))


def _common(cfg: CacheConfig, dataset, teacher: Teacher, perm: np.ndarray, processor: dict, precision: str) -> dict:
    """The metadata every split of this pass shares (and part of each split's reuse key)."""
    return _jsonable({
        "teacher": {**teacher.identity, "label_map": perm.tolist(),
                    **({"labels_matched": "by index (--labels-by-index)"} if cfg.labels_by_index else {})},
        "processor": processor,
        "label_names": dataset.label_names,
        "precision": precision,
        "format_version": logit_store.FORMAT_VERSION,
        "logits_storage": _storage(cfg, len(dataset.label_names)),
    })


def _run(cfg: CacheConfig, progress: Progress | None, rank: int = 0, world: int = 1) -> list[SplitReport]:
    job = _setup(cfg)
    foreign = _foreign_splits(job)
    reports = [_cache_split(job, split, progress, rank, world) for split in job.dataset.splits.values()]
    reports[0].note = left_out_note(job.dataset.spec, job.dataset.left_out)
    if rank == 0:
        for path in foreign:  # --force: the folder is rebuilt whole, once this dataset's splits are in place
            path.unlink(missing_ok=True)
    return reports


def _foreign_splits(job: _Job) -> list[Path]:
    """Split files already in --out that this run will not write and that come from another teacher or
    dataset (logit_store.source): refused, or with --force returned to be removed. A cache is one teacher on
    one dataset; splits of the same source (say, cached earlier with --splits test) are kept."""
    mine = logit_store.source({**job.common, "dataset": job.dataset.identity})
    foreign = []
    for path in sorted(job.out_dir.glob("*.parquet")):
        if path.stem in job.dataset.splits:
            continue  # rebuilt or reused below
        try:
            meta = logit_store.read_meta(path)
        except KdpipeError:
            foreign.append((path, "an unreadable file", None))
            continue
        theirs = logit_store.source(meta)
        differs = [p for p in ("dataset", "teacher", "labels") if theirs[p] != mine[p]]
        if differs:
            foreign.append((path, "another " + differs[0].replace("labels", "label set"), meta))
    if foreign and not job.cfg.force:
        path, what, meta = foreign[0]
        where = f", {logit_store.describe_source(meta, 'dataset')}" if meta is not None and "dataset" in what else ""
        raise KdpipeError(f"--out {job.out_dir} holds {len(foreign)} split file(s) of {what} ({path.name}{where}); a "
                          "cache holds one teacher's logits on one dataset: choose another --out, or pass --force "
                          "to rebuild the folder whole (removes them)")
    return [path for path, _, _ in foreign]


def _cache_split(job: _Job, split: Split, progress: Progress | None, rank: int, world: int) -> SplitReport:
    """Reuse the split's file if it was made from these inputs, else run the teacher over it and write it
    (under torchrun: every rank writes its part, rank 0 merges them)."""
    path = logit_store.split_path(job.out_dir, split.name)
    spec = job.spec if job.spec is not None and split.name in job.cfg.view_splits else None
    key = _split_key(job, split, spec)
    reused = _reusable(path, key) if not job.cfg.force else None
    if reused is not None:
        if rank == 0:
            cache_journal.discard(job.out_dir, split.name)  # left by an attempt killed after its file was complete
        return SplitReport(split.name, reused["rows"], reused["teacher_accuracy"], None, path.stat().st_size, path,
                           True)
    journal = cache_journal.Journal(job.out_dir, split, key, per_image(spec), lambda p: job.raw_writer(p, spec),
                                    rank, world, job.cfg.force)
    start = time.perf_counter() - journal.earlier_s  # the time the killed attempts spent counts too
    batches = journal.batches(lambda rest: teacher_batches(job.teacher, split, job.device, job.precision,
                                                           job.cfg.batch_size, job.workers,
                                                           _shifted(progress, journal.done), rest, spec))
    if world > 1:
        batches = _through_parts(job, split, spec, batches, journal, rank, world)
        if batches is None:  # another rank: report from rank 0's file
            meta = logit_store.read_meta(path)
            return SplitReport(split.name, meta["rows"], meta["teacher_accuracy"], None, path.stat().st_size, path,
                               False)
    meta = _write(job, split, path, batches, key, spec, start, world, {"resumed_images": journal.done} if
                  journal.done else None)
    journal.remove(every_attempt=True)
    if world > 1:
        torch.distributed.barrier()  # the split's file is complete: the other ranks may read it
    return SplitReport(split.name, meta["rows"], meta["teacher_accuracy"], meta["images_per_s"],
                       path.stat().st_size, path, False, meta["wall_time_s"], journal.done)


def _split_key(job: _Job, split: Split, spec: ViewSpec | None) -> dict:
    """What the split's logits are made from: a file with this key is reused (logit_store.matches)."""
    augment = _jsonable({"views": spec.k, "policy": spec.policy.to_dict(), "render": spec.inputs}) if spec else None
    return {**job.common, "dataset_fingerprint": split.fingerprint(), "augment": augment}


def _shifted(progress: Progress | None, done: int) -> Progress | None:
    """`progress` counting the `done` images a killed attempt committed (cache_journal) as done already."""
    return None if progress is None else lambda name, n, total: progress(name, n + done, total + done)


def _through_parts(job: _Job, split: Split, spec: ViewSpec | None, batches, journal: cache_journal.Journal,
                   rank: int, world: int) -> Iterator[Batch] | None:
    """Under torchrun: write this rank's batches to its part; once every part is complete, rank 0 gets the
    merged batches (merge_parts) and the other ranks None, after rank 0's file is complete."""
    with job.raw_writer(part_path(job.out_dir, split.name, rank, world), spec) as part:
        for b in batches:  # teacher label order; rank 0 maps them in _write
            part.write(b)
        part.close({"split": split.name, "part": rank, "parts": world})
    journal.remove()  # the part holds it all now
    torch.distributed.barrier()
    if rank != 0:
        torch.distributed.barrier()  # wait for rank 0's file
        return None
    return merge_parts(split, job.out_dir, world, job.cfg.batch_size, per_image(spec))


def _write(job: _Job, split: Split, path: Path, batches: Iterator[Batch], key: dict, spec: ViewSpec | None,
           start: float, world: int, extra: dict | None = None) -> dict:
    """Stream the batches into the split's file (dataset label order, with each image's digest) and close it
    with its metadata (and `extra`)."""
    correct = np.zeros(2, dtype=np.int64)  # right on view 0, right on the other views
    index = {id_: i for i, id_ in enumerate(split.ids)}
    digests = split.digests()  # (N, 32): stored per row, so train-student can name an image changed since
    with logit_store.SplitWriter(path, len(job.perm), job.cfg.topk, job.cfg.topk_dtype, **writer_columns(spec),
                                 with_digests=True) as writer:
        for b in batches:
            b = replace(b, logits=b.logits[:, job.perm], digests=digests[b.rows])  # logits (R, C) dataset label order
            correct += _score(job, split, b, index)
            writer.write(b)
        meta = _split_meta(job, split, key, spec, time.perf_counter() - start, correct, world)
        return writer.close({**meta, **(extra or {})})


def _score(job: _Job, split: Split, b: Batch, index: dict) -> list[int]:
    """How many of a batch's rows the teacher gets right (its logits in dataset label order), on view 0 and on
    the other views; refuses non-finite logits (e.g. fp16 overflow: the KD term would be NaN from the first
    step that meets them)."""
    labels, logits = b.labels, b.logits
    if b.mixes is not None:  # a mixed view counts as right on the label with the larger share
        major = b.mixes.weights > 0.5
        labels = np.where(major, split.labels[[index.get(p, 0) for p in b.mixes.partners]], labels)
    bad = ~np.isfinite(logits).all(1)
    if bad.any():
        raise KdpipeError(f"--teacher {job.cfg.teacher} gave non-finite logits on {split.ids[b.rows[bad][0]]} "
                          f"(split {split.name!r}, precision {job.precision}); no split file was written: "
                          "retry with --precision fp32")
    right = logits.argmax(1) == labels
    return [int(right[b.view == 0].sum()), int(right[b.view > 0].sum())]


def _split_meta(job: _Job, split: Split, key: dict, spec: ViewSpec | None, wall: float, correct: np.ndarray,
                world: int) -> dict:
    """A split file's metadata: the cache key, versions, dataset, device, cost and the teacher's accuracy."""
    versions = runtime.versions()
    meta = {
        **key,
        "kdpipe_version": versions["kdpipe"],
        "versions": versions,
        "split": split.name,
        "dataset": job.dataset.identity,
        **({"dataset_left_out": job.dataset.left_out[:100], "dataset_left_out_count": len(job.dataset.left_out)}
           if job.dataset.left_out else {}),  # an image folder's files no split uses (data._left_out), recorded
        "device": runtime.describe(job.device),
        "batch_size": job.cfg.batch_size,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(len(split) / wall, 2),
        "teacher_accuracy": int(correct[0]) / len(split),  # on view 0, the images themselves
        "views": per_image(spec),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if spec is not None:
        meta["views_teacher_accuracy"] = int(correct[1]) / (len(split) * spec.k)
        meta["teacher_inputs_per_s"] = round(len(split) * (spec.k + 1) / wall, 2)
    if world > 1:
        meta["processes"] = world
    return meta


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
