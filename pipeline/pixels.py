"""Decode once: every image of a split, resized to the student's resolution, stored as uint8 (N, H, W, 3).

Training then never touches JPEG: a batch is a slice of this array, converted to float and normalised
on the device. The store is keyed by the split's content fingerprint, the size and the resampling
filter, so any change of data or resolution builds a new one. Resizing uses the teacher processor's
filter on the same decoded RGB image, so with the teacher's size the student sees exactly the teacher's
pixels (docs/cache-format.md).

Stored views (cache-teacher --views K) are not stored as pixels: the split's images are decoded once at
their source resolution (`load_or_build_originals`, capped at ORIGINALS_MAX_BYTES) and each view is
rendered when a batch needs it (`ViewSource`, on background threads) with the function stage one used,
views.render_mixed, so K costs only the cache's view parameters (docs/views.md).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import math
import os
import shutil
import threading
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import files, views
from .data import Split
from .errors import KdpipeError

DEFAULT_ROOT = Path("data") / "pixels"
ORIGINALS_MAX_BYTES = 64 << 30  # one split's decode-once originals at most (and at most half the free disk)


def store_key(fingerprint: str, size: tuple[int, int], resample: int) -> str:
    return hashlib.sha256(f"{fingerprint}|{size[0]}x{size[1]}|{resample}".encode()).hexdigest()[:20]


def decode_resized(split: Split, i: int, size: tuple[int, int], resample: int) -> np.ndarray:
    """One image as uint8 (H, W, 3), resized with PIL exactly as a transformers PIL processor does."""
    image = split.image(i)
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), resample=Image.Resampling(resample))
    return np.asarray(image, dtype=np.uint8)


def load_or_build(split: Split, size: tuple[int, int], resample: int = 2, root: Path = DEFAULT_ROOT,
                  progress=None) -> np.ndarray:
    """The split's pixels as a copy-on-write memory map (N, H, W, 3) uint8, building the store if needed."""
    return _store(root, split, store_key(split.fingerprint(), size, resample), split.name, len(split), size,
                  lambda i: [decode_resized(split, i, size, resample)], progress, {"resample": resample})


def load_or_build_views(split: Split, size: tuple[int, int], resample: int, boxes: np.ndarray, flips: np.ndarray,
                        root: Path = DEFAULT_ROOT, progress=None, mixes: views.Mixes | None = None) -> np.ndarray:
    """Stored views rendered for the student (views.render, decoding each image once): (N * V, H, W, 3)
    uint8, row i * V + v = view v of image i; keyed also by the view parameters (boxes (N, V, 4), flips
    (N, V)). Mixed views (`mixes`, rows i * V + v, partners as split indices) are blended as the teacher's
    were (views.render_mixed)."""
    n, v = flips.shape
    layout = views.ViewRows(n, v)
    params = hashlib.sha256(np.ascontiguousarray(boxes, np.float32).tobytes() + np.asarray(flips, bool).tobytes())
    if mixes is not None:
        for a in (np.asarray(mixes.partners, np.int64), np.asarray(mixes.boxes, np.float32),
                  np.asarray(mixes.flips, bool), np.asarray(mixes.weights, np.float32)):
            params.update(np.ascontiguousarray(a).tobytes())
    key = store_key(split.fingerprint(), size, resample) + "-views-" + params.hexdigest()[:16]

    def mix(row: int) -> tuple | None:
        if mixes is None or not mixes.weights[row]:
            return None
        return (split.image(int(mixes.partners[row])), mixes.boxes[row], bool(mixes.flips[row]), mixes.weights[row])

    def render_all(i: int) -> list[np.ndarray]:
        image = split.image(i)
        return [views.render_mixed(image, boxes[i, k], bool(flips[i, k]), size, resample, mix(layout.row(i, k)))
                for k in range(v)]

    return _store(root, split, key, f"{split.name}.views{v}", len(layout), size, render_all, progress,
                  {"resample": resample, "views": v, "mixed": mixes is not None})


