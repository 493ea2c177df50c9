"""Stage two's data: the cache and the dataset opened and checked against each other, and each split held as
the student sees it (SplitData): uint8 pixels decoded once at the student's resolution (pixels.py), or, for
the split trained on views, a source that renders each stored view when used; labels; the teacher's logits
joined by id. Nothing here trains; train_student.setup calls `prepare`, which returns all of it (StudentData)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import logit_store, loss, pillow_resample, pixels, runtime, view_source, views
from .config import TrainConfig, recipe_line
from .data import ImageDataset, open_dataset, reopen_dataset
from .errors import KdpipeError
from .logit_store import TopK
from .student import MOBILENET_SIZE, image_size, student_config

DEFAULT_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # used only without a cache (alpha = 0): ViT's


@dataclass
class SplitData:
    name: str
    ids: list[str]
    pixels: torch.Tensor | None  # (N, H, W, 3) uint8, on the device when it fits; None with a `source`
    labels: torch.Tensor  # (N,) int64
    teacher_logits: torch.Tensor | TopK | None  # (N * V, C) float32, dataset label order; TopK: densified per batch
    per_image: int = 1  # V rows per image (views.ViewRows): with stored views, pixels and teacher rows i * V + v
    view_of: torch.Tensor | None = None  # (N,) the view each image uses this epoch (views.epoch_views)
    targets: torch.Tensor | None = None  # (N * V, C) float32 label distributions of mixed views, else None
    source: view_source.ViewSource | None = None  # renders rows i * V + v when used, instead of a pixel store

    def __len__(self):
        return len(self.ids)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The stored rows of images `idx` this epoch: i, or with views the row of view_of[i] (views.ViewRows)."""
        if self.per_image == 1:
            return idx
        return views.ViewRows(len(self), self.per_image).row(idx, self.view_of[idx.to(self.view_of.device)].to(idx.device))

    def plan(self, batches: list[torch.Tensor]) -> None:
        """With a `source`, start rendering these batches of images (in the order `batch` will ask for them)
        on its background threads; without one, nothing to do."""
        if self.source is not None:
            self.source.plan([self.rows(idx).cpu().numpy() for idx in batches])

    def batch(self, idx: torch.Tensor, device: torch.device) -> dict:
        """Images `idx` (B,): pixels (B, H, W, 3) uint8, labels (B,) (or (B, C) label distributions of mixed
        views), teacher_logits (B, C) of the same view."""
        rows = self.rows(idx)
        labels = (self.labels[idx.to(self.labels.device)] if self.targets is None
                  else self.targets[rows.to(self.targets.device)])
        u8 = (self.source.take(rows.cpu().numpy()) if self.source is not None
              else self.pixels[rows.to(self.pixels.device)])
        u8 = torch.from_numpy(u8) if isinstance(u8, np.ndarray) else u8  # a DeviceViewSource renders on the device
        out = {"pixels": u8, "labels": labels}
        if isinstance(self.teacher_logits, TopK):
            out["teacher_logits"] = torch.from_numpy(self.teacher_logits.take(rows.cpu().numpy()).dense())  # (B, C)
        elif self.teacher_logits is not None:
            out["teacher_logits"] = self.teacher_logits[rows.to(self.teacher_logits.device)]
        return runtime.to_device(out, device)


@dataclass
class StudentData:
    """Stage two's data for one run, as `prepare` returns it."""
    cache: dict | None  # split -> logit_store.LogitSplit; None for alpha 0 without one
    dataset: ImageDataset
    resolution: dict  # student_resolution: {"student_config", "size", "reason"}
    inputs: dict  # input_spec at the training size: size, resample, mean, std
    splits: dict[str, SplitData]  # the train split at the training size, validation and test at eval_size
    eval_size: tuple[int, int]  # --eval-size, else the training size
    sources: dict  # what the run reads, by content (inputs_identity)


