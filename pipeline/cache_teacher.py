"""Stage one: run the teacher once over every split and write its raw logits (logit_store.py).

Each image as the teacher's processor prepares it (view 0), and with `--views K` (on --view-splits, train by
default) K random augmented views per image besides it, optionally blended with another image's view
(`--view-mixup`), each stored with the parameters that render it again (views.py). Decoding and
preprocessing run in DataLoader workers so they overlap the teacher's forward pass; the teacher runs in
eval mode under `torch.inference_mode` and autocast. A pass over many views journals its chunks and resumes
mid-split after a kill; under torchrun each rank takes every N-th image and the parts are merged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import files, locking, logit_store, runtime, views
from .config import CacheConfig
from .data import Split, left_out_note, open_dataset, reopen_dataset
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
    seconds: float | None = None  # the teacher pass, summed over the attempts a resumed split took
    resumed_images: int = 0  # images whose teacher outputs came from a killed attempt's journal (_Journal)
    note: str | None = None  # what the dataset holds that no split uses (data.left_out_note), said once per run


@dataclass
class Batch:
    """Teacher outputs for some images: one row per (image, view), image by image then view."""
    rows: np.ndarray  # (R,) dataset row of each output row
    view: np.ndarray  # (R,) int16 view index (0 = the image itself; views.ViewRows)
    logits: np.ndarray  # (R, C) float32 raw, teacher label order
    boxes: np.ndarray | None = None  # (R, 4) float32 crop boxes, with views
    flips: np.ndarray | None = None  # (R,) bool, with views
    mixes: views.Mixes | None = None  # with mixed views: partners as split ids


# per-view parameters a TeacherInputs item carries besides its pixels (views; mixed views)
VIEW_PARAMS = ("boxes", "flips", "mix_partners", "mix_boxes", "mix_flips", "mix_weights")


@dataclass(frozen=True)
class ViewSpec:
    """K random views per image drawn by `policy`, rendered at the teacher processor's `inputs`."""
    k: int
    policy: views.ViewPolicy
    inputs: dict  # views.processor_inputs: size, resample, mean, std


def view_input(image, processor, view: tuple | None = None, inputs: dict | None = None,
               mix: tuple | None = None) -> np.ndarray:
    """The teacher's float input (3, H, W) for an image: view 0 (`view` None) through its own processor;
    a stored view (box, flip) rendered with views.render at the processor's `inputs`, blended with
    `mix` = (partner image, box, flip, share) for a mixed view, then normalised."""
    if view is None:
        return processor(images=image, return_tensors="np")["pixel_values"][0]
    box, flip = view
    return views.processor_pixels(views.render_mixed(image, box, bool(flip), inputs["size"], inputs["resample"], mix),
                           inputs["mean"], inputs["std"])


class TeacherInputs(torch.utils.data.Dataset):
    """Per image: the teacher processor's pixels (view 0) and, with a ViewSpec, K rendered random views
    (V, 3, H, W) with their boxes and flips. Errors travel as messages so the main process can raise them
    as one-line KdpipeErrors (DataLoader would wrap them in a traceback)."""

    def __init__(self, split: Split, processor, rows: np.ndarray, spec: ViewSpec | None = None):
        self.split, self.processor, self.rows, self.spec = split, processor, rows, spec

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = int(self.rows[i])
        try:
            image = self.split.image(row)
        except KdpipeError as e:
            return {"error": str(e)}
        pixels = [view_input(image, self.processor)]  # view 0: (3, H, W)
        item = {"row": row}
        if self.spec is not None:
            k, policy = self.spec.k, self.spec.policy
            boxes, flips = views.sample(policy, self.split.ids[row], *image.size, k)
            partners = {}  # split index -> decoded image, each decoded once

            def partner(j):
                if j not in partners:
                    partners[j] = self.split.image(j)
                return partners[j]

            try:
                m = views.sample_mixes(policy, self.split.ids, row, k, lambda j: partner(j).size)
            except KdpipeError as e:
                return {"error": str(e)}
            mix = [(partner(m.partners[v]), m.boxes[v], m.flips[v], m.weights[v]) if m.weights[v] else None
                   for v in range(k + 1)]
            pixels += [view_input(image, self.processor, (boxes[v], flips[v]), self.spec.inputs, mix[v])
                       for v in range(1, k + 1)]
            item.update(boxes=torch.from_numpy(boxes), flips=torch.from_numpy(flips))
            if policy.mixup:
                item.update(mix_partners=torch.from_numpy(m.partners), mix_boxes=torch.from_numpy(m.boxes),
                            mix_flips=torch.from_numpy(m.flips), mix_weights=torch.from_numpy(m.weights))
        item["pixel_values"] = torch.from_numpy(np.stack(pixels).astype(np.float32, copy=False))  # (V, 3, H, W)
        return item


