"""THE cache format: one Parquet file per split of raw teacher logits, self-describing and checksummed.

Columns (see docs/cache-format.md):
    id      string              stable example key (relative image path, or sha256 of the bytes)
    view    int16               0 = the un-augmented image (room for K augmented views per image)
    label   int64               dataset label index, in `label_names` order
    logits  fixed_size_list<float32>[C]   raw teacher logits, columns in dataset label order
with augmented views (`cache-teacher --views K`), before the teacher columns:
    view_box   fixed_size_list<float32>[4]  crop box (x0, y0, x1, y1) in source pixels
    view_flip  bool                         horizontal flip
and with mixed views (`--view-mixup a`), after them:
    mix_id, mix_box, mix_flip  string, as view_box, bool   the partner image blended in, its crop and flip
    mix_weight                 float32                      the partner's share (0 = not mixed)
or, for large label spaces (`cache-teacher --topk K`), instead of `logits`:
    topk_values   fixed_size_list<float32|float16>[K]  the K largest raw logits, largest first
    topk_indices  fixed_size_list<int32>[K]            their classes (dataset label order)
    logsumexp     float32                              log sum exp of all C logits (computed in float64)
and last, in files cache-teacher writes (format 3):
    image_sha256  fixed_size_list<uint8>[32]  SHA-256 of the image's bytes, so an image changed since is named

The schema metadata key `kdpipe` holds JSON (never pickles): format version, versions, teacher and
processor, dataset identity and content fingerprint, precision, timings, teacher accuracy, and a
SHA-256 of the column contents that `read_split` checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import files
from .errors import KdpipeError
from .views import Mixes

FORMAT = "kdpipe.teacher-logits"
FORMAT_VERSION = 3  # 2: checksum per column, so files are written as rows stream in; 3: image_sha256 column
REUSABLE_FORMATS = (2, 3)  # 3 only adds a column: a version 2 file's logits are as good
CHECKSUM = "sha256-of-column-sha256"
META_KEY = b"kdpipe"
# Metadata fields that determine the logits: a file is reusable only if all of them match.
KEY_FIELDS = ("teacher", "processor", "dataset_fingerprint", "label_names", "precision",
              "logits_storage", "augment")
FULL = {"kind": "full", "dtype": "float32"}  # logits_storage of files written before it was recorded


@dataclass(frozen=True)
class TopK:
    """Sparse teacher logits: per row the K largest raw logits, their classes, and the logsumexp of all
    C logits, so the probability mass outside the top K is known exactly (at T = 1)."""
    values: np.ndarray  # (N, K) float32 (stored as float32 or float16)
    indices: np.ndarray  # (N, K) int32
    logsumexp: np.ndarray  # (N,) float32
    num_classes: int

    @staticmethod
    def from_logits(logits: np.ndarray, k: int) -> "TopK":
        logits = np.asarray(logits, dtype=np.float64)  # (N, C)
        idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # (N, K) largest first
        m = logits.max(1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(1))).astype(np.float32)  # (N,)
        return TopK(np.take_along_axis(logits, idx, 1).astype(np.float32), idx.astype(np.int32), lse, logits.shape[1])

    def dense(self) -> np.ndarray:
        """(N, C) float32 logits whose softmax at T = 1 has exactly the stored top-K probabilities and the
        exact total tail mass, spread evenly over the other C - K classes: each gets the tail logit
        t = log((exp(lse) - sum_k exp(v_k)) / (C - K)). At T != 1 this is the uniform-tail approximation
        of FKD / TinyViT, with the tail's total derived from the stored logsumexp instead of guessed."""
        v = self.values.astype(np.float64)  # (N, K)
        n, k = v.shape
        out = np.empty((n, self.num_classes), dtype=np.float64)
        if k < self.num_classes:
            lse = self.logsumexp.astype(np.float64)[:, None]  # (N, 1)
            top_mass = np.exp(v - lse).sum(1, keepdims=True)  # (N, 1), <= 1 up to rounding
            tail_mass = np.clip(1.0 - top_mass, np.exp(-80.0), None)  # never log(0)
            out[:] = lse + np.log(tail_mass / (self.num_classes - k))
        np.put_along_axis(out, self.indices.astype(np.int64), v, 1)
        return out.astype(np.float32)

    def take(self, rows: np.ndarray) -> "TopK":
        return TopK(self.values[rows], self.indices[rows], self.logsumexp[rows], self.num_classes)