def _store(root: Path, split: Split, key: str, name: str, rows: int, size: tuple[int, int], build_rows, progress,
           extra: dict) -> np.ndarray:
    """Open `<root>/<key>/<name>.npy` as a memory map, or build it: rows come from build_rows(image index)
    (a list per image), written into a temporary memory map that is renamed when complete. A store found
    damaged (its JSON unreadable, the array cut short or of another shape) is built again: it is derived data."""
    folder = Path(root) / key
    path = folder / f"{name}.npy"
    meta = _read_json(folder / f"{name}.json") if path.exists() else None
    if meta is not None and meta.get("ids") == split.ids:
        try:
            arr = np.load(path, mmap_mode="c")
            if arr.shape == (rows, size[0], size[1], 3) and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):  # e.g. "mmap length is greater than file size": cut short
            pass
    folder.mkdir(parents=True, exist_ok=True)
    tmp = files.temporary(path)
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(rows, size[0], size[1], 3))
        per_image = rows // len(split)
        for i in range(len(split)):
            arr[i * per_image:(i + 1) * per_image] = np.stack(build_rows(i))
            if progress and ((i + 1) % 64 == 0 or i + 1 == len(split)):
                progress(f"decode {split.name}", i + 1, len(split))
        arr.flush()
        del arr
        _write_json(folder / f"{name}.json",
                    {"split": split.name, "fingerprint": split.fingerprint(), "size": list(size), **extra, "ids": split.ids})
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KdpipeError(f"cannot write the pixel store {path}: {e.strerror or e}; free space") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return np.load(path, mmap_mode="c")


class Originals:
    """A split's images decoded once (data.Split.image: RGB, EXIF orientation applied) at their source
    resolution: uint8 pixels back to back in one read-only memory-mapped file, image i being the
    h_i * w_i * 3 bytes from offset_i, row by row (index: (N, 3) int64 offset, height, width). The OS pages
    it in and out, so memory does not grow with the dataset."""

    def __init__(self, data: np.ndarray, index: np.ndarray):
        self.data, self.index = data, index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def array(self, i: int) -> np.ndarray:
        """Image i as a (H, W, 3) uint8 view of the memory map."""
        offset, h, w = (int(x) for x in self.index[i])
        return np.asarray(self.data[offset:offset + h * w * 3]).reshape(h, w, 3)

    def image(self, i: int) -> Image.Image:
        """Image i as a PIL RGB image: the very pixels Split.image(i) decodes to (PIL keeps its own copy)."""
        return Image.fromarray(self.array(i))


def originals_key(fingerprint: str) -> str:
    return hashlib.sha256(f"{fingerprint}|originals".encode()).hexdigest()[:20]


