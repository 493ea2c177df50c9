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
    key = store_key(split.fingerprint(), size, resample)
    folder = Path(root) / key
    path = folder / f"{split.name}.npy"
    if path.exists():
        meta = json.loads((folder / f"{split.name}.json").read_text())
        if meta.get("ids") == split.ids:
            return np.load(path, mmap_mode="c")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{split.name}.npy.tmp-{os.getpid()}"
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(split), size[0], size[1], 3))
        for i in range(len(split)):
            arr[i] = decode_resized(split, i, size, resample)
            if progress and ((i + 1) % 64 == 0 or i + 1 == len(split)):
                progress(f"decode {split.name}", i + 1, len(split))
        arr.flush()
        del arr
        (folder / f"{split.name}.json").write_text(json.dumps(
            {"split": split.name, "fingerprint": split.fingerprint(), "size": list(size), "resample": resample,
             "ids": split.ids}))
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
    larger than RAM still trains (batches are gathered on demand)."""
    if device.type == "cuda" and pixels.nbytes <= headroom * torch.cuda.mem_get_info(device)[0]:
        return torch.from_numpy(np.asarray(pixels)).to(device)
    return torch.from_numpy(pixels)


def normalise(batch_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in channels_last, as the processor computes it:
    x / 255, then (x - mean) / std."""
    x = batch_u8.permute(0, 3, 1, 2).float()  # NHWC memory seen as NCHW = channels_last, no copy
    return x.div_(255.0).sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))