@dataclass
class Rows:
    """Rows of a split file, one per (image, view): what SplitWriter.write appends, and what a file reads back
    as (LogitSplit adds the file's metadata and, for a top-K file, its top-K instead of the logits)."""
    ids: list[str]  # (R,) stable example keys
    labels: np.ndarray  # (R,) int64 dataset label index
    logits: np.ndarray | None  # (R, C) float32 raw; None when read from a top-K file
    view: np.ndarray | None = None  # (R,) int16 view index (views.ViewRows; 0 = the image itself); None: all 0
    boxes: np.ndarray | None = None  # (R, 4) float32 crop box (x0, y0, x1, y1) in source pixels (cache --views)
    flips: np.ndarray | None = None  # (R,) bool horizontal flip (cache --views)
    mixes: Mixes | None = None  # what each view is blended with, partners as ids (--views K --view-mixup a)
    digests: np.ndarray | None = None  # (R, 32) uint8 SHA-256 of each row's image bytes (format 3)

    def take(self, rows: np.ndarray) -> Self:
        """These rows (an index array), in that order; whatever else the record holds is kept."""
        return replace(self, **self._picked(rows))

    def _picked(self, rows: np.ndarray) -> dict:
        pick = lambda a: None if a is None else a.take(rows) if isinstance(a, (TopK, Mixes)) else a[rows]  # noqa: E731
        return {"ids": [self.ids[i] for i in rows], "labels": self.labels[rows], "logits": pick(self.logits),
                "view": pick(self.view), "boxes": pick(self.boxes), "flips": pick(self.flips),
                "mixes": pick(self.mixes), "digests": pick(self.digests)}

    @classmethod
    def of(cls, record: "Rows", **more) -> Self:
        """`record`'s rows as a record of this kind (a subclass of Rows), with its own fields `more`."""
        return cls(**{f.name: getattr(record, f.name) for f in fields(Rows)}, **more)

    @staticmethod
    def from_table(table: pa.Table) -> "Rows":
        """The rows of a table read from a split file (logit columns stored whole), unchecked."""
        return _rows(*_columns(table))

    @staticmethod
    def concat(parts: "list[Rows]") -> "Rows":
        """One record of the parts' rows, in order (each part with the same columns)."""
        join = lambda name: None if getattr(parts[0], name) is None else np.concatenate(  # noqa: E731
            [getattr(p, name) for p in parts])
        mixes = None if parts[0].mixes is None else Mixes(
            *(np.concatenate([getattr(p.mixes, f.name) for p in parts]) for f in fields(Mixes)))
        return Rows([i for p in parts for i in p.ids], join("labels"), join("logits"), join("view"), join("boxes"),
                    join("flips"), mixes, join("digests"))


