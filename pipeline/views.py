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

Mixed views (`ViewPolicy.mixup` > 0) are mixup (Zhang et al. 2018) done before the teacher runs: a view
is blended with a view of another image of the split, and the teacher's logits are those of the blend,
so the student is matched to the teacher's answer on the very image it sees ("function matching",
Beyer et al. 2022), not to a mixture of two answers. The partner, its box and flip and the blend weight
are stored with the view (Mixes) and replayed like the box.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .errors import KdpipeError
from .settings import pair, setting


@dataclass(frozen=True)
class ViewPolicy:
    """How random views are drawn. Defaults: torchvision's RandomResizedCrop ratio range and a milder
    area range than its (0.08, 1), since Beans' lesions are small details of a leaf; flip with p = 0.5."""
    scale: tuple[float, float] = setting((0.25, 1.0), "Random-resized-crop area range, as fractions of the image.",
                                         flags=("--view-scale",), shown="0.25,1", parse=pair, panel="Views")
    ratio: tuple[float, float] = setting((3 / 4, 4 / 3), "Random-resized-crop aspect-ratio range (width / height).",
                                         flags=("--view-ratio",), shown="3/4,4/3", parse=pair, panel="Views")
    flip: float = setting(0.5, "Probability of a horizontal flip per view.", flags=("--view-flip",), panel="Views")
    seed: int = setting(0, "Seed of the views (a view is a function of seed, image id, index).",
                        flags=("--view-seed",), panel="Views")
    mixup: float = setting(0.0, "Blend views with another image's view, share ~ Beta(a, a), before the teacher sees "
                                "them (0 = off).", flags=("--view-mixup",), panel="Views")
    # half the views stay single images
    mixup_p: float = setting(0.5, "With --view-mixup: probability that an augmented view is blended.",
                             flags=("--view-mixup-p",), panel="Views")

    def __post_init__(self):
        for flag, values in (("--view-scale", self.scale), ("--view-ratio", self.ratio), ("--view-flip", (self.flip,)),
                             ("--view-mixup", (self.mixup,)), ("--view-mixup-p", (self.mixup_p,))):
            if not all(math.isfinite(v) for v in values):
                raise KdpipeError(f"{flag} must be finite numbers (got {', '.join(map(str, values))})")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise KdpipeError(f"--view-scale must be two fractions 0 < min <= max <= 1 (got {lo}, {hi})")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise KdpipeError(f"--view-ratio must be two ratios 0 < min <= max (got {lo}, {hi})")
        if not 0 <= self.flip <= 1:
            raise KdpipeError(f"--view-flip must be a probability in [0, 1] (got {self.flip})")
        if self.mixup < 0:
            raise KdpipeError(f"--view-mixup must be >= 0, the Beta(a, a) parameter; 0 turns it off (got {self.mixup})")
        if not 0 <= self.mixup_p <= 1:
            raise KdpipeError(f"--view-mixup-p must be a probability in [0, 1] (got {self.mixup_p})")

    def to_dict(self) -> dict:
        """As stored in a cache's metadata; without the mixup fields when there is no mixing, so a cache
        made before mixed views existed keeps its reuse key."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not self.mixup:
            del fields["mixup"], fields["mixup_p"]
            return {"kind": "random-resized-crop+hflip", **fields}
        return {"kind": "random-resized-crop+hflip+mixup", **fields}


@dataclass(frozen=True)
class ViewRows:
    """Where views sit among a split's rows, the one place this arithmetic lives: image i's view v is row
    i * per_image + v, image by image. View 0 is the image itself and views 1..K its augmented views, so
    per_image = V = K + 1 (cache-teacher --views K; the cache metadata's "views"); a split without views has
    V = 1 and row = image. Works on ints, numpy arrays and tensors alike."""
    images: int  # N
    per_image: int = 1  # V

    def __len__(self) -> int:
        return self.images * self.per_image

    def row(self, image, view=0):
        return image * self.per_image + view

    def image(self, row):
        return row // self.per_image

    def view(self, row):
        return row % self.per_image

    def grid(self, per_row: np.ndarray) -> np.ndarray:
        """Per-row values (N * V, ...) -> (N, V, ...)."""
        return np.asarray(per_row).reshape(self.images, self.per_image, *np.shape(per_row)[1:])


@dataclass(frozen=True)
class Mixes:
    """What each view is blended with (ViewPolicy.mixup), one entry per view row: the partner image (its
    id in the cache; its index in the split while sampling), the partner's crop box and flip, and the
    partner's share `weight` of the blend (0 = a single image: view 0 and unmixed views)."""
    partners: np.ndarray  # (R,) str ids ("" when not mixed), or int64 split indices (-1) while sampling
    boxes: np.ndarray  # (R, 4) float32, in the partner's source pixels
    flips: np.ndarray  # (R,) bool
    weights: np.ndarray  # (R,) float32

    def take(self, rows) -> "Mixes":
        return Mixes(self.partners[rows], self.boxes[rows], self.flips[rows], self.weights[rows])


def sample(policy: ViewPolicy, image_id: str, width: int, height: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (k + 1, 4) float32 and flips (k + 1,) bool for one image; row 0 is the whole image."""
    boxes = np.empty((k + 1, 4), dtype=np.float32)
    flips = np.zeros(k + 1, dtype=bool)
    boxes[0] = (0, 0, width, height)
    for v in range(1, k + 1):
        rng = _rng(policy.seed, image_id, v)
        boxes[v] = _random_resized_crop(rng, width, height, policy.scale, policy.ratio)
        flips[v] = rng.random() < policy.flip
    return boxes, flips


def sample_mixes(policy: ViewPolicy, ids: list[str], i: int, k: int, size_of) -> Mixes:
    """What views 1..k of image i (of the split whose ids are `ids`) are blended with: with probability
    mixup_p a partner drawn uniformly among the split's other images, a random-resized crop and flip of it
    (`size_of(j)` gives image j's (width, height)), and its share ~ Beta(mixup, mixup), stored as float32.
    A pure function of (seed, ids, i, view index), like `sample`. Partners are split indices here."""
    mixes = Mixes(np.full(k + 1, -1, np.int64), np.zeros((k + 1, 4), np.float32), np.zeros(k + 1, bool),
                  np.zeros(k + 1, np.float32))
    if not policy.mixup or len(ids) < 2:
        return mixes
    for v in range(1, k + 1):
        rng = _rng(policy.seed, ids[i], v, "mix")
        if rng.random() >= policy.mixup_p:
            continue
        j = int(rng.integers(len(ids) - 1))
        j += j >= i  # any image but this one
        mixes.partners[v], mixes.weights[v] = j, rng.beta(policy.mixup, policy.mixup)
        mixes.boxes[v] = _random_resized_crop(rng, *size_of(j), policy.scale, policy.ratio)
        mixes.flips[v] = rng.random() < policy.flip
    return mixes


def _rng(seed: int, image_id: str, v: int, purpose: str = "") -> np.random.Generator:
    key = f"{seed}\0{image_id}\0{v}" + (f"\0{purpose}" if purpose else "")  # "" keeps the views drawn before mixing
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


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


def render_mixed(image: Image.Image, box, flip: bool, size: tuple[int, int], resample: int,
                 mix: tuple | None = None) -> np.ndarray:
    """`render`, then blended with `mix` = (partner image, its box, its flip, its share) when it is given
    and the share is not 0."""
    own = render(image, box, flip, size, resample)
    if mix is None or not mix[3]:
        return own
    partner, partner_box, partner_flip, weight = mix
    return blend(own, render(partner, partner_box, partner_flip, size, resample), weight)


def blend(own: np.ndarray, partner: np.ndarray, weight: float) -> np.ndarray:
    """A mixed view as uint8 (H, W, 3): round((1 - weight) * own + weight * partner), in float32, so the
    teacher (at caching) and the student (pixels.load_or_build_views) get the same bytes."""
    w = np.float32(weight)
    out = own.astype(np.float32) * (np.float32(1) - w) + partner.astype(np.float32) * w
    return np.rint(out).astype(np.uint8)


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


def processor_pixels(u8: np.ndarray, mean, std) -> np.ndarray:
    """One view as the teacher processor feeds it: (H, W, 3) uint8 -> (3, H, W) float32, x / 255, then
    (x - mean) / std (pixels.normalise does the same to a batch on the device)."""
    x = u8.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def epoch_views(n: int, views: int, epoch: int, seed: int) -> np.ndarray:
    """Which stored view (0..views-1) each of n images uses in `epoch`: every image walks through its own
    random permutation of all views, so no view repeats before all were used (a new permutation every
    `views` epochs). A pure function of (seed, epoch): resuming a run needs no saved state."""
    cycle, step = divmod(epoch, views)
    rng = np.random.default_rng([seed, cycle, 7919])
    return rng.permuted(np.tile(np.arange(views), (n, 1)), axis=1)[:, step]