class SharedData:
    """The opened cache and dataset and the device-resident pixels, kept for the next run in the same
    process (a sweep's trials differ in training settings, not in data): each is read once."""

    def __init__(self):
        self._items: dict[tuple, object] = {}

    def get(self, key: tuple, build: Callable[[], object]):
        if key not in self._items:
            self._items[key] = build()
        return self._items[key]


def prepare(cfg: TrainConfig, device: torch.device, shared: SharedData | None = None, progress=None,
            announce: Callable[[str], None] | None = None) -> StudentData:
    """Everything train_student.setup needs of the data, in one call: the cache and the dataset opened and checked
    (open_source), the student's resolution (student_resolution; `announce` hears the recipe, it and why) and its config
    checked before any data is decoded, the input statistics (input_spec), every split loaded on `device` (the
    train split at the student's size, validation and test at --eval-size when given), refused when the cache
    lacks the train split, an image changed since it was cached, or the targets do not fit the loss. `shared`
    lets a sweep's runs open, size and load the same data once."""
    shared = shared or SharedData()
    source = source_key(cfg)
    cache, dataset = shared.get(("source", *source), lambda: open_source(cfg))
    resolution = shared.get(("resolution", *source, cfg.student, json.dumps(cfg.student_config, sort_keys=True)),
                            lambda: student_resolution(cfg, cache, dataset))
    student_config(cfg.student, resolution["student_config"], dataset.label_names)  # refused before decoding
    if announce:
        announce(recipe_line(cfg))
        announce(f"student resolution {resolution['size'][0]} x {resolution['size'][1]} px: {resolution['reason']}")
        if cache is None:
            announce(NO_CACHE_NOTE)
    inputs = input_spec(tuple(resolution["size"]), cache)
    eval_size = (cfg.eval_size, cfg.eval_size) if cfg.eval_size else inputs["size"]
    sizes = {name: eval_size for name in (cfg.val_split, cfg.test_split) if name}
    view_split = cfg.train_split if cfg.views else None
    splits = shared.get(("splits", *source, inputs["size"], eval_size, inputs["resample"], str(device), view_split),
                        lambda: load_splits(cache, dataset, inputs, device, progress, view_split, sizes))
    require_train_split(cfg, cache)
    refuse_changed_images(cfg, dataset, changed_images(cache, dataset))
    if cfg.alpha > 0:
        train = splits[cfg.train_split]
        check_targets(cfg, train.teacher_logits, mixed=train.targets is not None)
    return StudentData(cache, dataset, resolution, inputs, dict(splits), eval_size, inputs_identity(cache, dataset))


def source_key(cfg: TrainConfig) -> tuple:
    """The settings that decide what open_source reads: runs that share them share its result."""
    return (str(cfg.cache), cfg.dataset, cfg.image_column, cfg.label_column, cfg.train_split, cfg.val_split,
            cfg.test_split)


def open_source(cfg: TrainConfig) -> tuple[dict | None, ImageDataset]:
    """The cache (split -> LogitSplit; None for alpha 0 without one) and the dataset, checked to match, and the
    dataset's labels checked (refuse_label_issues)."""
    cache = open_cache(cfg.cache) if cfg.cache else None
    dataset = dataset_for(cfg, cache)
    refuse_label_issues(cfg, dataset, label_issues(dataset, cfg.train_split))
    return cache, dataset