@dataclass
class LogitSplit(Rows):
    """A whole split file as read (read_split): its rows and its metadata."""
    meta: dict = field(default_factory=dict)
    topk: TopK | None = None  # (when stored as top-K; `logits` is None then)

    def take(self, rows: np.ndarray) -> "LogitSplit":
        return replace(self, **self._picked(rows), topk=None if self.topk is None else self.topk.take(rows))

    def changed_images(self, ids: list[str], digests: np.ndarray) -> list[str] | None:
        """Of the images `ids` (each in this split), those whose bytes' SHA-256 (`digests`, (N, 32)) differs
        from the one stored when the split was cached, in the order of `ids`; None when the file stores no
        digests (written before format 3)."""
        if self.digests is None:
            return None
        plain = self.view0()
        index = {id_: i for i, id_ in enumerate(plain.ids)}
        stored = plain.digests[[index[i] for i in ids]]  # (N, 32)
        return [ids[i] for i in np.flatnonzero((stored != np.asarray(digests)).any(1))]

    @property
    def per_image(self) -> int:
        """V, the rows each image has (views.ViewRows): the metadata's "views" (K + 1 with --views K)."""
        return int(self.meta.get("views", 1))

    def view0(self) -> "LogitSplit":
        return self if (self.view == 0).all() else self.take(np.flatnonzero(self.view == 0))

    def teacher_logits(self) -> np.ndarray:
        """(N, C) float32: the stored logits, or the top-K reconstruction (TopK.dense)."""
        return self.logits if self.logits is not None else self.topk.dense()

    def aligned_to(self, ids: list[str], labels: np.ndarray, where: str, sparse: bool = False) -> "np.ndarray | TopK":
        """Teacher logits (N, C) in the order of `ids`, joined by id (view 0); refuse any mismatch. With
        `sparse`, a top-K cache stays TopK (N x K in memory; densify per batch)."""
        plain = self.view0()
        index = {id_: i for i, id_ in enumerate(plain.ids)}
        missing = [i for i in ids if i not in index]
        extra = sorted(set(index) - set(ids))
        if missing or extra:
            raise KdpipeError(
                f"{where}: cache and dataset hold different examples "
                f"({len(missing)} ids missing from the cache, e.g. {missing[:3]}; "
                f"{len(extra)} extra ids in the cache, e.g. {extra[:3]}); rebuild with kdpipe cache-teacher"
            )
        order = np.array([index[i] for i in ids], dtype=np.int64)
        wrong = np.flatnonzero(plain.labels[order] != labels)
        if len(wrong):
            raise KdpipeError(f"{where}: {len(wrong)} examples have other labels in the cache than in the dataset "
                              f"(e.g. {ids[wrong[0]]}); rebuild with kdpipe cache-teacher")
        aligned = plain.take(order)
        return aligned.topk if sparse and aligned.topk is not None else aligned.teacher_logits()

    def aligned_views(self, ids: list[str], labels: np.ndarray, where: str) -> "LogitSplit":
        """Every stored view of the images `ids`, rows in views.ViewRows order (image by image, then view),
        after the same checks as aligned_to; refuses a cache without views or with a view missing."""
        v = self.per_image
        if v < 2 or self.boxes is None:
            raise KdpipeError(f"{where}: holds no augmented views; build it with kdpipe cache-teacher --views K")
        self.aligned_to(ids, labels, where, sparse=True)  # the id and label checks, on view 0
        index = {(id_, int(view)): i for i, (id_, view) in enumerate(zip(self.ids, self.view))}
        try:
            order = np.array([index[(id_, k)] for id_ in ids for k in range(v)], dtype=np.int64)
        except KeyError as e:
            raise KdpipeError(f"{where}: view {e.args[0][1]} of {e.args[0][0]} is missing; rebuild with "
                              "kdpipe cache-teacher --force") from None
        return self.take(order)


def _bytes(a: np.ndarray) -> memoryview:
    """The array's bytes without copying them (when already contiguous)."""
    a = np.ascontiguousarray(a)
    return memoryview(a).cast("B") if a.size else memoryview(b"")


class _ColumnHashes:
    """Checksum of the stored columns, computed as rows stream in: one SHA-256 per column over its bytes
    in row order (ids joined by NUL), and the file's checksum is the SHA-256 of those digests in order."""

    def __init__(self, names: list[str]):
        self.hashes = {name: hashlib.sha256() for name in names}
        self.rows = 0

    def update(self, ids: list[str], arrays: list[np.ndarray]) -> None:
        if ids:
            self.hashes["id"].update(self._joined(ids))
        for h, a in zip(list(self.hashes.values())[1:], arrays):
            h.update(self._joined(list(a)) if a.dtype == object else _bytes(a))  # strings like ids, else bytes
        self.rows += len(ids)

    def _joined(self, strings: list[str]) -> bytes:
        return (("\0" if self.rows and strings else "") + "\0".join(strings)).encode()

    def hexdigest(self) -> str:
        return hashlib.sha256(b"".join(h.digest() for h in self.hashes.values())).hexdigest()


