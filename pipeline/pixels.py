"""Decode once: every image of a split, resized to the student's resolution, stored as uint8 (N, H, W, 3).

Training then never touches JPEG: a batch is a slice of this array, converted to float and normalised
on the device. The store is keyed by the split's content fingerprint, the size and the resampling
filter, so any change of data or resolution builds a new one. Resizing uses the teacher processor's
filter on the same decoded RGB image, so with the teacher's size the student sees exactly the teacher's
pixels (docs/cache-format.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import views
from .data import Split
from .errors import KdpipeError

DEFAULT_ROOT = Path("data") / "pixels"


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
        return [views.render_mixed(image, boxes[i, k], bool(flips[i, k]), size, resample, mix(i * v + k))
                for k in range(v)]

    return _store(root, split, key, f"{split.name}.views{v}", n * v, size, render_all, progress,
                  {"resample": resample, "views": v, "mixed": mixes is not None})


def _store(root: Path, split: Split, key: str, name: str, rows: int, size: tuple[int, int], build_rows, progress,
           extra: dict) -> np.ndarray:
    """Open `<root>/<key>/<name>.npy` as a memory map, or build it: rows come from build_rows(image index)
    (a list per image), written into a temporary memory map that is renamed when complete."""
    folder = Path(root) / key
    path = folder / f"{name}.npy"
    if path.exists():
        meta = json.loads((folder / f"{name}.json").read_text())
        if meta.get("ids") == split.ids:
            return np.load(path, mmap_mode="c")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.npy.tmp-{os.getpid()}"
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(rows, size[0], size[1], 3))
        per_image = rows // len(split)
        for i in range(len(split)):
            arr[i * per_image:(i + 1) * per_image] = np.stack(build_rows(i))
            if progress and ((i + 1) % 64 == 0 or i + 1 == len(split)):
                progress(f"decode {split.name}", i + 1, len(split))
        arr.flush()
        del arr
        (folder / f"{name}.json").write_text(json.dumps(
            {"split": split.name, "fingerprint": split.fingerprint(), "size": list(size), **extra, "ids": split.ids}))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KdpipeError(f"cannot write the pixel store {path}: {e.strerror or e}; free space") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return np.load(path, mmap_mode="c")


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
