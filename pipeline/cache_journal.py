"""Stage one's resume journal: a pass over one split, committed a batch at a time, so that a killed run
resumes mid-split.

Every teacher batch is committed as it comes, as a chunk file `<first>-<end>.parquet` (images first..end
of this process's rows) in `<out>/.journal/<split>.r<rank>of<world>/`, written by logit_store.SplitWriter:
under a temporary name, checksummed, renamed, so a chunk is complete or absent. `key.json` holds the
digest of the split's reuse key. A rerun with the same key reads back the chunks that cover the first
images without a gap (each verified: checksum, ids, views), yields them as they were, and runs the
teacher on the remaining images only; a kill -9 therefore loses at most the batches in flight (decoded
or in the teacher, not yet committed). Another key, --force, or an unreadable chunk starts that part
over. The folder is removed once the split's file is complete. Each chunk records the seconds its batch
took, so the split's reported cost sums every attempt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import files, logit_store, views
from .data import Split
from .errors import KdpipeError
from .teacher_inputs import Batch

JOURNAL = ".journal"  # in --out: the committed batches of splits not yet complete


@dataclass(frozen=True)
class Chunk:
    """One committed batch: images first..end - 1 of this process's rows, in `path`."""
    first: int
    end: int
    path: Path
    seconds: float  # the teacher pass over it, as the attempt that committed it measured


class Journal:
    """This process's journal of one split (see the module's docstring). `writer(path)` opens a chunk's
    logit_store.SplitWriter (the pass's columns, logits in the teacher's label order, as batches come)."""

    def __init__(self, out_dir: Path, split: Split, key: dict, per_image: int, writer: Callable[[Path], object],
                 rank: int = 0, world: int = 1, force: bool = False):
        self.split, self.per_image, self.writer = split, per_image, writer
        self.rows = np.arange(rank, len(split), world)  # this process's images, in order
        self.folder = Path(out_dir) / JOURNAL / f"{split.name}.r{rank}of{world}"
        self._start(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest(), force)
        self.chunks = self._readable_prefix()
        self.done = self.chunks[-1].end if self.chunks else 0  # images of self.rows already committed
        self.earlier_s = sum(c.seconds for c in self.chunks)

    def _start(self, digest: str, force: bool) -> None:
        """Keep the folder when it was made for this key (and not --force), else start it over."""
        marker = self.folder / "key.json"
        try:
            same = json.loads(marker.read_text()).get("key_sha256") == digest and not force
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp-*"):  # a chunk being written when the process was killed
            stale.unlink(missing_ok=True)
        if not same:
            files.write_text(marker, json.dumps({"key_sha256": digest, "split": self.split.name,
                                                 "per_image": self.per_image}))

    def _readable_prefix(self) -> list[Chunk]:
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
            chunks.append(Chunk(first, end, path, float(meta.get("seconds", 0.0))))
            at = end
        for path in found[len(chunks):]:
            path.unlink(missing_ok=True)
        return chunks

    def batches(self, fresh: Callable[[np.ndarray], Iterator[Batch]]) -> Iterator[Batch]:
        """The committed batches read back, then `fresh(rows not yet done)`'s, each committed as it passes."""
        index = {id_: i for i, id_ in enumerate(self.split.ids)}
        for chunk in self.chunks:
            try:
                batch = self._read(chunk, index)
            except KdpipeError as e:
                raise KdpipeError(f"{e}; delete {self.folder} to recompute the split from its first image") from None
            yield batch
        at, clock = self.done, time.perf_counter()
        for b in fresh(self.rows[self.done:]):
            end = at + len(b.rows) // self.per_image
            self._commit(b, at, end, time.perf_counter() - clock)
            clock, at = time.perf_counter(), end
            yield b

    def _read(self, chunk: Chunk, index: dict) -> Batch:
        """A committed batch as it was yielded, after checking it holds the rows it is named after."""
        c = logit_store.read_split(chunk.path)  # verifies the checksum
        layout = views.ViewRows(chunk.end - chunk.first, self.per_image)
        at = np.arange(len(layout))
        rows = self.rows[chunk.first:chunk.end][layout.image(at)]  # (R,) dataset rows
        if [index.get(i, -1) for i in c.ids] != rows.tolist() or not np.array_equal(c.view, layout.view(at)):
            raise KdpipeError(f"{chunk.path}: holds other rows than this split's images {chunk.first}..{chunk.end - 1}")
        return Batch.of(c, rows=rows)

    def _commit(self, b: Batch, first: int, end: int, seconds: float) -> None:
        with self.writer(self.folder / f"{first:010d}-{end:010d}.parquet") as chunk:
            chunk.write(b)
            chunk.close({"split": self.split.name, "images": [first, end], "seconds": round(seconds, 4)})

    def remove(self, every_attempt: bool = False) -> None:
        """Drop this process's journal (`every_attempt`: every journal of the split, and .journal when empty)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if every_attempt:
            discard(self.folder.parent.parent, self.split.name)


def discard(out_dir: Path, split: str) -> None:
    """Remove every journal of `split` in `out_dir` (each process's), and .journal once it is empty."""
    root = Path(out_dir) / JOURNAL
    for folder in root.glob(f"{split}.r*of*"):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        root.rmdir()
    except OSError:  # absent, or other splits' journals remain
        pass