def collate(items):
    for item in items:
        if "error" in item:
            return {"error": item["error"]}
    out = {"pixel_values": torch.cat([x["pixel_values"] for x in items]),
           "rows": torch.tensor([x["row"] for x in items])}
    for key in VIEW_PARAMS:
        if key in items[0]:
            out[key] = torch.cat([x[key] for x in items])
    return out


def teacher_logits(teacher: Teacher, pixel_values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The teacher's raw logits (N, C) for pixel_values (N, 3, H, W), `batch_size` inputs per forward: an
    image's K + 1 views arrive together, and one forward over all 300 of them ran 2.55x slower per input on a
    CPU than forwards of 16 (EfficientNet-Lite0, bf16, one thread: benchmarks/bench_view_forward.py)."""
    chunks = pixel_values.split(batch_size)  # each (<= batch_size, 3, H, W)
    return torch.cat([teacher.model(pixel_values=c.contiguous(memory_format=torch.channels_last)).logits.float()
                      for c in chunks])


def teacher_batches(teacher: Teacher, split: Split, device: torch.device, precision: str, batch_size: int,
                    workers: int, progress: Progress | None = None, rows: np.ndarray | None = None,
                    spec: ViewSpec | None = None):
    """Yield a Batch of raw teacher logits for every row of `split` (or for `rows` of it), in order,
    `batch_size` teacher inputs at a time; with a ViewSpec, K + 1 views per image."""
    rows = np.arange(len(split)) if rows is None else rows
    per_image = 1 if spec is None else spec.k + 1
    loader = torch.utils.data.DataLoader(
        TeacherInputs(split, teacher.processor, rows, spec), batch_size=max(1, batch_size // per_image),
        shuffle=False, num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    done = 0
    with torch.inference_mode(), runtime.autocast(device, precision):
        for batch in loader:
            if "error" in batch:
                raise KdpipeError(batch["error"])
            params = {k: batch.pop(k).numpy() for k in VIEW_PARAMS if k in batch}
            mixes = None
            if "mix_partners" in params:  # split indices -> ids, the form stored
                ids = np.array([split.ids[j] if j >= 0 else "" for j in params["mix_partners"]], dtype=object)
                mixes = views.Mixes(ids, params["mix_boxes"], params["mix_flips"], params["mix_weights"])
            images = batch.pop("rows").numpy()  # stays on the host: no round trip through the device
            batch = runtime.to_device(batch, device)
            logits = teacher_logits(teacher, batch["pixel_values"], batch_size)  # (B*V, C)
            done += len(images)
            if progress:
                progress(split.name, done, len(rows))
            layout = views.ViewRows(len(images), per_image)
            at = np.arange(len(layout))  # the batch's rows: image by image, then view
            yield Batch(images[layout.image(at)], layout.view(at).astype(np.int16),
                        logits.cpu().numpy(), params.get("boxes"), params.get("flips"), mixes)


def run(cfg: CacheConfig, progress: Progress | None = None) -> list[SplitReport]:
    """Cache the teacher's logits for every requested split; reuse files made from the same inputs.
    One writer per --out folder (locking.exclusive). Rows stream from the teacher into the Parquet file
    in row groups, so memory stays flat however large the split. Under `torchrun`/`accelerate launch`
    with N processes, each caches every N-th row of each split into its own Parquet part and rank 0
    merges the parts into the split's file (_merge_parts)."""
    rank, world = runtime.distributed()
    _check_out(cfg)
    if world > 1:
        runtime.start_distributed(runtime.resolve_device(cfg.device))
    with locking.exclusive_for_job(cfg.out_dir()):
        return _run(cfg, progress, rank, world)


def _part_path(out_dir: Path, split: str, rank: int, world: int) -> Path:
    return out_dir / ".parts" / f"{split}.part{rank}of{world}.parquet"


def _merge_parts(split: Split, out_dir: Path, world: int, batch_size: int, per_image: int):
    """Yield Batches in dataset order from the ranks' parts (part r holds images r, r + N, ..., each with
    its `per_image` views), reading them a batch at a time in lockstep, after verifying each part's
    checksum; then delete them."""
    paths = [_part_path(out_dir, split.name, r, world) for r in range(world)]
    for r, path in enumerate(paths):
        if logit_store.verify(path)["rows"] != len(range(r, len(split), world)) * per_image:
            raise KdpipeError(f"{path}: holds other rows than rank {r} should have; rerun with --force")
    streams = [logit_store.RowStream(p) for p in paths]
    step = max(1, batch_size // per_image) * per_image  # whole images
    done = 0  # images
    while done < len(split):
        chunks = [s.take(step) for s in streams]  # part r's j-th image -> dataset image j * N + r
        layout = views.ViewRows(step // per_image, per_image)  # a chunk's rows: image by image, then view
        key = np.concatenate([layout.image(np.arange(len(c))) * world + r for r, c in enumerate(chunks)])
        order = np.argsort(key, kind="stable")  # image by image, each image's views in order
        images = done + np.arange(len(order) // per_image)
        ids = [i for c in chunks for i in c.column("id").to_pylist()]
        if [ids[j] for j in order[::per_image]] != [split.ids[i] for i in images]:
            raise KdpipeError(f"{paths[0].parent}: the parts hold other rows than this dataset; rerun with --force")
        cols = [logit_store._columns(c)[1] for c in chunks]
        joined = {name: np.concatenate([c[name] for c in cols])[order] for name in cols[0]}
        done += len(images)
        mixes = None
        if "mix_id" in joined:
            mixes = views.Mixes(joined["mix_id"], joined["mix_box"], joined["mix_flip"], joined["mix_weight"])
        yield Batch(images[layout.image(np.arange(len(order)))], joined["view"], joined["logits"], joined.get("view_box"),
                    joined.get("view_flip"), mixes)
    for path in paths:
        path.unlink()


JOURNAL = ".journal"  # in --out: the committed batches of splits not yet complete (_Journal)


class _Journal:
    """Stage one's progress through one split, kept so that a killed run resumes mid-split.

    Every teacher batch is committed as it comes, as a chunk file `<first>-<end>.parquet` (images first..end
    of this process's rows) in `<out>/.journal/<split>.r<rank>of<world>/`, written by logit_store.SplitWriter:
    under a temporary name, checksummed, renamed, so a chunk is complete or absent. `key.json` holds the
    digest of the split's reuse key. A rerun with the same key reads back the chunks that cover the first
    images without a gap (each verified: checksum, ids, views), yields them as they were, and runs the
    teacher on the remaining images only; a kill -9 therefore loses at most the batches in flight (decoded
    or in the teacher, not yet committed). Another key, --force, or an unreadable chunk starts that part
    over. The folder is removed once the split's file is complete. Each chunk records the seconds its batch
    took, so the split's reported cost sums every attempt."""

    def __init__(self, job: "_Job", split: Split, key: dict, spec: ViewSpec | None, rank: int, world: int):
        self.split, self.spec, self.perm_width = split, spec, len(job.perm)
        self.per_image = 1 if spec is None else spec.k + 1
        self.rows = np.arange(rank, len(split), world)  # this process's images, in order
        self.folder = job.out_dir / JOURNAL / f"{split.name}.r{rank}of{world}"
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        marker = self.folder / "key.json"
        try:
            same = json.loads(marker.read_text()).get("key_sha256") == digest
        except (OSError, ValueError):
            same = False
        if job.cfg.force or not same:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp-*"):  # a chunk being written when the process was killed
            stale.unlink(missing_ok=True)
        if not same or job.cfg.force:
            files.write_text(marker, json.dumps({"key_sha256": digest, "split": split.name, "per_image": self.per_image}))
        self.chunks = self._readable_prefix()  # [(first, end, path, seconds)]
        self.done = self.chunks[-1][1] if self.chunks else 0  # images of self.rows already committed
        self.earlier_s = sum(c[3] for c in self.chunks)

    def _readable_prefix(self) -> list[tuple[int, int, Path, float]]:
        """The committed chunks from image 0 on without a gap; any others (after a gap, or unreadable) go."""
        found = sorted(self.folder.glob("*.parquet"))
        chunks, at = [], 0
        for path in found:
            try:
                first, end = (int(x) for x in path.stem.split("-"))
                meta = logit_store.read_meta(path)
            except (ValueError, KdpipeError):
                break
            if first != at or meta.get("images") != [first, end]:
                break
            chunks.append((first, end, path, float(meta.get("seconds", 0.0))))
            at = end
        for path in found[len(chunks):]:
            path.unlink(missing_ok=True)
        return chunks

    def batches(self, fresh) -> "Iterator[Batch]":
        """The committed batches read back, then `fresh(rows not yet done)`'s, each committed as it passes."""
        index = {id_: i for i, id_ in enumerate(self.split.ids)}
        for first, end, path, _ in self.chunks:
            try:
                batch = self._read(path, first, end, index)
            except KdpipeError as e:
                raise KdpipeError(f"{e}; delete {self.folder} to recompute the split from its first image") from None
            yield batch
        at, clock = self.done, time.perf_counter()
        for b in fresh(self.rows[self.done:]):
            end = at + len(b.rows) // self.per_image
            self._commit(b, at, end, time.perf_counter() - clock)
            clock, at = time.perf_counter(), end
            yield b

    def _read(self, path: Path, first: int, end: int, index: dict) -> Batch:
        c = logit_store.read_split(path)  # verifies the checksum
        layout = views.ViewRows(end - first, self.per_image)
        at = np.arange(len(layout))
        rows = self.rows[first:end][layout.image(at)]
        if [index.get(i, -1) for i in c.ids] != rows.tolist() or not np.array_equal(c.view, layout.view(at)):
            raise KdpipeError(f"{path}: holds other rows than this split's images {first}..{end - 1}")
        return Batch(rows, c.view, c.logits, c.boxes, c.flips, c.mixes)

    def _commit(self, b: Batch, first: int, end: int, seconds: float) -> None:
        path = self.folder / f"{first:010d}-{end:010d}.parquet"
        with logit_store.SplitWriter(path, self.perm_width, with_views=self.spec is not None,
                                     with_mixes=_mixes(self.spec)) as chunk:  # teacher label order, as yielded
            chunk.write([self.split.ids[i] for i in b.rows], self.split.labels[b.rows], b.logits, b.view, b.boxes,
                        b.flips, b.mixes)
            chunk.close({"split": self.split.name, "images": [first, end], "seconds": round(seconds, 4)})

    def remove(self, every_attempt: bool = False) -> None:
        """Drop this process's journal (`every_attempt`: every journal of the split, and .journal when empty)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if every_attempt:
            _Journal.discard(self.folder.parent.parent, self.split.name)

    @staticmethod
    def discard(out_dir: Path, split: str) -> None:
        root = Path(out_dir) / JOURNAL
        for folder in root.glob(f"{split}.r*of*"):
            shutil.rmtree(folder, ignore_errors=True)
        try:
            root.rmdir()
        except OSError:  # absent, or other splits' journals remain
            pass


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
    spec = None
    if cfg.views:
        missing = [s for s in cfg.view_splits if s not in dataset.splits]
        if missing:
            raise KdpipeError(f"--view-splits {','.join(missing)}: not in the dataset (splits: "
                              f"{', '.join(dataset.splits)})")
        spec = ViewSpec(cfg.views, cfg.augment, views.processor_inputs(processor, f"--teacher {cfg.teacher}"))
    common = _jsonable({
        "teacher": {**teacher.identity, "label_map": perm.tolist(),
                    **({"labels_matched": "by index (--labels-by-index)"} if cfg.labels_by_index else {})},
        "processor": processor,
        "label_names": dataset.label_names,
        "precision": precision,
        "format_version": logit_store.FORMAT_VERSION,
        "logits_storage": _storage(cfg, len(dataset.label_names)),
    })
    workers = runtime.default_workers(device) if cfg.workers is None else cfg.workers
    return _Job(cfg, dataset, teacher, perm, device, precision, workers, cfg.out_dir(), spec, common)


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


def _cache_split(job: _Job, split: Split, progress, rank: int, world: int) -> SplitReport:
    """Reuse the split's file if it was made from these inputs, else run the teacher over it and write it
    (under torchrun: every rank writes its part, rank 0 merges them)."""
    cfg, path = job.cfg, logit_store.split_path(job.out_dir, split.name)
    spec = job.spec if job.spec is not None and split.name in cfg.view_splits else None
    key = {**job.common, "dataset_fingerprint": split.fingerprint(), "augment": _jsonable(
        {"views": spec.k, "policy": spec.policy.to_dict(), "render": spec.inputs}) if spec else None}
    reused = _reusable(path, key) if not cfg.force else None
    if reused is not None:
        if rank == 0:
            _Journal.discard(job.out_dir, split.name)  # left by an attempt killed after its file was complete
        return SplitReport(split.name, reused["rows"], reused["teacher_accuracy"], None, path.stat().st_size, path,
                           True)
    per_image = 1 if spec is None else spec.k + 1
    journal = _Journal(job, split, key, spec, rank, world)
    start = time.perf_counter() - journal.earlier_s  # the time the killed attempts spent counts too
    shifted = None if progress is None else lambda name, done, total: progress(name, done + journal.done,
                                                                              total + journal.done)
    batches = journal.batches(lambda rest: teacher_batches(job.teacher, split, job.device, job.precision,
                                                           cfg.batch_size, job.workers, shifted, rest, spec))
    if world > 1:  # every rank writes its part; rank 0 merges them once all are complete
        with logit_store.SplitWriter(_part_path(job.out_dir, split.name, rank, world), len(job.perm),
                                     with_views=spec is not None, with_mixes=_mixes(spec)) as part:
            for b in batches:  # teacher label order; rank 0 maps them in _write
                part.write([split.ids[i] for i in b.rows], split.labels[b.rows], b.logits, b.view, b.boxes, b.flips,
                           b.mixes)
            part.close({"split": split.name, "part": rank, "parts": world})
        journal.remove()  # the part holds it all now
        torch.distributed.barrier()
        if rank != 0:  # wait for rank 0's file, then report from it
            torch.distributed.barrier()
            meta = logit_store.read_meta(path)
            return SplitReport(split.name, meta["rows"], meta["teacher_accuracy"], None, path.stat().st_size, path,
                               False)
        batches = _merge_parts(split, job.out_dir, world, cfg.batch_size, per_image)
    meta = _write(job, split, path, batches, key, spec, start, world, {"resumed_images": journal.done} if
                  journal.done else None)
    journal.remove(every_attempt=True)
    if world > 1:
        torch.distributed.barrier()  # the split's file is complete: the other ranks may read it
    return SplitReport(split.name, meta["rows"], meta["teacher_accuracy"], meta["images_per_s"],
                       path.stat().st_size, path, False, meta["wall_time_s"], journal.done)


def _write(job: _Job, split: Split, path: Path, batches, key: dict, spec: ViewSpec | None, start: float,
           world: int, extra: dict | None = None) -> dict:
    """Stream the batches into the split's file (dataset label order) and close it with its metadata
    (and `extra`)."""
    correct = np.zeros(2, dtype=np.int64)  # right on view 0, right on the other views
    index = {id_: i for i, id_ in enumerate(split.ids)}
    digests = split.digests()  # (N, 32): stored per row, so train-student can name an image changed since
    with logit_store.SplitWriter(path, len(job.perm), job.cfg.topk, job.cfg.topk_dtype,
                                 with_views=spec is not None, with_mixes=_mixes(spec), with_digests=True) as writer:
        for b in batches:
            logits = b.logits[:, job.perm]  # (R, C) dataset label order
            correct += _score(job, split, b, logits, index)
            writer.write([split.ids[i] for i in b.rows], split.labels[b.rows], logits, b.view, b.boxes, b.flips,
                         b.mixes, digests[b.rows])
        meta = _split_meta(job, split, key, spec, time.perf_counter() - start, correct, world)
        return writer.close({**meta, **(extra or {})})


def _score(job: _Job, split: Split, b: Batch, logits: np.ndarray, index: dict) -> list[int]:
    """How many of a batch's rows the teacher gets right, on view 0 and on the other views; refuses
    non-finite logits (e.g. fp16 overflow: the KD term would be NaN from the first step that meets them)."""
    labels = split.labels[b.rows]
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
        "views": 1 if spec is None else spec.k + 1,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if spec is not None:
        meta["views_teacher_accuracy"] = int(correct[1]) / (len(split) * spec.k)
        meta["teacher_inputs_per_s"] = round(len(split) * (spec.k + 1) / wall, 2)
    if world > 1:
        meta["processes"] = world
    return meta


def _mixes(spec: ViewSpec | None) -> bool:
    return spec is not None and bool(spec.policy.mixup)


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
    recorded = meta["teacher"]
    if teacher_spec is None and recorded.get("weights_sha256") and not Path(recorded["spec"]).expanduser().is_dir():
        raise KdpipeError(f"--teacher: the recorded teacher folder {recorded['spec']} is gone (moved, deleted, or "
                          "recorded relative to another working folder); pass --teacher PATH to where it is now")
    teacher = load_teacher(teacher_spec or recorded["spec"], None if teacher_spec else recorded["revision"], False)
    dataset = reopen_dataset(meta["dataset"], dataset_spec, list(cached))
    pool = [(name, j) for name, s in cached.items() for j in range(len(s.ids))]
    picked = [pool[i] for i in sorted(np.random.default_rng(seed).choice(len(pool), min(n, len(pool)), replace=False))]
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
              "weights_sha256": {"cache": recorded.get("weights_sha256"), "live": teacher.weights_sha256}}
    report["within_tolerance"] = report["max_abs_diff"] <= report["tolerance"]
    return report


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
