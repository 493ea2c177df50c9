"""Augmented views with a consistent teacher: sample, store and replay them exactly.

A view is a crop box in source-image pixel coordinates (x0, y0, x1, y1) and a horizontal flip. Stage one
samples K random views per training image (random-resized-crop + flip), renders each, runs the teacher
on it and stores the parameters next to the logits; stage two renders the very same views for the
student with `render`, so teacher and student see the same pixels ("A good teacher is patient and
consistent", Beyer et al. 2022; FKD, Shen & Xing 2022, stores crops the same way). View 0 is always
the whole image, unflipped: the un-augmented input of a cache without views.

Rendering is one PIL call, `image.resize(size, resample, box=box)`, which resamples the box straight to
the output size (no intermediate crop), then the flip; so a view is fully determined by (image, box,
flip, size, filter), and the student at the teacher's resolution gets exactly the teacher's pixels.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .errors import KdpipeError


@dataclass(frozen=True)
class ViewPolicy:
    """How random views are drawn. Defaults: torchvision's RandomResizedCrop ratio range and a milder
    area range than its (0.08, 1), since Beans' lesions are small details of a leaf; flip with p = 0.5."""
    scale: tuple[float, float] = (0.25, 1.0)  # crop area as a fraction of the image's
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    flip: float = 0.5  # probability of a horizontal flip
    seed: int = 0  # views are a pure function of (seed, image id, view index)

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise KdpipeError(f"--view-scale must be two fractions 0 < min <= max <= 1 (got {lo}, {hi})")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise KdpipeError(f"--view-ratio must be two ratios 0 < min <= max (got {lo}, {hi})")
        if not 0 <= self.flip <= 1:
            raise KdpipeError(f"--view-flip must be a probability in [0, 1] (got {self.flip})")

    def to_dict(self) -> dict:
        return {"kind": "random-resized-crop+hflip", **{k: list(v) if isinstance(v, tuple) else v
                                                       for k, v in asdict(self).items()}}


def sample(policy: ViewPolicy, image_id: str, width: int, height: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (k + 1, 4) float32 and flips (k + 1,) bool for one image; row 0 is the whole image."""
    boxes = np.empty((k + 1, 4), dtype=np.float32)
    flips = np.zeros(k + 1, dtype=bool)
    boxes[0] = (0, 0, width, height)
    for v in range(1, k + 1):
        digest = hashlib.sha256(f"{policy.seed}\0{image_id}\0{v}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        boxes[v] = _random_resized_crop(rng, width, height, policy.scale, policy.ratio)
        flips[v] = rng.random() < policy.flip
    return boxes, flips


def _random_resized_crop(rng, width: int, height: int, scale, ratio) -> tuple[float, float, float, float]:
    """A box of area fraction ~U(scale) and aspect ratio log-uniform in `ratio`, placed uniformly; after 10
    misses (box larger than the image), the largest centred box whose ratio is clamped into `ratio`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return x0, y0, x0 + w, y0 + h
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, width / aspect) if width / height <= aspect else (height * aspect, height)
    x0, y0 = (width - w) / 2, (height - h) / 2
    return x0, y0, x0 + w, y0 + h


def render(image: Image.Image, box, flip: bool, size: tuple[int, int], resample: int) -> np.ndarray:
    """The view as uint8 (H, W, 3): the box resampled to `size` (H, W) with `resample`, then flipped."""
    box = tuple(float(c) for c in box)
    out = image.resize((size[1], size[0]), resample=Image.Resampling(resample), box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def processor_inputs(processor: dict, where: str) -> dict:
    """size (H, W), resample, mean, std of a teacher processor, if views can be rendered for it exactly:
    resize to a fixed height x width, rescale by 1/255, normalise, no centre crop. Else a clear error."""
    size = processor.get("size") or {}
    problems = []
    if not ("height" in size and "width" in size):
        problems.append(f"its size {size} is not a fixed height x width")
    if processor.get("do_center_crop"):
        problems.append("it centre-crops")
    if processor.get("rescale_offset") or not math.isclose(processor.get("rescale_factor", 1 / 255), 1 / 255):
        problems.append("it rescales other than x / 255")
    if problems:
        raise KdpipeError(f"{where}: --views cannot replay this teacher's preprocessing exactly ({'; '.join(problems)})")
    return {"size": (int(size["height"]), int(size["width"])), "resample": int(processor.get("resample", 2)),
            "mean": list(processor.get("image_mean", [0.5] * 3)), "std": list(processor.get("image_std", [0.5] * 3))}


def normalise(u8: np.ndarray, mean, std) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32: x / 255, then (x - mean) / std (as pixels.normalise)."""
    x = u8.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def epoch_views(n: int, views: int, epoch: int, seed: int) -> np.ndarray:
    """Which stored view (0..views-1) each of n images uses in `epoch`: every image walks through its own
    random permutation of all views, so no view repeats before all were used (a new permutation every
    `views` epochs). A pure function of (seed, epoch): resuming a run needs no saved state."""
    cycle, step = divmod(epoch, views)
    rng = np.random.default_rng([seed, cycle, 7919])
    return rng.permuted(np.tile(np.arange(views), (n, 1)), axis=1)[:, step]