def label_issues(dataset: ImageDataset, train_split: str) -> dict:
    """What the labels cannot teach: classes with no image in the train split (the student never sees them), and
    identical images (by SHA-256) under two labels, in any of the opened splits; and, apart, identical images
    in the train split and another (a test image trained on). Counts and an example of each; empty when none."""
    train = dataset.splits[train_split]
    counts = np.bincount(train.labels, minlength=len(dataset.label_names))
    out = {}
    if missing := [n for n, c in zip(dataset.label_names, counts) if c == 0]:
        out["classes_without_training_images"] = missing
    first, twice, shared = {}, [], []  # digest -> (split, id, label); pairs labelled apart; pairs across splits
    for name, split in dataset.splits.items():
        for id_, label, digest in zip(split.ids, split.labels.tolist(), split.digests()):
            seen = first.setdefault(digest.tobytes(), (name, id_, label))
            if seen[2] != label:
                twice.append((seen, (name, id_, label)))
            elif seen[0] != name and train_split in (seen[0], name):
                shared.append((seen, (name, id_, label)))
    names = dataset.label_names

    def pair(p) -> str:
        (s1, i1, l1), (s2, i2, l2) = p
        return f"{i1} ({s1}, {names[l1]}) = {i2} ({s2}, {names[l2]})"

    if twice:
        out["images_with_two_labels"] = {"pairs": len(twice), "example": pair(twice[0])}
    if shared:
        out["images_in_train_and_another_split"] = {"pairs": len(shared), "example": pair(shared[0])}
    return out


def describe_label_issues(issues: dict, train_split: str) -> str:
    parts = []
    if missing := issues.get("classes_without_training_images"):
        parts.append(f"{len(missing)} class(es) with no image in --train-split {train_split} ({', '.join(missing)}): "
                     "the student can never learn them")
    if twice := issues.get("images_with_two_labels"):
        parts.append(f"{twice['pairs']} identical image(s) under two labels (e.g. {twice['example']})")
    return "; ".join(parts)


def refuse_label_issues(cfg: TrainConfig, dataset: ImageDataset, issues: dict) -> None:
    """Classes without training images and images under two labels are refused unless --allow-label-issues
    (then recorded in run.json as `label_issues`). Images shared by the train split and another are a warning
    recorded in run.json (`split_overlap`): the held-out score is flattered, the training is not wrong."""
    if describe_label_issues(issues, cfg.train_split) and not cfg.allow_label_issues:
        raise KdpipeError(f"--dataset {dataset.spec}: {describe_label_issues(issues, cfg.train_split)}; fix the "
                          "class folders or labels, or pass --allow-label-issues to train anyway (recorded in run.json)")


def inputs_identity(cache: dict | None, dataset: ImageDataset) -> dict:
    """What a run or a sweep reads, by content: each cached split's sha256, each dataset split's fingerprint."""
    return {"cache": {n: s.meta["content_sha256"] for n, s in cache.items()} if cache else None,
            "dataset": {n: s.fingerprint() for n, s in dataset.splits.items()}}


def open_cache(cache_dir: Path) -> dict[str, logit_store.LogitSplit]:
    paths = logit_store.cache_splits(cache_dir)
    cache = {name: logit_store.read_split(path) for name, path in paths.items()}
    logit_store.check_split_names({name: split.meta for name, split in cache.items()}, paths)
    logit_store.check_one_source({name: split.meta for name, split in cache.items()}, f"--cache {cache_dir}")
    return cache


def dataset_for(cfg: TrainConfig, cache: dict | None) -> ImageDataset:
    """The splits train-student asks for: from --dataset, or from the dataset the cache was built from."""
    flags = {s: flag for flag, s in (("--test-split", cfg.test_split), ("--val-split", cfg.val_split),
                                     ("--train-split", cfg.train_split)) if s}  # a split asked twice: the first flag
    wanted = list(dict.fromkeys(s for s in (cfg.train_split, cfg.val_split, cfg.test_split) if s))
    if cache is None:
        return open_dataset(cfg.dataset, splits=wanted, image_column=cfg.image_column, label_column=cfg.label_column,
                            flags=flags, allow_outside=cfg.allow_outside_images)
    meta = next(iter(cache.values())).meta
    dataset = reopen_dataset(meta["dataset"], cfg.dataset, wanted, cfg.image_column, cfg.label_column, flags,
                             cfg.allow_outside_images)
    if dataset.label_names != meta["label_names"]:
        raise KdpipeError(f"--dataset {dataset.spec} has labels {dataset.label_names} but --cache {cfg.cache} has "
                          f"{meta['label_names']}; use the dataset the cache was built from")
    return dataset