def content_sha256(ids: list[str], views: np.ndarray, labels: np.ndarray, *arrays: np.ndarray) -> str:
    """Format 1's checksum: one SHA-256 over ids, views, labels and the stored teacher arrays, each in its
    stored dtype (needs every row at once; format 2 streams, see _ColumnHashes)."""
    h = hashlib.sha256()
    h.update("\0".join(ids).encode())
    for a in (np.asarray(views, np.int16), np.asarray(labels, np.int64), *arrays):
        h.update(_bytes(a))
    return h.hexdigest()


class SplitWriter:
    """Write one split file as rows arrive, in row groups, so memory stays flat however large the split.

    Rows go to a temporary file in the same folder; `close(meta)` adds the metadata (rows, checksum and
    whatever the caller measured) to the footer, fsyncs and renames it over `path`. Leaving the `with`
    block by an exception, or a kill, leaves no file under `path`; a stale temporary is swept up by
    locking.exclusive_for_job. With `topk`, each row keeps its K largest logits (TopK).
    """

    def __init__(self, path: Path, num_classes: int, topk: int | None = None, topk_dtype: str = "float32",
                 rows_per_group: int | None = None, with_views: bool = False, with_mixes: bool = False,
                 with_digests: bool = False):
        self.path, self.c, self.topk, self.topk_dtype = Path(path), num_classes, topk, topk_dtype
        self.with_views, self.with_mixes, self.with_digests = with_views, with_mixes, with_digests
        fields = [("id", pa.string()), ("view", pa.int16()), ("label", pa.int64())]
        if with_views:  # each row's view parameters, so a view can be rendered again exactly (views.render)
            fields += [("view_box", pa.list_(pa.float32(), 4)), ("view_flip", pa.bool_())]
        if with_mixes:  # and what it is blended with (views.render_mixed)
            fields += [("mix_id", pa.string()), ("mix_box", pa.list_(pa.float32(), 4)), ("mix_flip", pa.bool_()),
                       ("mix_weight", pa.float32())]
        if topk is None:
            self.storage = FULL
            fields.append(("logits", pa.list_(pa.float32(), num_classes)))
            row_bytes = 4 * num_classes
        else:
            self.storage = {"kind": "topk", "k": topk, "dtype": topk_dtype}
            fields += [("topk_values", pa.list_(pa.from_numpy_dtype(np.dtype(topk_dtype)), topk)),
                       ("topk_indices", pa.list_(pa.int32(), topk)), ("logsumexp", pa.float32())]
            row_bytes = (np.dtype(topk_dtype).itemsize + 4) * topk + 4
        if with_digests:  # each row's image bytes, hashed: train-student names an image changed since
            fields.append(("image_sha256", pa.list_(pa.uint8(), 32)))
        self.schema = pa.schema(fields)
        # ~4 MB of teacher values per row group: the most this writer buffers, whatever the split's size
        self.rows_per_group = rows_per_group or int(np.clip((4 << 20) // row_bytes, 256, 65536))
        self.hashes = _ColumnHashes([name for name, _ in fields])
        self.buffer: list[pa.RecordBatch] = []
        self.buffered = 0
        self.tmp = files.temporary(self.path)  # streamed into, renamed over the path when complete
        self.writer = None

    def __enter__(self) -> "SplitWriter":
        self._guard(self._open)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(self.tmp, self.schema, use_dictionary=False)  # unique ids, float logits

    def write(self, rows: Rows) -> None:
        """Append rows: `logits` (B, C) raw, in dataset label order; with views, each row's `boxes` (B, 4)
        and `flips` (B,); with mixed views, its `mixes` (partners as ids); with digests, each row's image
        SHA-256 `digests` (B, 32) uint8."""
        ids = rows.ids
        logits = np.ascontiguousarray(rows.logits, dtype=np.float32)  # (B, C)
        if logits.ndim != 2 or logits.shape[1] != self.c or not len(ids) == len(logits) == len(rows.labels):
            raise ValueError(f"rows do not fit: {len(ids)} ids, {len(rows.labels)} labels, logits {logits.shape}, "
                             f"{self.c} classes")
        n = len(ids)
        views = np.zeros(n, dtype=np.int16) if rows.view is None else np.asarray(rows.view, dtype=np.int16)
        labels = np.asarray(rows.labels, dtype=np.int64)
        arrays, columns = self._logit_columns(logits)
        if self.with_mixes:
            m = Mixes(np.asarray(rows.mixes.partners, dtype=object), _box_array(rows.mixes.boxes, n),
                      np.asarray(rows.mixes.flips, bool), np.asarray(rows.mixes.weights, np.float32))
            arrays = [m.partners, m.boxes, m.flips, m.weights, *arrays]
            columns = [pa.array(list(m.partners), pa.string()), _box_column(m.boxes), pa.array(m.flips, pa.bool_()),
                       pa.array(m.weights, pa.float32()), *columns]
        if self.with_views:
            boxes = _box_array(rows.boxes, n)
            flips = np.asarray(rows.flips, dtype=bool).reshape(n)
            arrays = [boxes, flips, *arrays]
            columns = [_box_column(boxes), pa.array(flips, pa.bool_()), *columns]
        if self.with_digests:
            digests = np.ascontiguousarray(rows.digests, dtype=np.uint8).reshape(n, 32)
            arrays = [*arrays, digests]
            columns = [*columns, pa.FixedSizeListArray.from_arrays(pa.array(digests.reshape(-1), pa.uint8()), 32)]
        self.hashes.update(list(ids), [views, labels, *arrays])
        batch = pa.RecordBatch.from_arrays([pa.array(list(ids), pa.string()), pa.array(views, pa.int16()),
                                            pa.array(labels, pa.int64()), *columns], schema=self.schema)
        self.buffer.append(batch)
        self.buffered += n
        if self.buffered >= self.rows_per_group:
            self._guard(self._flush)

    def _logit_columns(self, logits: np.ndarray) -> tuple[list, list]:
        """The logits as stored, (arrays to checksum, Arrow columns): all C as float32, or with top-K the K
        largest values (in topk_dtype), their class indices and each row's logsumexp over all C."""
        if self.topk is None:
            return [logits], [pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1), pa.float32()), self.c)]
        sparse = TopK.from_logits(logits, self.topk)
        values = sparse.values.astype(self.topk_dtype)  # (B, K)
        return [values, sparse.indices, sparse.logsumexp], [
            pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), self.topk),
            pa.FixedSizeListArray.from_arrays(pa.array(sparse.indices.reshape(-1), pa.int32()), self.topk),
            pa.array(sparse.logsumexp, pa.float32())]

    def _flush(self, everything: bool = False) -> None:
        """Write whole row groups (and, at the end, the rest); keep a partial group buffered."""
        if not self.buffer:
            return
        table = pa.Table.from_batches(self.buffer, self.schema)
        n = table.num_rows if everything else table.num_rows - table.num_rows % self.rows_per_group
        self.writer.write_table(table.slice(0, n), row_group_size=self.rows_per_group)
        rest = table.slice(n)
        self.buffer, self.buffered = rest.to_batches(), rest.num_rows

    def close(self, meta: dict) -> dict:
        """Finish the file under its final name; returns the metadata written."""
        meta = {"format": FORMAT, **meta, "format_version": FORMAT_VERSION, "logits_storage": self.storage,
                "rows": self.hashes.rows, "num_classes": self.c, "checksum": CHECKSUM,
                "content_sha256": self.hashes.hexdigest()}
        self._guard(lambda: self._finish(meta))
        return meta

    def _finish(self, meta: dict) -> None:
        self._flush(everything=True)
        self.writer.add_key_value_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
        self.writer.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)

    def _guard(self, step) -> None:
        try:
            step()
        except OSError as e:
            self.abort()
            raise KdpipeError(f"cannot write {self.path}: {e.strerror or e}; free space or choose another --out") from None


