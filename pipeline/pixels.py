"""Decode once: every image of a split, resized to the student's resolution, stored as uint8 (N, H, W, 3).

Training then never touches JPEG: a batch is a slice of this array, converted to float and normalised
on the device. The store is keyed by the split's content fingerprint, the size and the resampling
filter, so any change of data or resolution builds a new one. Resizing uses the teacher processor's
filter on the same decoded RGB image, so with the teacher's size the student sees exactly the teacher's
pixels (docs/cache-format.md).

Stored views (cache-teacher --views K) are not stored as pixels: the split's images are decoded once at
their source resolution (`load_or_build_originals`, capped at ORIGINALS_MAX_BYTES) and each view is
rendered when a batch needs it (view_source.py), so K costs only the cache's view parameters (docs/views.md).
Every store file is written under a temporary name and renamed when complete (files.replacing).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

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
    path, meta_path = folder / f"{name}.npy", folder / f"{name}.json"
    found = _open_store(path, meta_path, split.ids, (rows, size[0], size[1], 3))
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with files.replacing(path) as tmp:
            _fill(tmp, split, rows, size, build_rows, progress)
            _write_json(meta_path, {"split": split.name, "fingerprint": split.fingerprint(), "size": list(size),
                                    **extra, "ids": split.ids})
    except OSError as e:
        raise KdpipeError(f"cannot write the pixel store {path}: {e.strerror or e}; free space") from None
    return np.load(path, mmap_mode="c")


def _open_store(path: Path, meta_path: Path, ids: list[str], shape: tuple) -> np.ndarray | None:
    """The store at `path` as a copy-on-write memory map, if it is there, intact, of `shape` and of these ids."""
    meta = _read_json(meta_path) if path.exists() else None
    if meta is None or meta.get("ids") != ids:
        return None
    try:
        arr = np.load(path, mmap_mode="c")
    except (OSError, ValueError):  # e.g. "mmap length is greater than file size": cut short
        return None
    return arr if arr.shape == shape and arr.dtype == np.uint8 else None


def _fill(tmp: Path, split: Split, rows: int, size: tuple[int, int], build_rows, progress) -> None:
    """A new .npy memory map at `tmp`, (rows, H, W, 3) uint8, filled image by image from build_rows."""
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(rows, size[0], size[1], 3))
    per_image = rows // len(split)
    for i in range(len(split)):
        arr[i * per_image:(i + 1) * per_image] = np.stack(build_rows(i))
        _decoded(progress, split, i)
    arr.flush()
    del arr  # the memory map closed before the file is renamed


def _decoded(progress, split: Split, i: int) -> None:
    """Report image i of the split decoded, every 64 images and at the last."""
    if progress and ((i + 1) % 64 == 0 or i + 1 == len(split)):
        progress(f"decode {split.name}", i + 1, len(split))


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
    files.remove_dead_temporaries(folder, f"{name}.*")
    cap = min(cap, shutil.disk_usage(folder).free // 2)
    return _build_originals(split, data_path, index_path, meta_path, cap, progress)


def _build_originals(split: Split, data_path: Path, index_path: Path, meta_path: Path, cap: int,
                     progress=None) -> Originals | None:
    """Decode every image of the split once into one uint8 file and its (N, 3) index of (offset, H, W), then
    write the JSON; on going over `cap`, keep no pixels and write the over-cap marker instead (returns None)."""
    try:
        meta = _write_originals(split, data_path, index_path, cap, progress)
        _write_json(meta_path, meta)  # last: the store is complete (or known to be over the cap) once it is there
    except OSError as e:
        raise KdpipeError(f"cannot write the originals store {data_path}: {e.strerror or e}; free space") from None
    return None if meta.get("over_cap") else _open_originals(data_path, index_path, meta["bytes"])


class _OverCap(Exception):
    """Raised while decoding the originals once they would exceed the cap, so that nothing is kept."""

    def __init__(self, bytes_at_least: int):
        super().__init__(bytes_at_least)
        self.bytes_at_least = bytes_at_least


def _write_originals(split: Split, data_path: Path, index_path: Path, cap: int, progress) -> dict:
    """The pixels and their index, each written under a temporary name and renamed when both are complete;
    returns the store's metadata, or the over-cap marker when the pixels would exceed `cap`."""
    try:
        with files.replacing(index_path) as tmp_index, files.replacing(data_path) as tmp_data:
            index, total = _decode_originals(split, tmp_data, cap, progress)
            with open(tmp_index, "wb") as f:
                np.save(f, index)
    except _OverCap as over:  # over the cap: views will decode their image when rendered
        return {"split": split.name, "fingerprint": split.fingerprint(), "ids": split.ids, "over_cap": True,
                "bytes_at_least": over.bytes_at_least, "cap": cap}
    return {"split": split.name, "fingerprint": split.fingerprint(), "bytes": total, "ids": split.ids}


def _decode_originals(split: Split, tmp_data: Path, cap: int, progress) -> tuple[np.ndarray, int]:
    """Each image as uint8 (H, W, 3) bytes, back to back into `tmp_data`: its index (N, 3) of (byte offset,
    height, width) and the total bytes; raises _OverCap as soon as the total would pass `cap`."""
    index = np.zeros((len(split), 3), np.int64)  # (N, 3): byte offset, height, width
    total = 0
    with open(tmp_data, "wb") as f:
        for i in range(len(split)):
            u8 = np.ascontiguousarray(split.image(i), dtype=np.uint8)  # (H, W, 3)
            if total + u8.nbytes > cap:
                raise _OverCap(total + u8.nbytes)
            index[i] = total, u8.shape[0], u8.shape[1]
            f.write(u8.tobytes())
            total += u8.nbytes
            _decoded(progress, split, i)
    return index, total


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