def load_or_build_originals(split: Split, root: Path = DEFAULT_ROOT, progress=None,
                            max_bytes: int | None = None) -> Originals | None:
    """The split's decode-once originals, building the store if needed: in `<root>/<originals_key>/`,
    `<split>.originals.u8` (the pixels), `.npy` (the index) and `.json` (ids, bytes), each written under a
    temporary name and renamed, the JSON last, so a store is complete or absent. Capped: None when the
    pixels would exceed min(`max_bytes` or ORIGINALS_MAX_BYTES, half the disk space free when the build
    starts); the caller then decodes each image when a view of it is rendered (the same pixels, more CPU),
    and a marker keeps later runs from decoding the split again to find that out."""
    folder = Path(root) / originals_key(split.fingerprint())
    name = f"{split.name}.originals"
    data_path, index_path, meta_path = folder / f"{name}.u8", folder / f"{name}.npy", folder / f"{name}.json"
    cap = max_bytes or ORIGINALS_MAX_BYTES
    meta = _read_json(meta_path)
    if meta is not None and meta.get("ids") == split.ids:
        if meta.get("over_cap"):
            if meta["bytes_at_least"] > cap:
                return None
        elif data_path.exists() and data_path.stat().st_size == meta["bytes"] and index_path.exists():
            return _open_originals(data_path, index_path, meta["bytes"])
    folder.mkdir(parents=True, exist_ok=True)
    _sweep_dead_temporaries(folder, name)
    cap = min(cap, shutil.disk_usage(folder).free // 2)
    return _build_originals(split, data_path, index_path, meta_path, cap, progress)


def _build_originals(split: Split, data_path: Path, index_path: Path, meta_path: Path, cap: int,
                     progress=None) -> Originals | None:
    """Decode every image of the split once into one uint8 file and its (N, 3) index of (offset, H, W); on
    going over `cap`, drop the pixels and write the over-cap marker instead (returns None)."""
    tmp_data, tmp_index = files.temporary(data_path), files.temporary(index_path)
    index = np.zeros((len(split), 3), np.int64)  # (N, 3): byte offset, height, width
    total = 0
    try:
        with open(tmp_data, "wb") as f:
            for i in range(len(split)):
                u8 = np.ascontiguousarray(split.image(i), dtype=np.uint8)  # (H, W, 3)
                if total + u8.nbytes > cap:  # over the cap: views will decode their image when rendered
                    tmp_data.unlink(missing_ok=True)
                    _write_json(meta_path, {"split": split.name, "fingerprint": split.fingerprint(), "ids": split.ids,
                                            "over_cap": True, "bytes_at_least": total + u8.nbytes, "cap": cap})
                    return None
                index[i] = total, u8.shape[0], u8.shape[1]
                f.write(u8.tobytes())
                total += u8.nbytes
                if progress and ((i + 1) % 64 == 0 or i + 1 == len(split)):
                    progress(f"decode {split.name}", i + 1, len(split))
        with open(tmp_index, "wb") as f:
            np.save(f, index)
        os.replace(tmp_data, data_path)
        os.replace(tmp_index, index_path)
        _write_json(meta_path, {"split": split.name, "fingerprint": split.fingerprint(), "bytes": total,
                                "ids": split.ids})
    except OSError as e:
        tmp_data.unlink(missing_ok=True)
        tmp_index.unlink(missing_ok=True)
        raise KdpipeError(f"cannot write the originals store {data_path}: {e.strerror or e}; free space") from None
    except BaseException:
        tmp_data.unlink(missing_ok=True)
        tmp_index.unlink(missing_ok=True)
        raise
    return _open_originals(data_path, index_path, total)


def _open_originals(data_path: Path, index_path: Path, nbytes: int) -> Originals:
    data = np.memmap(data_path, np.uint8, "r") if nbytes else np.zeros(0, np.uint8)  # mmap refuses 0 bytes
    return Originals(data, np.load(index_path, allow_pickle=False))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict) -> None:
    files.write_text(path, json.dumps(value))


def _sweep_dead_temporaries(folder: Path, name: str) -> None:
    """Remove `.<name>.*.tmp-<pid>` files whose writer is gone (killed mid-build; they can be large)."""
    for stale in folder.glob(f".{name}.*.tmp-*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except (ValueError, PermissionError):  # not ours to judge
            pass


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


# ------------------------------------------------------------------------ rendering in batches on a device

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling: 32 - 8 - 2 bits (libImaging/Resample.c)


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)  # Keys' cubic convolution with a = -0.5, as Pillow writes it
    inner = (1.5 * x - 2.5) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


# resample code -> (filter, support): those whose arithmetic numpy reproduces exactly (no libm calls)
FILTERS = {2: (lambda x: np.where(np.abs(x) < 1.0, 1.0 - np.abs(x), 0.0), 1.0),  # BILINEAR
           3: (_bicubic, 2.0),  # BICUBIC
           4: (lambda x: np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0), 0.5)}  # BOX