def _box_array(boxes, n: int) -> np.ndarray:
    return np.ascontiguousarray(boxes, dtype=np.float32).reshape(n, 4)


def _box_column(boxes: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(boxes.reshape(-1), pa.float32()), 4)


def read_meta(path: Path) -> dict:
    """The metadata only (reads the footer, not the data)."""
    try:
        footer = pq.read_metadata(path).metadata or {}
    except FileNotFoundError:
        raise KdpipeError(f"{path}: no such file; build the cache with kdpipe cache-teacher") from None
    except Exception as e:  # damaged footers surface as Arrow, OS or Unicode errors
        raise KdpipeError(f"{path}: not a readable Parquet file ({type(e).__name__}); rebuild it with --force") from None
    raw = footer.get(META_KEY)
    if raw is None:
        raise KdpipeError(f"{path}: not a kdpipe logit cache (no '{META_KEY.decode()}' metadata)")
    try:
        meta = json.loads(raw)  # data, never code: JSON only
        assert isinstance(meta, dict) and isinstance(meta.get("format_version", 0), int)
    except (ValueError, AssertionError):
        raise KdpipeError(f"{path}: its metadata is damaged (not valid JSON); rebuild it with --force") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise KdpipeError(f"{path}: written by a newer kdpipe (format {meta['format_version']} > "
                          f"{FORMAT_VERSION}); upgrade kdpipe or rebuild the cache")
    return meta


