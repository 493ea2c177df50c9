"""Stage one's teacher inputs and outputs: what the teacher is fed, and its logits a batch at a time.

Each image as the teacher's processor prepares it (view 0), and with a ViewSpec (`--views K`) K random
augmented views per image besides it, optionally blended with another image's view (`--view-mixup`), each
with the parameters that render it again (views.py). Decoding and preprocessing run in DataLoader workers
(TeacherInputs, collate) so they overlap the teacher's forward pass (teacher_logits); teacher_batches yields
the outputs as Batches, the record a split file is written from (logit_store.Rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import logit_store, runtime, views
from .data import Split
from .errors import KdpipeError
from .teacher import Teacher

Progress = Callable[[str, int, int], None]  # (split, rows done, rows total)


@dataclass
class Batch(logit_store.Rows):
    """Teacher outputs for some images, as a split file stores them (logit_store.Rows: ids, labels, raw logits
    (R, C) in the teacher's label order, views), and the dataset row each came from: one row per (image,
    view), image by image then view."""
    rows: np.ndarray = field(default=None, kw_only=True)  # (R,) dataset row of each output row


# per-view parameters a TeacherInputs item carries besides its pixels (views; mixed views)
VIEW_PARAMS = ("boxes", "flips", "mix_partners", "mix_boxes", "mix_flips", "mix_weights")


@dataclass(frozen=True)
class ViewSpec:
    """K random views per image drawn by `policy`, rendered at the teacher processor's `inputs`."""
    k: int
    policy: views.ViewPolicy
    inputs: dict  # views.processor_inputs: size, resample, mean, std


def per_image(spec: ViewSpec | None) -> int:
    """V, the rows each image has in a pass with `spec` (views.ViewRows): K + 1, or 1 without views."""
    return 1 if spec is None else spec.k + 1


def writer_columns(spec: ViewSpec | None) -> dict:
    """The view columns a split file of a pass with `spec` holds (logit_store.SplitWriter's with_*)."""
    return {"with_views": spec is not None, "with_mixes": spec is not None and bool(spec.policy.mixup)}


def view_input(image, processor, view: tuple | None = None, inputs: dict | None = None,
               mix: tuple | None = None) -> np.ndarray:
    """The teacher's float input (3, H, W) for an image: view 0 (`view` None) through its own processor;
    a stored view (box, flip) rendered with views.render at the processor's `inputs`, blended with
    `mix` = (partner image, box, flip, share) for a mixed view, then normalised."""
    if view is None:
        return processor(images=image, return_tensors="np")["pixel_values"][0]
    box, flip = view
    return views.processor_pixels(views.render_mixed(image, box, bool(flip), inputs["size"], inputs["resample"], mix),
                           inputs["mean"], inputs["std"])


class TeacherInputs(torch.utils.data.Dataset):
    """Per image: the teacher processor's pixels (view 0) and, with a ViewSpec, K rendered random views
    (V, 3, H, W) with their boxes and flips. Errors travel as messages so the main process can raise them
    as one-line KdpipeErrors (DataLoader would wrap them in a traceback)."""

    def __init__(self, split: Split, processor, rows: np.ndarray, spec: ViewSpec | None = None):
        self.split, self.processor, self.rows, self.spec = split, processor, rows, spec

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i) -> dict:
        """{"row", "pixel_values" (V, 3, H, W), and with views VIEW_PARAMS}, or {"error": message}."""
        row = int(self.rows[i])
        try:
            image = self.split.image(row)
            pixels, item = [view_input(image, self.processor)], {"row": row}  # view 0: (3, H, W)
            if self.spec is not None:
                pixels += self._views(image, row, item)
        except KdpipeError as e:
            return {"error": str(e)}
        item["pixel_values"] = torch.from_numpy(np.stack(pixels).astype(np.float32, copy=False))  # (V, 3, H, W)
        return item

    def _views(self, image, row: int, item: dict) -> list[np.ndarray]:
        """Views 1..K of image `row` (each (3, H, W)); their parameters go into `item`."""
        k, policy = self.spec.k, self.spec.policy
        boxes, flips = views.sample(policy, self.split.ids[row], *image.size, k)
        partners = {}  # split index -> decoded image, each decoded once

        def partner(j):
            if j not in partners:
                partners[j] = self.split.image(j)
            return partners[j]

        m = views.sample_mixes(policy, self.split.ids, row, k, lambda j: partner(j).size)
        mix = [(partner(m.partners[v]), m.boxes[v], m.flips[v], m.weights[v]) if m.weights[v] else None
               for v in range(k + 1)]
        item.update(boxes=torch.from_numpy(boxes), flips=torch.from_numpy(flips))
        if policy.mixup:
            item.update(mix_partners=torch.from_numpy(m.partners), mix_boxes=torch.from_numpy(m.boxes),
                        mix_flips=torch.from_numpy(m.flips), mix_weights=torch.from_numpy(m.weights))
        return [view_input(image, self.processor, (boxes[v], flips[v]), self.spec.inputs, mix[v])
                for v in range(1, k + 1)]


