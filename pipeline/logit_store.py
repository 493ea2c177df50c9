"""THE cache format: one Parquet file per split of raw teacher logits, self-describing and checksummed.

Columns (see docs/cache-format.md):
    id      string              stable example key (relative image path, or sha256 of the bytes)
    view    int16               0 = the un-augmented image (room for K augmented views per image)
    label   int64               dataset label index, in `label_names` order
    logits  fixed_size_list<float32>[C]   raw teacher logits, columns in dataset label order
or, for large label spaces (`cache-teacher --topk K`), instead of `logits`:
    topk_values   fixed_size_list<float32|float16>[K]  the K largest raw logits, largest first
    topk_indices  fixed_size_list<int32>[K]            their classes (dataset label order)
    logsumexp     float32                              log sum exp of all C logits (computed in float64)

The schema metadata key `kdpipe` holds JSON (never pickles): format version, versions, teacher and
processor, dataset identity and content fingerprint, precision, timings, teacher accuracy, and a
SHA-256 of the column contents that `read_split` checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import KdpipeError

FORMAT = "kdpipe.teacher-logits"
FORMAT_VERSION = 1
META_KEY = b"kdpipe"
# Metadata fields that determine the logits: a file is reusable only if all of them match.
KEY_FIELDS = ("format_version", "teacher", "processor", "dataset_fingerprint", "label_names", "precision",
              "logits_storage")
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
class LogitSplit:
    ids: list[str]
    views: np.ndarray  # (N,) int16
    labels: np.ndarray  # (N,) int64
    logits: np.ndarray | None  # (N, C) float32, dataset label order; None when stored as top-K
    meta: dict
    topk: TopK | None = None  # (when stored as top-K)

    def take(self, rows: np.ndarray) -> "LogitSplit":
        return LogitSplit([self.ids[i] for i in rows], self.views[rows], self.labels[rows],
                          None if self.logits is None else self.logits[rows], self.meta,
                          None if self.topk is None else self.topk.take(rows))

    def view0(self) -> "LogitSplit":
        return self.take(np.flatnonzero(self.views == 0))

    def teacher_logits(self) -> np.ndarray:
        """(N, C) float32: the stored logits, or the top-K reconstruction (TopK.dense)."""
        return self.logits if self.logits is not None else self.topk.dense()

    def aligned_to(self, ids: list[str], labels: np.ndarray, where: str) -> np.ndarray:
        """Teacher logits (N, C) in the order of `ids`, joined by id (view 0); refuse any mismatch."""
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
        return plain.take(order).teacher_logits()


def content_sha256(ids: list[str], views: np.ndarray, labels: np.ndarray, *arrays: np.ndarray) -> str:
    """Over ids, views, labels and the stored teacher arrays (logits, or top-K values/indices/logsumexp),
    each in its stored dtype."""
    h = hashlib.sha256()
    h.update("\0".join(ids).encode())
    for a in (np.asarray(views, np.int16), np.asarray(labels, np.int64), *arrays):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_split(path: Path, ids: list[str], labels: np.ndarray, logits: np.ndarray, meta: dict,
                views: np.ndarray | None = None, topk: int | None = None, topk_dtype: str = "float32") -> None:
    """Write atomically: a temporary file in the same folder, fsynced, then renamed over `path`.
    With `topk`, only the K largest logits per row (+ classes, + logsumexp) are stored (TopK)."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    n, c = logits.shape
    views = np.zeros(n, dtype=np.int16) if views is None else np.asarray(views, dtype=np.int16)
    labels = np.asarray(labels, dtype=np.int64)
    columns = {"id": pa.array(ids, pa.string()), "view": pa.array(views, pa.int16()), "label": pa.array(labels, pa.int64())}
    if topk is None:
        storage, arrays = FULL, [logits]
        columns["logits"] = pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1), pa.float32()), c)
    else:
        sparse = TopK.from_logits(logits, topk)
        values = sparse.values.astype(topk_dtype)
        storage, arrays = {"kind": "topk", "k": topk, "dtype": topk_dtype}, [values, sparse.indices, sparse.logsumexp]
        columns["topk_values"] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), topk)
        columns["topk_indices"] = pa.FixedSizeListArray.from_arrays(pa.array(sparse.indices.reshape(-1), pa.int32()), topk)
        columns["logsumexp"] = pa.array(sparse.logsumexp, pa.float32())
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "logits_storage": storage, "rows": n,
            "num_classes": c, "content_sha256": content_sha256(ids, views, labels, *arrays)}
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, row_group_size=65536)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KdpipeError(f"cannot write {path}: {e.strerror or e}; free space or choose another --out") from None


def read_meta(path: Path) -> dict:
    """The metadata only (reads the footer, not the data)."""
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError:
        raise KdpipeError(f"{path}: no such file; build the cache with kdpipe cache-teacher") from None
    except Exception as e:  # damaged footers surface as Arrow, OS or Unicode errors
        raise KdpipeError(f"{path}: not a readable Parquet file ({type(e).__name__}); rebuild it with --force") from None
    raw = (schema.metadata or {}).get(META_KEY)
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


def read_split(path: Path) -> LogitSplit:
    """Read and verify a split file: format version, shapes, and the content checksum."""
    meta = read_meta(path)
    try:
        table = pq.read_table(path)
        c = meta["num_classes"]
        ids = table.column("id").to_pylist()
        views = table.column("view").to_numpy().astype(np.int16)
        labels = table.column("label").to_numpy().astype(np.int64)
        if meta.get("logits_storage", FULL)["kind"] == "topk":
            k = meta["logits_storage"]["k"]
            values = table.column("topk_values").combine_chunks().values.to_numpy().reshape(-1, k)
            indices = table.column("topk_indices").combine_chunks().values.to_numpy().reshape(-1, k)
            lse = table.column("logsumexp").to_numpy()
            arrays, logits = [values, indices, lse], None
            sparse = TopK(values.astype(np.float32), indices, lse, c)
        else:
            logits = table.column("logits").combine_chunks().values.to_numpy().reshape(-1, c)
            arrays, sparse = [logits], None
    except Exception as e:  # damaged bytes surface as Arrow, Unicode, shape or key errors
        raise KdpipeError(f"{path}: corrupt Parquet data ({type(e).__name__}); rebuild it with --force") from None
    if content_sha256(ids, views, labels, *arrays) != meta.get("content_sha256"):
        raise KdpipeError(f"{path}: contents do not match their checksum (corrupted?); rebuild it with --force")
    if sparse is not None and (sparse.indices.min(initial=0) < 0 or sparse.indices.max(initial=0) >= c):
        raise KdpipeError(f"{path}: top-K class indices out of range; rebuild it with --force")
    return LogitSplit(ids, views, labels, logits, meta, sparse)


def split_path(cache_dir: Path, split: str) -> Path:
    return Path(cache_dir) / f"{split}.parquet"


def cache_splits(cache_dir: Path) -> dict[str, Path]:
    """The split files of a cache folder, by split name."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise KdpipeError(f"--cache {cache_dir}: no such folder; build it with kdpipe cache-teacher")
    files = {p.stem: p for p in sorted(cache_dir.glob("*.parquet"))}
    if not files:
        raise KdpipeError(f"--cache {cache_dir}: holds no .parquet split files; build it with kdpipe cache-teacher")
    return files


def matches(meta: dict, key: dict) -> bool:
    """Whether an existing file was made from exactly the inputs in `key` (so it can be reused)."""
    defaults = {"logits_storage": FULL}
    return all(meta.get(k, defaults.get(k)) == key.get(k, defaults.get(k)) for k in KEY_FIELDS)