def _columns(table: pa.Table) -> tuple[list[str], dict[str, np.ndarray]]:
    """ids, and every other column as a numpy array in its stored dtype (fixed-size lists as (N, size))."""
    out = {}
    for name in table.schema.names[1:]:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return table.column("id").to_pylist(), out


def read_split(path: Path) -> LogitSplit:
    """Read and verify a split file: format version, shapes, and the content checksum."""
    meta = read_meta(path)
    try:
        table = pq.read_table(path)
        c = meta["num_classes"]
        ids, cols = _columns(table)
        views, labels = cols["view"].astype(np.int16), cols["label"].astype(np.int64)
        if meta.get("checksum") == CHECKSUM:
            arrays = [cols[n] for n in table.schema.names[1:]]
        else:  # format 1: teacher columns only, in this order
            arrays = [views, labels] + [cols[n] for n in ("logits", "topk_values", "topk_indices", "logsumexp")
                                        if n in cols]
        logits, sparse = cols.get("logits"), None
        if meta.get("logits_storage", FULL)["kind"] == "topk":
            sparse = TopK(cols["topk_values"].astype(np.float32), cols["topk_indices"], cols["logsumexp"], c)
        elif logits.shape[1] != c:
            raise ValueError("logits width")
        digest = _checksum(meta, ids, table.schema.names, arrays)
    except Exception as e:  # damaged bytes surface as Arrow, Unicode, type, shape or key errors
        raise KdpipeError(f"{path}: corrupt Parquet data ({type(e).__name__}); rebuild it with --force") from None
    if digest != meta.get("content_sha256"):
        raise KdpipeError(f"{path}: contents do not match their checksum (corrupted?); rebuild it with --force")
    if sparse is not None and (sparse.indices.min(initial=0) < 0 or sparse.indices.max(initial=0) >= c):
        raise KdpipeError(f"{path}: top-K class indices out of range; rebuild it with --force")
    return LogitSplit.of(_rows(ids, cols), meta=meta, topk=sparse)


def _rows(ids: list[str], cols: dict[str, np.ndarray]) -> Rows:
    """A file's rows from its columns (_columns), each in the dtype Rows holds."""
    mixes = None
    if "mix_id" in cols:
        mixes = Mixes(cols["mix_id"].astype(object), cols["mix_box"], cols["mix_flip"].astype(bool),
                      cols["mix_weight"].astype(np.float32))
    flips = cols["view_flip"].astype(bool) if "view_flip" in cols else None
    return Rows(ids, cols["label"].astype(np.int64), cols.get("logits"), cols["view"].astype(np.int16),
                cols.get("view_box"), flips, mixes, cols.get("image_sha256"))


