"""The student's pixels for stored views, rendered when a batch needs them (cache-teacher --views K).

A view is not stored as pixels: it is rendered from the split's decode-once originals (pixels.Originals) with
the function stage one fed the teacher with, views.render_mixed, on background threads (ViewSource), or in
batches on the GPU with Pillow's arithmetic replayed exactly (DeviceViewSource, pillow_resample), so K costs
only the cache's view parameters (docs/views.md).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections import deque
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import views
from .pillow_resample import FILTERS, resample_batch


def default_render_threads() -> int:
    """Background rendering threads: half the cores (the student's steps keep the rest), 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class ViewSource:
    """The student's pixels for stored views, rendered when a batch needs them. Row i * V + v is view v of
    image i: its crop box and flip and, for a mixed view, the partner (a split index), its box and flip and
    the partner's share, rendered at `size` by views.render_mixed, the function stage one fed the teacher
    with, from `image(i)` (Originals.image, or Split.image over the cap): at the teacher's size the student
    gets the teacher's very pixels, at another size the same box, flip and blend resampled to it.

    `plan(batches)` hands the coming batches (row arrays, in the order they will be taken) to `threads`
    background threads, which keep up to `depth` batches rendered ahead of the training loop; PIL's resize
    and numpy release the GIL, so rendering overlaps the student's steps. `take(rows)` returns a batch
    (B, H, W, 3) uint8: its planned render (batches planned before it but never taken are dropped), or,
    when it was not planned, one rendered in place. Rendering is deterministic, so the result never
    depends on threads or timing."""

    def __init__(self, image: Callable[[int], Image.Image], boxes: np.ndarray, flips: np.ndarray,
                 size: tuple[int, int], resample: int, mixes: views.Mixes | None = None, threads: int | None = None,
                 depth: int | None = None):
        self.layout = views.ViewRows(*np.shape(flips))
        self.image, self.size, self.resample = image, (int(size[0]), int(size[1])), int(resample)
        self.boxes = np.asarray(boxes, np.float32).reshape(len(self.layout), 4)
        self.flips = np.asarray(flips, bool).reshape(len(self.layout))
        self.mixes = mixes  # rows i * V + v, partners as split indices (-1: not mixed)
        self.threads = threads or default_render_threads()
        self.depth = depth or max(4, 2 * self.threads)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._plan: deque = deque()  # [key, rows, future or None], in the order they will be taken
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.flips)

    def render(self, rows) -> np.ndarray:
        """Rows (B,) -> (B, H, W, 3) uint8, rendered now on the calling thread."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        out = np.empty((len(rows), *self.size, 3), np.uint8)
        for k, r in enumerate(rows.tolist()):
            mix = None
            if self.mixes is not None and self.mixes.weights[r]:
                mix = (self.image(int(self.mixes.partners[r])), self.mixes.boxes[r], bool(self.mixes.flips[r]),
                       self.mixes.weights[r])
            out[k] = views.render_mixed(self.image(self.layout.image(r)), self.boxes[r], bool(self.flips[r]), self.size,
                                        self.resample, mix)
        return out

    def plan(self, batches) -> None:
        """Render these batches of rows on the background threads, in this order (replaces an earlier plan)."""
        with self._lock:
            for entry in self._plan:
                if entry[2] is not None:
                    entry[2].cancel()
            self._plan = deque([[b.tobytes(), b, None] for b in (np.asarray(x, np.int64).reshape(-1) for x in batches)])
            self._submit()

    def take(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64).reshape(-1)
        key = rows.tobytes()
        future = None
        with self._lock:
            at = next((j for j, entry in enumerate(self._plan) if entry[0] == key), None)
            if at is not None:
                for _ in range(at):  # planned but skipped (e.g. a step a process sits out): dropped
                    skipped = self._plan.popleft()
                    if skipped[2] is not None:
                        skipped[2].cancel()
                future = self._plan.popleft()[2]
                self._submit()
        return future.result() if future is not None else self.render(rows)

    def close(self) -> None:
        with self._lock:
            for entry in self._plan:
                if entry[2] is not None:
                    entry[2].cancel()
            self._plan.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def _submit(self) -> None:
        """Keep the first `depth` planned batches submitted (called with the lock held)."""
        for j, entry in enumerate(self._plan):
            if j >= self.depth:
                break
            if entry[2] is None:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="kdpipe-render")
                entry[2] = self._pool.submit(self.render, entry[1])


class DeviceViewSource(ViewSource):
    """ViewSource for a GPU: each batch of views is rendered on `device` (resample_batch: the box resampled
    with Pillow's exact integer arithmetic, then the flip and, for mixed views, views.blend's float32
    rounding), from the decode-once originals (the batch's source images are uploaded as it is rendered).
    Bit-equal to views.render_mixed, so to the teacher's pixels at its size (tests/unit/test_pixels.py, on CPU).
    `take` returns a uint8 tensor on the device; rendering runs on the device's stream, so nothing is planned
    ahead. Filters: FILTERS (bilinear, bicubic, box); others render on the CPU (ViewSource)."""

    def __init__(self, array: Callable[[int], np.ndarray], boxes, flips, size, resample, device: torch.device,
                 mixes: views.Mixes | None = None):
        if int(resample) not in FILTERS:
            raise ValueError(f"resample {resample} has no device renderer; use ViewSource")
        super().__init__(lambda i: Image.fromarray(array(i)), boxes, flips, size, resample, mixes, threads=1)
        self.array, self.device = array, device

    def plan(self, batches) -> None:
        pass

    def take(self, rows) -> torch.Tensor:
        return self.render_on_device(rows)

    def render_on_device(self, rows) -> torch.Tensor:
        rows = np.asarray(rows, np.int64).reshape(-1)
        images = [self.array(self.layout.image(int(r))) for r in rows]
        out = _flip_rows(resample_batch(images, self.boxes[rows], self.size, self.resample, self.device),
                         self.flips[rows], self.device)
        if self.mixes is None:
            return out
        mixed = np.flatnonzero(self.mixes.weights[rows] > 0)
        if len(mixed):
            m = rows[mixed]
            partner = _flip_rows(resample_batch([self.array(int(j)) for j in self.mixes.partners[m]],
                                                self.mixes.boxes[m], self.size, self.resample, self.device),
                                 self.mixes.flips[m], self.device)
            w = torch.from_numpy(np.asarray(self.mixes.weights[m], np.float32)).to(self.device).view(-1, 1, 1, 1)
            blend = out[mixed].float() * (1 - w) + partner.float() * w  # views.blend, in float32
            out[torch.from_numpy(mixed).to(self.device)] = torch.round(blend).to(torch.uint8)  # rint: half to even
        return out


def _flip_rows(batch: torch.Tensor, flips: np.ndarray, device) -> torch.Tensor:
    flip = torch.from_numpy(np.asarray(flips, bool)).to(device)
    return torch.where(flip[:, None, None, None], batch.flip(2), batch)
