"""Pillow's resize, replayed on a device: a batch of boxes of uint8 images resampled bit for bit as
`PIL.Image.resize(size, resample, box=box)` computes it, with its own integer weights (Resample.c), as
matrix products on any torch device (view_source.DeviceViewSource renders stored views with it on a GPU).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image

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
def pillow_vertical_first() -> bool:
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
    tests/unit/test_pixels.py), on a Pillow that does so at all."""
    return pillow_vertical_first() and height > size[0] and height - size[0] > 2 * (width - size[1])