def collate(items: list[dict]) -> dict:
    """TeacherInputs items as one batch: pixel_values (sum of V, 3, H, W), rows (B,), the view parameters
    (sum of V, ...) concatenated; the first error instead, if any item carries one."""
    for item in items:
        if "error" in item:
            return {"error": item["error"]}
    out = {"pixel_values": torch.cat([x["pixel_values"] for x in items]),
           "rows": torch.tensor([x["row"] for x in items])}
    for key in VIEW_PARAMS:
        if key in items[0]:
            out[key] = torch.cat([x[key] for x in items])
    return out


def teacher_logits(teacher: Teacher, pixel_values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The teacher's raw logits (N, C) for pixel_values (N, 3, H, W), `batch_size` inputs per forward: an
    image's K + 1 views arrive together, and one forward over all 300 of them ran 2.55x slower per input on a
    CPU than forwards of 16 (EfficientNet-Lite0, bf16, one thread: benchmarks/bench_view_forward.py)."""
    chunks = pixel_values.split(batch_size)  # each (<= batch_size, 3, H, W)
    return torch.cat([teacher.model(pixel_values=c.contiguous(memory_format=torch.channels_last)).logits.float()
                      for c in chunks])


def teacher_batches(teacher: Teacher, split: Split, device: torch.device, precision: str, batch_size: int,
                    workers: int, progress: Progress | None = None, rows: np.ndarray | None = None,
                    spec: ViewSpec | None = None):
    """Yield a Batch of raw teacher logits for every row of `split` (or for `rows` of it), in order,
    `batch_size` teacher inputs at a time; with a ViewSpec, K + 1 views per image."""
    rows = np.arange(len(split)) if rows is None else rows
    v = per_image(spec)
    loader = torch.utils.data.DataLoader(
        TeacherInputs(split, teacher.processor, rows, spec), batch_size=max(1, batch_size // v),
        shuffle=False, num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    done = 0
    with torch.inference_mode(), runtime.autocast(device, precision):
        for batch in loader:
            if "error" in batch:
                raise KdpipeError(batch["error"])
            images = batch.pop("rows").numpy()  # (B,) stays on the host: no round trip through the device
            params = {k: batch.pop(k).numpy() for k in VIEW_PARAMS if k in batch}
            logits = teacher_logits(teacher, runtime.to_device(batch, device)["pixel_values"], batch_size)  # (B*V, C)
            done += len(images)
            if progress:
                progress(split.name, done, len(rows))
            yield _batch(split, images, v, logits.cpu().numpy(), params)


def _batch(split: Split, images: np.ndarray, v: int, logits: np.ndarray, params: dict) -> Batch:
    """The Batch of `images` (B,) with `v` views each: logits (B * V, C), view parameters (collate's)."""
    layout = views.ViewRows(len(images), v)
    at = np.arange(len(layout))  # the batch's rows: image by image, then view
    rows = images[layout.image(at)]  # (B * V,) dataset rows
    mixes = None
    if "mix_partners" in params:  # split indices -> ids, the form stored
        partners = np.array([split.ids[j] if j >= 0 else "" for j in params["mix_partners"]], dtype=object)
        mixes = views.Mixes(partners, params["mix_boxes"], params["mix_flips"], params["mix_weights"])
    return Batch([split.ids[i] for i in rows], split.labels[rows], logits, layout.view(at).astype(np.int16),
                 params.get("boxes"), params.get("flips"), mixes, rows=rows)