def resample_weights(in_size: int, in0: float, in1: float, out_size: int,
                     resample: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's weights for resampling [in0, in1) of an axis of `in_size` pixels to `out_size`, computed as
    its C code does (Resample.c: precompute_coeffs, normalize_coeffs_8bpc), in the same float64 operations
    in the same order: scale = (in1 - in0) / out_size (the box in float32, subtracted in float32), support =
    filter support * max(scale, 1); output pixel i, centred at c = in0 + (i + 0.5) * scale, takes input pixels
    xmin .. xmax - 1, xmin = trunc(c - support + 0.5) >= 0, xmax = trunc(c + support + 0.5) <= in_size, with
    weights filter((x - c + 0.5) / max(scale, 1)) normalised to sum 1, then rounded to integers in units of
    2^-22 (away from zero). Returns xmin (out,) int64 and the integer weights (out, ksize) int64, 0 past each
    pixel's xmax."""
    fn, base = FILTERS[resample]
    in0, in1 = np.float32(in0), np.float32(in1)  # Pillow takes the box as C floats ...
    scale = filterscale = float(in1 - in0) / out_size  # ... and subtracts them as floats
    in0 = float(in0)
    filterscale = max(filterscale, 1.0)
    support = base * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = in0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    k = np.zeros((out_size, ksize))
    ww = np.zeros(out_size)
    for t in range(ksize):  # tap by tap, so each sum is accumulated in Pillow's order
        w = np.where(t < xmax, fn(((t + xmin) - center + 0.5) * ss), 0.0)
        k[:, t] = w
        ww = ww + w
    k = np.divide(k, ww[:, None], out=k.copy(), where=ww[:, None] != 0.0)
    scaled = k * float(1 << PRECISION_BITS)
    return xmin, np.where(k < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)


def _weight_matrix(starts: list[np.ndarray], weights: list[np.ndarray], in_max: int, device) -> torch.Tensor:
    """(B, out, in_max) float64 dense weights from each view's (xmin, integer weights)."""
    b, out = len(starts), len(starts[0])
    ksize = max(w.shape[1] for w in weights)
    idx = np.zeros((b, out, ksize), np.int64)
    val = np.zeros((b, out, ksize), np.float64)
    for j, (x0, w) in enumerate(zip(starts, weights)):
        idx[j, :, :w.shape[1]] = np.minimum(x0[:, None] + np.arange(w.shape[1]), in_max - 1)  # weight 0 past xmax
        val[j, :, :w.shape[1]] = w
    dense = torch.zeros(b, out, in_max, dtype=torch.float64, device=device)
    return dense.scatter_add_(2, torch.from_numpy(idx).to(device), torch.from_numpy(val).to(device))


def resample_batch(images: list[np.ndarray], boxes: np.ndarray, size: tuple[int, int], resample: int,
                   device: torch.device) -> torch.Tensor:
    """PIL's `image.resize((W, H), resample, box=box)` for a batch of uint8 (h_i, w_i, 3) images, on `device`,
    bit for bit: two passes of integer weights (resample_weights), each output pixel of a pass
    floor((2^21 + sum_t pixel * weight) / 2^22) clipped to [0, 255], as Pillow's 8-bit fixed point computes
    it, in Pillow's order of the passes (vertical_first). The sums are matrix products in float64, exact for
    these integers (all below 2^53) whatever the summation order. Returns (B, H, W, 3) uint8 on `device`."""
    first = np.array([vertical_first(a.shape[0], a.shape[1], size) for a in images])
    out = torch.empty((len(images), size[0], size[1], 3), dtype=torch.uint8, device=device)
    for flag in (False, True):
        sel = np.flatnonzero(first == flag)
        if len(sel):
            out[torch.from_numpy(sel).to(device)] = _resample_group([images[j] for j in sel], boxes[sel], size,
                                                                    resample, device, flag)
    return out


def _resample_group(images, boxes, size, resample, device, vertical: bool) -> torch.Tensor:
    hmax, wmax = max(a.shape[0] for a in images), max(a.shape[1] for a in images)
    src = np.zeros((len(images), hmax, wmax, 3), np.uint8)
    for j, a in enumerate(images):
        src[j, :a.shape[0], :a.shape[1]] = a  # padding: outside every view's weights
    wx = _weight_matrix(*zip(*[resample_weights(a.shape[1], b[0], b[2], size[1], resample)
                               for a, b in zip(images, boxes)]), wmax, device)  # (B, W, w)
    wy = _weight_matrix(*zip(*[resample_weights(a.shape[0], b[1], b[3], size[0], resample)
                               for a, b in zip(images, boxes)]), hmax, device)  # (B, H, h)
    half, unit = float(1 << (PRECISION_BITS - 1)), float(1 << PRECISION_BITS)

    def fixed(x: torch.Tensor) -> torch.Tensor:  # Pillow's clip8((2^21 + sum) >> 22)
        return torch.div(x + half, unit, rounding_mode="floor").clamp_(0, 255)

    x = torch.from_numpy(src).to(device).double()  # (B, h, w, 3)
    if vertical:
        x = fixed(torch.einsum("bhwc,bph->bpwc", x, wy))  # (B, H, w, 3)
        x = fixed(torch.einsum("bpwc,bow->bpoc", x, wx))
    else:
        x = fixed(torch.einsum("bhwc,bow->bhoc", x, wx))  # (B, h, W, 3)
        x = fixed(torch.einsum("bhoc,bph->bpoc", x, wy))
    return x.to(torch.uint8)


@functools.lru_cache(maxsize=1)
def _pillow_vertical_first() -> bool:
    """Whether this Pillow may run the vertical pass first (Pillow 13, python-pillow/Pillow#9549; earlier
    ones always run the horizontal pass first): asked of Pillow itself, on an image whose two orders differ."""
    a = np.random.default_rng(0).integers(0, 256, (63, 29, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(a).resize((32, 32), resample=Image.Resampling.BICUBIC))
    cpu = torch.device("cpu")
    return bool((_resample_group([a], np.array([[0, 0, 29, 63]], np.float32), (32, 32), 3, cpu, True).numpy()[0]
                 == ref).all())


def vertical_first(height: int, width: int, size: tuple[int, int]) -> bool:
    """Pillow's order of the passes for an image of height x width resized to `size` (H, W), whatever the
    box: vertical first when the height shrinks by more than twice what the width does,
    height > H and height - H > 2 * (width - W) (measured against Pillow 13.0 on 840 random cases,
    tests/test_render.py), on a Pillow that does so at all."""
    return _pillow_vertical_first() and height > size[0] and height - size[0] > 2 * (width - size[1])


class DeviceViewSource(ViewSource):
    """ViewSource for a GPU: each batch of views is rendered on `device` (resample_batch: the box resampled
    with Pillow's exact integer arithmetic, then the flip and, for mixed views, views.blend's float32
    rounding), from the decode-once originals (the batch's source images are uploaded as it is rendered).
    Bit-equal to views.render_mixed, so to the teacher's pixels at its size (tests/test_render.py, on CPU).
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


def as_tensor(pixels: np.ndarray, device: torch.device, headroom: float = 0.5) -> torch.Tensor:
    """The store as a uint8 tensor for batching. On a GPU, the whole store moves to device memory when it
    takes at most `headroom` of what is free there. Otherwise (and always on CPU) it stays a zero-copy view
    of the memory map: the OS pages it in and out, so memory does not grow with the dataset and a store
    larger than RAM still trains (batches are gathered on demand, then copied to the device)."""
    if fits_on_device(pixels.nbytes, device, headroom):
        return torch.from_numpy(np.asarray(pixels)).to(device)
    return torch.from_numpy(pixels)


def fits_on_device(nbytes: int, device: torch.device, headroom: float = 0.5) -> bool:
    """Whether a store of `nbytes` goes to device memory: only on a GPU, and only while it takes at most
    `headroom` of the memory free there now (each split is asked in turn, so train, validation and test
    together stay under 1 - (1 - headroom)^3 of it; the student and its activations need the rest)."""
    return device.type == "cuda" and nbytes <= headroom * torch.cuda.mem_get_info(device)[0]


def normalise(batch_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in channels_last, as the processor computes it:
    x / 255, then (x - mean) / std."""
    x = batch_u8.permute(0, 3, 1, 2).float()  # NHWC memory seen as NCHW = channels_last, no copy
    return x.div_(255.0).sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))