SIZE_SAMPLE = 64  # train images, evenly spaced, whose size bounds the student's resolution (all: slow on big sets)


def student_resolution(cfg: TrainConfig, cache: dict | None, dataset: ImageDataset) -> dict:
    """The student's config overrides with its resolution where no flag sets it, and why: MobileNetV2 from
    scratch takes the teacher's input size (its processor, in the cache), never above the images' own size
    (the largest short side of SIZE_SAMPLE train images): upscaling adds pixels, not information, and costs
    (issue 57: 32-px digits trained at 224 px ran 12x slower). A --student checkpoint keeps its config's.
    Returns {"student_config", "size": [H, W], "reason"}."""
    overrides = dict(cfg.student_config)
    if "image_size" in overrides or cfg.student is not None:
        why = "--student-config image_size" if "image_size" in overrides else f"the --student {cfg.student} config's"
        return {"student_config": overrides, "size": list(image_size(student_config(cfg.student, overrides))),
                "reason": why}
    teacher = teacher_input_size(cache)
    split = dataset.splits[cfg.train_split]
    rows = np.unique(np.linspace(0, len(split) - 1, min(SIZE_SAMPLE, len(split))).round().astype(int))
    largest = max(min(split.image(int(i)).size) for i in rows)  # PIL size: (W, H)
    size = min(teacher or MOBILENET_SIZE, largest)
    if teacher is None:
        why = (f"the images' own size (the largest short side of {len(rows)} train images; MobileNetV2's "
               f"{MOBILENET_SIZE} would only upscale them)" if size < MOBILENET_SIZE else
               f"MobileNetV2's default (no cache: the teacher's input size is unknown)")
    else:
        why = (f"the teacher's input size (its processor)" if size == teacher else
               f"the images' own size (the largest short side of {len(rows)} train images), below the teacher's "
               f"{teacher} px")
    return {"student_config": {**overrides, "image_size": int(size)}, "size": [int(size)] * 2,
            "reason": why + "; --student-config image_size=N sets another"}


def teacher_input_size(cache: dict | None) -> int | None:
    """The side of the teacher's input (its processor: the crop if it crops, else its resize), None if unknown."""
    if not cache:
        return None
    proc = next(iter(cache.values())).meta["processor"]
    size = (proc.get("crop_size") if proc.get("do_center_crop") else None) or proc.get("size") or {}
    if isinstance(size, int):
        return size
    sides = [size[k] for k in ("height", "width", "shortest_edge") if isinstance(size.get(k), int)]
    return min(sides) if sides else None


NO_CACHE_NOTE = ("no --cache: inputs normalised with mean and std 0.5, not a teacher's; the twin of a distilled run "
                 "is --alpha 0 with its --cache (the same inputs, only the KD term dropped)")


def input_spec(size: tuple[int, int], cache: dict | None) -> dict:
    """Student inputs: the student's resolution (H, W), with the teacher processor's filter and statistics
    (the guide feeds the student the teacher processor's pixels)."""
    mean, std, resample = *DEFAULT_MEAN_STD, 2
    if cache is not None:
        proc = next(iter(cache.values())).meta["processor"]
        mean, std = proc.get("image_mean", mean), proc.get("image_std", std)
        resample = proc.get("resample", resample)
    return {"size": size, "resample": int(resample), "mean": list(mean), "std": list(std)}


def with_tensors(inputs: dict, device: torch.device) -> dict:
    return {**inputs, "mean_t": torch.tensor(inputs["mean"], device=device),
            "std_t": torch.tensor(inputs["std"], device=device)}


