"""THE cache format: one Parquet file per split of raw teacher logits, self-describing and checksummed.

Columns (see docs/cache-format.md):
    id      string              stable example key (relative image path, or sha256 of the bytes)
    view    int16               0 = the un-augmented image (room for K augmented views per image)
    label   int64               dataset label index, in `label_names` order
    logits  fixed_size_list<float32>[C]   raw teacher logits, columns in dataset label order

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
KEY_FIELDS = ("format_version", "teacher", "processor", "dataset_fingerprint", "label_names", "precision")


@dataclass
class LogitSplit:
    ids: list[str]
    views: np.ndarray  # (N,) int16
    labels: np.ndarray  # (N,) int64
    logits: np.ndarray  # (N, C) float32, dataset label order
    meta: dict

    def view0(self) -> "LogitSplit":
        keep = self.views == 0
        return LogitSplit([i for i, k in zip(self.ids, keep) if k], self.views[keep], self.labels[keep],
                          self.logits[keep], self.meta)

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
        return plain.logits[order]


def content_sha256(ids: list[str], views: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update("\0".join(ids).encode())
    for a, dtype in ((views, np.int16), (labels, np.int64), (logits, np.float32)):
        h.update(np.ascontiguousarray(a, dtype=dtype).tobytes())
    return h.hexdigest()


def write_split(path: Path, ids: list[str], labels: np.ndarray, logits: np.ndarray, meta: dict,
                views: np.ndarray | None = None) -> None:
    """Write atomically: a temporary file in the same folder, fsynced, then renamed over `path`."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    n, c = logits.shape
    views = np.zeros(n, dtype=np.int16) if views is None else np.asarray(views, dtype=np.int16)
    labels = np.asarray(labels, dtype=np.int64)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "rows": n, "num_classes": c,
            "content_sha256": content_sha256(ids, views, labels, logits)}
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "view": pa.array(views, pa.int16()),
        "label": pa.array(labels, pa.int64()),
        "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1), pa.float32()), c),
    }).replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
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
        logits = table.column("logits").combine_chunks().values.to_numpy().reshape(-1, c)
    except Exception as e:  # damaged bytes surface as Arrow, Unicode, shape or key errors
        raise KdpipeError(f"{path}: corrupt Parquet data ({type(e).__name__}); rebuild it with --force") from None
    if content_sha256(ids, views, labels, logits) != meta.get("content_sha256"):
        raise KdpipeError(f"{path}: contents do not match their checksum (corrupted?); rebuild it with --force")
    return LogitSplit(ids, views, labels, logits, meta)


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
    return all(meta.get(k) == key.get(k) for k in KEY_FIELDS)