def verify(path: Path) -> dict:
    """Check a file's checksum reading it a batch at a time (flat memory); returns its metadata."""
    meta = read_meta(path)
    if meta.get("checksum") != CHECKSUM:  # format 1 needs every row at once
        return read_split(path).meta
    stream = RowStream(path)
    names = stream.file.schema_arrow.names
    hashes = _ColumnHashes(names)
    try:
        while (batch := stream.take(65536)).num_rows:
            ids, cols = _columns(batch)
            hashes.update(ids, [cols[n] for n in names[1:]])
    except Exception as e:  # damaged bytes
        raise KdpipeError(f"{path}: corrupt Parquet data ({type(e).__name__}); rebuild it with --force") from None
    if hashes.hexdigest() != meta.get("content_sha256"):
        raise KdpipeError(f"{path}: contents do not match their checksum (corrupted?); rebuild it with --force")
    return meta


class RowStream:
    """Rows of a Parquet file in order, `take(n)` at a time, whatever its row groups."""

    def __init__(self, path: Path, columns: list[str] | None = None):
        self.file = pq.ParquetFile(path)
        schema = self.file.schema_arrow
        self.schema = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        self.batches = self.file.iter_batches(batch_size=8192, columns=columns)
        self.pending = None  # pa.Table of rows read but not yet taken

    def take(self, n: int) -> pa.Table:
        tables = [] if self.pending is None else [self.pending]
        have = 0 if self.pending is None else self.pending.num_rows
        while have < n:
            batch = next(self.batches, None)
            if batch is None:
                break
            tables.append(pa.Table.from_batches([batch]))
            have += batch.num_rows
        if not tables:
            return self.schema.empty_table()
        table = pa.concat_tables(tables)
        self.pending = table.slice(n) if table.num_rows > n else None
        return table.slice(0, n)


def _checksum(meta: dict, ids: list[str], names: list[str], arrays: list[np.ndarray]) -> str:
    if meta.get("checksum") != CHECKSUM:  # format 1
        return content_sha256(ids, *arrays)
    hashes = _ColumnHashes(names)
    hashes.update(ids, arrays)
    return hashes.hexdigest()


def split_path(cache_dir: Path, split: str) -> Path:
    return Path(cache_dir) / f"{split}.parquet"


def cache_splits(cache_dir: Path, where: str | None = None) -> dict[str, Path]:
    """The split files of a cache folder, by split name (`where` names it in errors; default --cache DIR)."""
    cache_dir = Path(cache_dir)
    where = where or f"--cache {cache_dir}"
    if cache_dir.is_file():
        raise KdpipeError(f"{where}: a file; pass the folder that holds the split files")
    if not cache_dir.is_dir():
        raise KdpipeError(f"{where}: no such folder; build it with kdpipe cache-teacher")
    files = {p.stem: p for p in sorted(cache_dir.glob("*.parquet"))}
    if not files:
        raise KdpipeError(f"{where}: holds no .parquet split files; build it with kdpipe cache-teacher")
    return files


def matches(meta: dict, key: dict) -> bool:
    """Whether an existing file was made from exactly the inputs in `key` (so it can be reused)."""
    defaults = {"logits_storage": FULL, "augment": None}
    return meta.get("format_version") in REUSABLE_FORMATS and \
        all(meta.get(k, defaults.get(k)) == key.get(k, defaults.get(k)) for k in KEY_FIELDS)


def source(meta: dict) -> dict:
    """What every split of one cache shares: the teacher (its weights digest for a folder, else hub id and
    revision; and its processor), the dataset (its folder, or hub id and revision) and the label names.
    Splits may differ in everything else (views, top-K, precision)."""
    t, d = meta.get("teacher") or {}, meta.get("dataset") or {}
    teacher = {"weights_sha256": t["weights_sha256"]} if t.get("weights_sha256") else \
        {"spec": t.get("spec"), "revision": t.get("revision")}
    if d.get("kind") == "local":
        spec = Path(d.get("spec") or "")
        dataset = {"root": d.get("root"), "file": spec.name if spec.suffix in (".parquet", ".arrow") else None}
    else:
        dataset = {"spec": d.get("spec"), "revision": d.get("revision")}
    return {"teacher": {**teacher, "processor": meta.get("processor")}, "dataset": dataset,
            "labels": meta.get("label_names")}