def load_splits(cache: dict | None, dataset: ImageDataset, inputs: dict, device, progress,
                 view_split: str | None = None, sizes: dict | None = None) -> dict[str, SplitData]:
    """Each split as uint8 pixels at the student's resolution (decoded once, pixels.load_or_build; `sizes`:
    another resolution for some splits, --eval-size), its labels, and the teacher's logits joined by id;
    `view_split` with every view the cache stores for it, rendered when used exactly as the teacher saw
    them (view_source.ViewSource)."""
    splits = {}
    for name, split in dataset.splits.items():
        if name == view_split:
            splits[name] = load_views(cache, split, inputs, device, progress)
            continue
        u8 = pixels.load_or_build(split, (sizes or {}).get(name, inputs["size"]), inputs["resample"], progress=progress)
        teacher = None
        if cache is not None and name in cache:
            teacher = cache[name].aligned_to(split.ids, split.labels, f"--cache split {name!r}", sparse=True)
            if isinstance(teacher, np.ndarray):
                teacher = torch.from_numpy(teacher).to(device)
        splits[name] = SplitData(name, split.ids, pixels.as_tensor(u8, device), torch.from_numpy(split.labels).to(device),
                                 teacher)
    return splits


def stored_views(cache: dict | None, split) -> logit_store.LogitSplit:
    """Every view the cache stores for `split`'s images, rows image by image, then view; refused when the cache
    holds no views of it."""
    where = f"--views: --cache split {split.name!r}"
    if cache is None or split.name not in cache:
        raise KdpipeError(f"{where} is missing; build the cache with kdpipe cache-teacher --views K")
    return cache[split.name].aligned_views(split.ids, split.labels, where)


def require_train_split(cfg: TrainConfig, cache: dict | None) -> None:
    """The KD term needs the teacher's logits on the split trained on."""
    if cfg.alpha > 0 and cfg.train_split not in (cache or {}):
        raise KdpipeError(f"--cache {cfg.cache} has no {cfg.train_split!r} split; cache it or use --alpha 0")


def load_views(cache: dict | None, split, inputs: dict, device, progress) -> SplitData:
    where = f"--views: --cache split {split.name!r}"
    stored = stored_views(cache, split)
    layout = views.ViewRows(len(split), stored.per_image)
    mixes, targets = mixed_views(stored, split, where)
    originals = pixels.load_or_build_originals(split, progress=progress)  # None over its cap: decode when used
    params = (layout.grid(stored.boxes), layout.grid(stored.flips), inputs["size"], inputs["resample"])
    if device.type == "cuda" and inputs["resample"] in pillow_resample.FILTERS:  # rendered in batches on the GPU
        array = originals.array if originals is not None else lambda i: np.asarray(split.image(i))
        source = view_source.DeviceViewSource(array, *params, device, mixes)
    else:  # on background threads
        source = view_source.ViewSource(split.image if originals is None else originals.image, *params, mixes)
    teacher = stored.topk if stored.topk is not None else torch.from_numpy(stored.logits).to(device)
    return SplitData(split.name, split.ids, None, torch.from_numpy(split.labels).to(device), teacher, layout.per_image,
                     targets=None if targets is None else targets.to(device), source=source)


def mixed_views(stored: logit_store.LogitSplit, split, where: str) -> tuple[views.Mixes | None, torch.Tensor | None]:
    """For a cache of mixed views: their Mixes with partners as split indices, and each view's label
    distribution (1 - w) * onehot(y) + w * onehot(y_partner) (N * V, C), mixup's target for the CE term."""
    if stored.mixes is None:
        return None, None
    index = {id_: i for i, id_ in enumerate(split.ids)}
    m = stored.mixes
    mixed = m.weights > 0
    missing = sorted({p for p in m.partners[mixed] if p not in index})
    if missing:
        raise KdpipeError(f"{where}: mixed views blend images missing from the dataset (e.g. {missing[0]}); "
                          "use the dataset the cache was built from")
    partners = np.array([index[p] if w > 0 else -1 for p, w in zip(m.partners, m.weights)], dtype=np.int64)
    layout = views.ViewRows(len(split), stored.per_image)
    rows = layout.image(np.arange(len(layout)))  # each row's image
    w = torch.from_numpy(m.weights.astype(np.float32))[:, None]  # (N * V, 1)
    eye = torch.eye(stored.meta["num_classes"])
    own = eye[torch.from_numpy(split.labels[rows])]
    other = eye[torch.from_numpy(split.labels[np.where(partners >= 0, partners, rows)])]
    return views.Mixes(partners, m.boxes, m.flips, m.weights), (1 - w) * own + w * other


