"""Mixup (Zhang et al., 2018, arXiv:1710.09412) and CutMix (Yun et al., 2019, arXiv:1905.04899) of a batch
with a permutation of itself, for train-student --mix.

The student sees x' = lam * x + (1 - lam) * x[perm] (mixup) or x with a box of x[perm] pasted in, lam being
the area kept (cutmix); its targets are mixed in the same proportion (loss.distillation_loss, `mix`). With a
cached teacher that is an approximation of function matching (Beyer et al., 2022): the teacher never saw the
mixed image, and a mixture of its two distributions stands in for its answer on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Mix:
    lam: float  # weight of the batch itself; 1 - lam goes to batch[perm]
    perm: torch.Tensor  # (B,) int64
    box: tuple[int, int, int, int] | None = None  # cutmix: (top, left, bottom, right), pixels from batch[perm]


def sample(kind: str, alpha: float, shape: torch.Size, generator: torch.Generator) -> Mix:
    """Draw one batch's mix: lam ~ Beta(alpha, alpha), a permutation, and for cutmix a box of area
    (1 - lam) * H * W centred uniformly and clipped to the image (lam is then the area really kept)."""
    b, _, h, w = shape  # (B, 3, H, W)
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(b, generator=generator)
    if kind == "mixup":
        return Mix(lam, perm)
    if kind != "cutmix":
        raise ValueError(f"unknown mix {kind!r}")
    side = math.sqrt(1.0 - lam)
    ch, cw = int(round(h * side)), int(round(w * side))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    top, bottom = max(cy - ch // 2, 0), min(cy + (ch - ch // 2), h)
    left, right = max(cx - cw // 2, 0), min(cx + (cw - cw // 2), w)
    return Mix(1.0 - (bottom - top) * (right - left) / (h * w), perm, (top, left, bottom, right))


def apply(x: torch.Tensor, mix: Mix) -> torch.Tensor:
    """The mixed batch (a new tensor; x is left as it is). x: (B, 3, H, W)."""
    perm = mix.perm.to(x.device)
    if mix.box is None:
        return x * mix.lam + x[perm] * (1.0 - mix.lam)
    top, left, bottom, right = mix.box
    out = x.clone()
    out[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]  # copies the box only
    return out