def describe_source(meta: dict, part: str) -> str:
    """The teacher, dataset or labels of a split's metadata, for an error message."""
    if part == "labels":
        return str(meta.get("label_names"))
    d = meta.get(part) or {}
    if part == "teacher" and d.get("weights_sha256"):
        return f"{d.get('spec')}, weights sha256 {d['weights_sha256'][:12]}"
    if part == "dataset" and d.get("kind") == "local" and d.get("root"):
        spec = Path(d.get("spec") or "")
        return str(Path(d["root"]) / spec.name) if spec.suffix in (".parquet", ".arrow") else d["root"]
    return f"{d.get('spec')}{'@' + str(d['revision'])[:12] if d.get('revision') else ''}"


def inspect(path: Path) -> list[tuple[str, LogitSplit, float, int]]:
    """Verify a cache folder (or one split's file): every split file read (format and checksum checked), its
    teacher accuracy recomputed from the stored logits and compared with the recorded one, and all splits
    from one source. Per split: (name, split, recomputed accuracy, file bytes)."""
    path = Path(path)
    paths = {path.stem: path} if path.is_file() else cache_splits(path, where=str(path))
    rows = []
    for name, f in paths.items():
        split = read_split(f)
        plain = split.view0()
        acc = float((plain.teacher_logits().argmax(1) == plain.labels).mean())  # top-1 is kept by --topk too
        if abs(acc - split.meta["teacher_accuracy"]) > 1e-9:
            raise KdpipeError(f"{f}: stored teacher accuracy {split.meta['teacher_accuracy']:.4f} differs from "
                              f"the recomputed {acc:.4f}; rebuild it with --force")
        rows.append((name, split, acc, f.stat().st_size))
    metas = {name: split.meta for name, split, _, _ in rows}
    if path.is_dir():
        check_split_names(metas, paths)
    check_one_source(metas, str(path))
    return rows


def check_split_names(metas: dict[str, dict], paths: dict[str, Path]) -> None:
    """Each file of a cache folder holds the split it is named after (its metadata records which): two files
    renamed into each other's places would otherwise pass for each other."""
    for name, meta in metas.items():
        if meta.get("split", name) != name:
            raise KdpipeError(f"{paths[name]} holds the logits of split {meta['split']!r}, not {name!r} (renamed or "
                              f"edited); rename it back to {meta['split']}.parquet, or rebuild the cache with "
                              "kdpipe cache-teacher --force")


def check_one_source(metas: dict[str, dict], where: str) -> None:
    """Refuse split files that come from different teachers, datasets or label sets (a folder reused
    for another cache): names the odd splits and what differs. The reference is the source most splits
    share (ties: the one of the `train` split, else the first)."""
    groups: dict[str, list[str]] = {}
    for name, meta in metas.items():
        groups.setdefault(json.dumps(source(meta), sort_keys=True), []).append(name)
    if len(groups) < 2:
        return
    ref = max(groups.values(), key=lambda names: (len(names), "train" in names))
    odd = next(names for names in groups.values() if names is not ref)
    a, b = source(metas[odd[0]]), source(metas[ref[0]])
    part = next(p for p in ("dataset", "teacher", "labels") if a[p] != b[p])
    what = {"dataset": "comes from another dataset", "teacher": "comes from another teacher",
            "labels": "has other labels"}[part]
    raise KdpipeError(f"{where}: split {', '.join(map(repr, odd))} {what} "
                      f"({describe_source(metas[odd[0]], part)}) than {', '.join(map(repr, ref))} "
                      f"({describe_source(metas[ref[0]], part)}); a cache holds one teacher's logits on one dataset: "
                      "rebuild it with kdpipe cache-teacher --force, or use separate folders")