def check_targets(cfg: TrainConfig, teacher, mixed: bool) -> None:
    """Refuse a loss the cached targets cannot serve (docs/training.md, "Top-K caches and mixed targets"):
    `teacher` the train split's cached logits (a TopK for a top-K cache), `mixed` whether the views trained on
    blend two images."""
    if isinstance(teacher, TopK) and teacher.values.shape[1] < teacher.num_classes:
        why = loss.topk_refusal(cfg.loss, cfg.standardize)
        if why:
            able = " or ".join(name for name, entry in loss.LOSSES.items() if entry.topk is None)
            raise KdpipeError(f"--loss {cfg.loss}{' --standardize' if cfg.standardize else ''}: {why} (--cache "
                              f"{cfg.cache} keeps {teacher.values.shape[1]} of {teacher.num_classes}); use --loss {able} "
                              "without --standardize, or a cache of full logits")
    if mixed and (why := loss.LOSSES[cfg.loss].mixed):
        able = " or ".join(name for name, entry in loss.LOSSES.items() if entry.mixed is None)
        raise KdpipeError(f"--loss {cfg.loss} {why}, and --cache {cfg.cache} holds views blended from two images "
                          f"(--view-mixup); use --loss {able}, or a cache without it")


def changed_images(cache: dict | None, dataset: ImageDataset) -> dict[str, dict]:
    """Per split in both the cache and the dataset whose contents differ from those the cache was built
    from (dataset fingerprint): how many images changed under the same id and the first of them, from the
    per-image SHA-256s the cache stores; `examples` None for a cache written before it stored them. Ids and
    labels were checked already (LogitSplit.aligned_to); rows merely in another order count as unchanged."""
    out = {}
    for name, split in dataset.splits.items():
        if cache is None or name not in cache or split.fingerprint() == cache[name].meta["dataset_fingerprint"]:
            continue
        changed = cache[name].changed_images(split.ids, split.digests())
        if changed is None or changed:
            out[name] = {"examples": None if changed is None else len(changed), "of": len(split),
                         "example": changed[0] if changed else None}
    return out


def describe_changed(changed: dict[str, dict]) -> str:
    counts = [c["examples"] for c in changed.values()]
    if None in counts:  # an older cache: which images is unknown
        return (f"the images of split {next(iter(changed))!r} differ from those the cache was built from (it predates "
                "per-image digests: rebuilding it names them)")
    per = ", ".join(f"split {name!r}: {c['examples']} of {c['of']}" for name, c in changed.items())
    example = next(iter(changed.values()))["example"]
    return f"{sum(counts)} example{'s' if sum(counts) != 1 else ''} changed since the cache was built ({per}; e.g. {example})"


def refuse_changed_images(cfg: TrainConfig, dataset: ImageDataset, changed: dict[str, dict]) -> None:
    """Training against logits of other pixels is the one silent error a logit cache invites: refused
    unless --allow-changed-data (then recorded in run.json as `changed_data`)."""
    if changed and not cfg.allow_changed_data:
        raise KdpipeError(f"--dataset {dataset.spec}: {describe_changed(changed)}, so their teacher logits in --cache "
                          f"{cfg.cache} belong to other pixels; rebuild the cache with kdpipe cache-teacher --force, "
                          "or pass --allow-changed-data to train anyway (recorded in run.json)")


