"""One device check for the GPU path (issue 28): both stages, the data path and their correctness, side by
side in one run, through kdpipe's own library functions; prints a table and writes JSON.

    python benchmarks/device_check.py                            # a GPU: real Beans, ViT-B/16 timing, <= 8 min
    python benchmarks/device_check.py --device cpu --tiny        # seconds: generated images, tiny models
    python benchmarks/device_check.py --device cpu --only data_path,stage_one.decode   # CPU data path, real Beans

Measurements (each named; one that fails is recorded with its error and the run goes on; one that would
start after --budget-s is recorded as skipped, as are those --only/--skip leave out):

  data_path.plain          the uint8 pixel store (pixels.load_or_build) -> SplitData.batch -> pixels.normalise
                           on the device, no model: images/s delivered (the store on the device when it fits,
                           pixels.as_tensor)
  data_path.plain_host     the same with the store kept as a host memory map (a store too big for the GPU): a
                           gather and a host-to-device copy per batch (GPU only; on a CPU it is data_path.plain)
  data_path.gather_host    the host's half of that path alone: uint8 batches gathered from the memory map (no
                           normalising, no copy): what the CPU must deliver to feed a device from a host store
  data_path.views          batches of stored views as train-student --views gets them (student_data.load_views
                           on a cache-teacher --views K cache; rendered on CPU threads from decode-once originals)
  data_path.views_agreement  the views rendered on the device (view_source.DeviceViewSource) against PIL's on the CPU
                           (view_source.ViewSource), plain and blended with mixup partners: max |diff|, bit-equality
  stage_one.decode         JPEG decode + the teacher's processor in DataLoader workers (teacher_inputs.TeacherInputs
                           and collate, pinned on a GPU, copied to the device), no model, at 0, 1, 2, 4, ...
                           workers: images/s and the scaling; also with K random views rendered per image
  stage_one.vit.<p>        cache_teacher.run on the train split with a ViT-B/16-shaped teacher (ViTConfig() defaults,
                           random weights: timing only) against its bare forward on the same preprocessed batches
                           (bench_cache_teacher.preprocess / time_bare_forward), at precision p (fp16, bf16, fp32)
  stage_one.agreement.<p>  the real teacher's cache made on the device at p against a CPU fp32 cache of the same
                           split: max |Δlogit|, mean KL, argmax agreement, judged against TOLERANCE[p]; for bf16
                           also against the CPU's bf16 cache, and that one against fp32 (bf16's own rounding)
  stage_two.train_student  train_student.run, --epochs E, the cache made on the device (per-epoch images/s from
                           run.json's own timing; the first epoch apart), also .views, .compile and .fp32 (--precision fp32)
  stage_two.bare.<v>       a bare forward / KD loss / backward / AdamW step (_common.kd_step) on pre-normalised
                           device tensors, v in channels_last+autocast, channels_last, nchw+autocast, nchw, compiled
  stage_two.resume         train-student in a subprocess, killed (SIGKILL) once its first checkpoint lands, resumed
                           with --resume, compared with the uninterrupted stage_two.train_student; the saved student
                           evaluated on the CPU and reloaded there with transformers.pipeline()
  torchrun.cache_teacher   stage one under torchrun (a process per GPU, >= 2; with --device cpu 2 processes on
                           gloo), its cache compared with the one-process cache
  torchrun.train_student   stage two under torchrun, its test accuracy beside the one-process run's

Public references printed beside the figures (timm results CSVs, synthetic inputs): mobilenetv2_100 training at
224 px, AMP: 1,832 img/s NCHW, 2,313 img/s channels_last on an RTX 3090; ViT-B/16 inference, AMP: about
2,800-3,000 img/s on an RTX 4090, 3,900 on an RTX 5090 (../shared/notes/distillation-references.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: a hub lookup fails at once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from _common import cpu_seconds, kd_step, print_table, subset_folder, sync  # noqa: E402
from bench_cache_teacher import preprocess, time_bare_forward  # noqa: E402
from kdpipe import (cache_teacher, cache_verify, evaluate, files, logit_store, pillow_resample, pixels,  # noqa: E402
                    runtime, student_data, teacher_inputs, train_student, view_source, views)
from kdpipe.config import CacheConfig, TrainConfig  # noqa: E402
from kdpipe.data import open_dataset  # noqa: E402
from kdpipe.errors import KdpipeError  # noqa: E402
from kdpipe.student import build_student, image_size  # noqa: E402
from kdpipe.teacher import load_teacher  # noqa: E402
from kdpipe.train_student import SplitData  # noqa: E402

SHARED = REPO.parent / "shared"
BEANS_LABELS = ["angular_leaf_spot", "bean_rust", "healthy"]
PRECISIONS = ("fp32", "bf16", "fp16")
# largest |Δlogit| allowed between a cache made on the device and the CPU's fp32 cache of the same images: the
# library's (inspect-cache --verify judges by the same)
TOLERANCE = runtime.LOGIT_TOLERANCE
BARE_VARIANTS = ("channels_last+autocast", "channels_last", "nchw+autocast", "nchw", "compiled")
REFERENCES = [  # timm results CSVs (synthetic inputs), as quoted in issue 28
    {"what": "mobilenetv2_100 training, 224 px, AMP, channels_last", "images_per_s": 2313, "hardware": "RTX 3090",
     "compare": ["stage_two.bare.channels_last+autocast", "stage_two.train_student"]},
    {"what": "mobilenetv2_100 training, 224 px, AMP, NCHW", "images_per_s": 1832, "hardware": "RTX 3090",
     "compare": ["stage_two.bare.nchw+autocast"]},
    {"what": "ViT-B/16 inference, 224 px, AMP", "images_per_s": 2900, "range": [2800, 3000], "hardware": "RTX 4090",
     "compare": ["stage_one.vit.fp16", "stage_one.vit.bf16"]},
    {"what": "ViT-B/16 inference, 224 px, AMP", "images_per_s": 3900, "hardware": "RTX 5090",
     "compare": ["stage_one.vit.fp16", "stage_one.vit.bf16"]},
]
TINY_VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64}
TINY_STUDENT = {"image_size": 32, "depth_multiplier": 0.35, "classifier_dropout_prob": 0.0}
MODES = {  # sizes per mode; flags override them
    "gpu": {"images": None, "teacher_batch": 128, "student_batch": 128, "epochs": 3, "decode_images": 512,
            "min_time": 2.0, "vit": {}, "student_config": {}, "views": 2, "agree_split": "validation"},
    "cpu": {"images": 64, "teacher_batch": 32, "student_batch": 32, "epochs": 2, "decode_images": 128,
            "min_time": 1.0, "vit": {}, "student_config": {}, "views": 2, "agree_split": "validation"},
    "tiny": {"images": None, "teacher_batch": 8, "student_batch": 4, "epochs": 2, "decode_images": 12,
             "min_time": 0.05, "vit": TINY_VIT, "student_config": TINY_STUDENT, "views": 2, "agree_split": "validation"},
}


class Skip(Exception):
    """A measurement that does not apply here: recorded as skipped with this reason."""


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def cpu_info() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": runtime.cpu_cores(), "torch_threads": torch.get_num_threads(),
            **{f: f in flags for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}}


def make_tiny_folder(root: Path, per_class: dict[str, int]) -> Path:
    """split/class/*.png, each class a noisy colour (as tests/helpers.py): something to learn in seconds."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = [(200, 60, 60), (60, 200, 60), (60, 60, 200)]
    for split, n in per_class.items():
        for name, colour in zip(BEANS_LABELS, colours):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.array(colour) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{name}_{i}.png")
    return root


def save_vit(folder: Path, overrides: dict, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed: int = 0) -> Path:
    """A ViTForImageClassification (ViTConfig() defaults = ViT-B/16 at 224, plus `overrides`) with random
    weights and a PIL ViT processor at its resolution, as save_pretrained: a teacher for timing only."""
    from transformers import ViTConfig, ViTForImageClassification

    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # older transformers: the PIL processor is the default one
        from transformers import ViTImageProcessor as Processor
    torch.manual_seed(seed)
    config = ViTConfig(num_labels=3, id2label=dict(enumerate(BEANS_LABELS)),
                       label2id={n: i for i, n in enumerate(BEANS_LABELS)}, **overrides)
    ViTForImageClassification(config).save_pretrained(folder)
    Processor(size={"height": config.image_size, "width": config.image_size}, image_mean=list(mean),
              image_std=list(std)).save_pretrained(folder)
    return folder


class Check:
    """The run: settings, a scratch folder (the working directory while it runs), shared inputs built on
    first use, and the measurements recorded so far."""

    def __init__(self, args, work: Path):
        self.args, self.work, self.t0 = args, work, time.monotonic()
        self.device = runtime.resolve_device(args.device)
        self.cuda = self.device.type == "cuda"
        self.mode = "tiny" if args.tiny else "gpu" if self.cuda else "cpu"
        sizes = dict(MODES[self.mode])
        for key, value in (("images", args.images), ("epochs", args.epochs), ("student_batch", args.batch_size),
                           ("teacher_batch", args.teacher_batch_size), ("decode_images", args.decode_images)):
            if value is not None:
                sizes[key] = value
        self.sizes = sizes
        self.precision = runtime.resolve_precision("auto", self.device)
        cores = runtime.cpu_cores()
        self.workers = ([int(w) for w in args.workers.split(",")] if args.workers else
                        sorted({0, 1, 2, *(w for w in (4, 8, 16, 32) if w < cores), max(1, cores - 1)}))
        self.results: dict[str, dict] = {}
        self.partial_json: Path | None = None  # rewritten after each measurement; main() sets it
        self._memo: dict[str, object] = {}

    # ----------------------------------------------------------------------------- shared inputs

    def memo(self, key: str, build):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def folder(self) -> Path:
        """The image folder every measurement reads: generated (--tiny), or the dataset, or its first
        --images train images (linked)."""
        def build():
            if self.args.tiny:
                return make_tiny_folder(self.work / "images", {"train": 4, "validation": 2, "test": 2})
            src = Path(self.args.dataset)
            if not src.is_dir():
                raise KdpipeError(f"--dataset {src}: not a folder; pass the Beans image folder (../shared/beans)")
            if self.sizes["images"] is None:
                return src
            return subset_folder(src, self.work / "images", self.sizes["images"])
        return self.memo("folder", build)

    def teacher_dir(self) -> Path:
        """The real teacher (correctness and the stage-two cache), or a tiny random ViT with --tiny."""
        if not self.args.tiny:
            return Path(self.args.teacher)
        return self.memo("teacher", lambda: save_vit(self.work / "teacher-tiny", TINY_VIT, (0.5, 0.4, 0.3),
                                                     (0.2, 0.25, 0.3)))

    def vit_dir(self) -> Path:
        return self.memo("vit", lambda: save_vit(self.work / "vit-timing", self.sizes["vit"]))

    def dataset(self, split: str):
        return self.memo(f"split-{split}", lambda: open_dataset(str(self.folder()), splits=[split]).splits[split])

    def inputs(self) -> dict:
        """The student's inputs as train-student derives them: its resolution, the teacher processor's filter
        and statistics."""
        def build():
            student = build_student(None, BEANS_LABELS, self.sizes["student_config"])
            proc = load_teacher(str(self.teacher_dir())).processor.to_dict()
            mean, std = proc.get("image_mean", [0.5] * 3), proc.get("image_std", [0.5] * 3)
            return {"size": image_size(student.config), "resample": int(proc.get("resample", 2)), "mean": list(mean),
                    "std": list(std), "mean_t": torch.tensor(mean, device=self.device),
                    "std_t": torch.tensor(std, device=self.device)}
        return self.memo("inputs", build)

    def store(self) -> np.ndarray:
        inp = self.inputs()
        return self.memo("store", lambda: pixels.load_or_build(self.dataset("train"), inp["size"], inp["resample"]))

    def cache(self, with_views: bool = False) -> Path:
        """The real teacher's cache of every split made on the device at the auto precision (stage two's
        input); with_views: K stored views of the train split."""
        def build():
            out = self.work / ("cache-views" if with_views else "cache")
            cache_teacher.run(CacheConfig(teacher=str(self.teacher_dir()), dataset=str(self.folder()), out=out,
                                          device=self.args.device, batch_size=self.sizes["teacher_batch"],
                                          views=self.sizes["views"] if with_views else 0))
            return out
        return self.memo(f"cache-{with_views}", build)

    def train_config(self, name: str, **overrides) -> TrainConfig:
        settings = dict(cache=self.cache(overrides.get("views", False)), epochs=self.sizes["epochs"],
                        batch_size=self.sizes["student_batch"], lr=1e-3, device=self.args.device,
                        student_config=dict(self.sizes["student_config"]), out=self.work / "runs" / name,
                        log_tensorboard=False, seed=0)
        return TrainConfig(**{**settings, **overrides})

    # --------------------------------------------------------------------------------- running

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def subprocess_timeout(self) -> float:
        """A launched process may use what is left of the budget, and at least a minute."""
        return max(60.0, self.args.budget_s - self.elapsed())

    def selected(self, name: str) -> str | None:
        """Why `name` is left out by --only/--skip (prefixes match), or None."""
        def hit(patterns):
            return any(name == p or name.startswith(p + ".") for p in patterns)
        only = [p for p in (self.args.only or "").split(",") if p]
        skip = [p for p in (self.args.skip or "").split(",") if p]
        if only and not hit(only):
            return "not in --only"
        if hit(skip):
            return "in --skip"
        return None

    def measure(self, name: str, fn, *args) -> dict:
        record: dict = {"status": "skipped"}
        reason = self.selected(name)
        if reason is None and self.elapsed() > self.args.budget_s:
            reason = f"time budget of {self.args.budget_s:g} s spent"
        if reason is not None:
            record["reason"] = reason
            self.keep(name, record)
            return record
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start, cpu0 = time.perf_counter(), cpu_seconds()
        try:
            record.update(fn(*args) or {})
            record["status"] = "ok"
        except Skip as e:
            record["reason"] = str(e)
        except Exception as e:  # noqa: BLE001  one failure is a finding, not the end of the check
            record.update(status="failed", error=first_line(e))
            if self.cuda:
                torch.cuda.empty_cache()  # what the failed measurement held, for the next ones
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["cores_busy"] = round((cpu_seconds() - cpu0) / max(record["seconds"], 1e-9), 2)  # CPU s per wall s
        if self.cuda:
            record["peak_device_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        self.keep(name, record)
        ips = record.get("images_per_s")
        print(f"[{self.elapsed():6.1f} s] {name}: {record['status']}"
              + (f", {ips:,.1f} images/s" if ips else "") + (f" ({record.get('error') or record.get('reason')})"
                                                             if record["status"] != "ok" else ""), flush=True)
        return record

    def keep(self, name: str, record: dict) -> None:
        self.results[name] = record
        if self.partial_json is not None:  # a check killed at its time limit still leaves what it measured
            files.write_text(self.partial_json, json.dumps({"partial": True, "measurements": self.results},
                                                           indent=2, default=str) + "\n")

    def timed(self, one_pass, images: int) -> dict:
        """images/s of one_pass() (which handles `images` images), repeated until --min-time has passed; also
        per CPU second of this process (what its cores deliver when others share the machine)."""
        passes, start, cpu0 = 0, time.perf_counter(), cpu_seconds()
        while True:
            one_pass()
            sync(self.device)
            passes += 1
            seconds = time.perf_counter() - start
            if seconds >= self.sizes["min_time"]:
                cpu = cpu_seconds() - cpu0
                return {"images_per_s": round(passes * images / seconds, 2),
                        "images_per_cpu_s": round(passes * images / max(cpu, 1e-9), 2), "timed_passes": passes}


# ------------------------------------------------------------------------------------ the data path


def data_path_plain(c: Check, host: bool, normalise: bool = True) -> dict:
    if host and not c.cuda and normalise:
        raise Skip("on a CPU the store always is a host memory map: data_path.plain")
    split, u8, inp = c.dataset("train"), c.store(), c.inputs()
    store = torch.from_numpy(u8) if host else pixels.as_tensor(u8, c.device)
    data = SplitData("train", split.ids, store, torch.from_numpy(split.labels).to(c.device), None)
    device = c.device if normalise else torch.device("cpu")
    return {**_batches(c, data, inp, device, normalise), "image_size": list(inp["size"]),
            "store": "device" if store.device.type == "cuda" else "host memory map",
            "store_mib": round(u8.nbytes / 2**20, 1)}


def _batches(c: Check, data: SplitData, inp: dict, device: torch.device | None = None, normalise: bool = True) -> dict:
    """train_epoch's data path without the model: each epoch's view of every image (with views), shuffled
    batches handed to the split's renderer ahead (SplitData.plan, where it has one), gathered or rendered,
    moved, normalised."""
    n, b, device = len(data), c.sizes["student_batch"], device or c.device
    g = torch.Generator().manual_seed(0)
    epoch = [0]

    def one_pass():
        if data.per_image > 1:
            data.view_of = torch.from_numpy(views.epoch_views(n, data.per_image, epoch[0], 0))
            epoch[0] += 1
        order = torch.randperm(n, generator=g)
        batches = [order[start:start + b] for start in range(0, n, b)]
        if hasattr(data, "plan"):
            data.plan(batches)
        for idx in batches:
            batch = data.batch(idx, device)
            if normalise:
                pixels.normalise(batch["pixels"], inp["mean_t"], inp["std_t"])

    if data.per_image > 1:
        data.view_of = torch.zeros(n, dtype=torch.long)
    data.batch(torch.arange(min(b, n)), device)  # warm-up
    return {**c.timed(one_pass, n), "images": n, "batch_size": b}


def data_path_views(c: Check) -> dict:
    """The student's batches of stored views exactly as train-student --views gets them: the train split
    loaded by student_data.load_views from a cache-teacher --views K cache (rendered or stored pixels,
    whichever the library does), `build_s` the one-off preparation (decoding)."""
    split, inp = c.dataset("train"), c.inputs()
    cache = student_data.open_cache(c.cache(with_views=True))
    start = time.perf_counter()
    data = student_data.load_views(cache, split, inp, c.device, None)
    build = time.perf_counter() - start
    try:
        source = getattr(data, "source", None)
        out = _batches(c, data, inp)
    finally:
        if source is not None and hasattr(source, "close"):
            source.close()
    return {**out, "views_per_image": data.per_image, "build_s": round(build, 3),
            "renderer": f"{type(source).__name__}, {source.threads} CPU threads" if source is not None else
            ("stored pixels on the device" if data.pixels.device.type == "cuda" else "stored pixels, host memory map"),
            "note": "one stored view per image per epoch, rendered from decode-once originals when a source renders"}


def views_agreement(c: Check) -> dict:
    """The views a GPU renders (view_source.DeviceViewSource: train-student --views on a GPU) against the same
    views rendered by PIL on the CPU (view_source.ViewSource, the teacher's own pixels), every stored view of the
    train split, then the same views blended with mixup partners (views.sample_mixes): bit-equality is the
    claim (integer arithmetic in float64 for the resize, float32 for the blend)."""
    split, inp = c.dataset("train"), c.inputs()
    stored = student_data.stored_views(student_data.open_cache(c.cache(with_views=True)), split)
    originals = pixels.load_or_build_originals(split)
    if originals is None:
        raise Skip("the train split's originals are over their cap: views decode per use, as on the CPU")
    if inp["resample"] not in pillow_resample.FILTERS:
        raise Skip(f"the teacher's filter {inp['resample']} renders on the CPU on every device")
    layout = views.ViewRows(len(split), stored.per_image)
    params = (layout.grid(stored.boxes), layout.grid(stored.flips), inp["size"], inp["resample"])
    size_of = lambda j: tuple(int(x) for x in originals.index[j][2:0:-1])  # noqa: E731  (width, height)
    mixes = [views.sample_mixes(views.ViewPolicy(mixup=1.0), split.ids, i, stored.per_image - 1, size_of)
             for i in range(len(split))]
    mixes = views.Mixes(*(np.concatenate([getattr(m, f) for m in mixes]) for f in ("partners", "boxes", "flips",
                                                                                      "weights")))
    rows, b = np.arange(len(layout)), c.sizes["student_batch"]
    out = {"views": len(rows), "views_per_image": stored.per_image, "size": list(inp["size"]),
           "resample": inp["resample"], "mixed_views": int((mixes.weights > 0).sum())}
    for name, m in (("plain", None), ("mixed", mixes)):
        device = view_source.DeviceViewSource(originals.array, *params, c.device, m)
        on_device = np.concatenate([device.take(rows[i:i + b]).cpu().numpy() for i in range(0, len(rows), b)])
        diff = np.abs(on_device.astype(np.int16) - view_source.ViewSource(originals.image, *params, m).render(rows))
        out[name] = {"max_abs_diff": int(diff.max()), "pixels_differing": float((diff > 0).mean())}
    out["bit_equal"] = out["plain"]["max_abs_diff"] == 0 and out["mixed"]["max_abs_diff"] == 0
    return out


# ------------------------------------------------------------------------------------------ stage one


def decode(c: Check) -> dict:
    """Stage one's input path alone: TeacherInputs in a DataLoader as teacher_batches builds it."""
    split = c.dataset("train")
    processor = load_teacher(str(c.teacher_dir())).processor
    rows = np.arange(min(len(split), c.sizes["decode_images"]))
    spec = teacher_inputs.ViewSpec(c.sizes["views"], views.ViewPolicy(),
                                  views.processor_inputs(processor.to_dict(), "--teacher"))
    out = {"images": len(rows), "by_workers": {}, "with_views_by_workers": {}, "per_cpu_s_by_workers": {},
           "with_views_per_cpu_s_by_workers": {}}
    for w in c.workers:
        for key, view_spec in (("", None), ("with_views_", spec)):
            ips, per_cpu = _decode_rate(c, split, processor, rows, w, view_spec)
            out[f"{key}by_workers"][str(w)] = round(ips, 2)
            out[f"{key}per_cpu_s_by_workers"][str(w)] = round(per_cpu, 2)
    rates = out["by_workers"]
    one = rates.get("1")
    best_w = max(rates, key=lambda k: rates[k])
    out.update(images_per_s=rates[best_w], best_workers=int(best_w),
               per_worker_images_per_s=one, views_per_image=c.sizes["views"] + 1,
               scaling_over_1_worker={w: round(r / one, 3) for w, r in rates.items()} if one else None,
               note="teacher inputs/s (decode + processor, copied to the device); with_views: inputs incl. K "
                    "views; per_cpu_s: inputs per CPU second of the process and its workers (what a core delivers "
                    "on a shared machine)")
    return out


def _decode_rate(c: Check, split, processor, rows, workers: int, spec) -> tuple[float, float]:
    """(teacher inputs per wall second, per CPU second of this process and its workers)."""
    per_image = 1 if spec is None else spec.k + 1
    loader = torch.utils.data.DataLoader(
        teacher_inputs.TeacherInputs(split, processor, rows, spec), batch_size=max(1, c.sizes["teacher_batch"] // per_image),
        shuffle=False, num_workers=workers, collate_fn=teacher_inputs.collate, pin_memory=c.cuda,
        prefetch_factor=4 if workers else None)
    start, cpu0, inputs = time.perf_counter(), cpu_seconds(), 0
    for batch in loader:  # exhausting it joins the workers, so their CPU time is counted
        if "error" in batch:
            raise KdpipeError(batch["error"])
        inputs += len(batch["pixel_values"])
        batch["pixel_values"].to(c.device, non_blocking=True)
    sync(c.device)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    return inputs / wall, inputs / max(cpu, 1e-9)


def stage_one_vit(c: Check, precision: str) -> dict:
    if precision == "fp16" and not c.cuda:
        raise Skip("fp16 is for CUDA (runtime.resolve_precision refuses it on a CPU)")
    teacher = c.memo("vit-teacher", lambda: _load_prepared(c, c.vit_dir()))
    split = c.dataset("train")
    batches = c.memo("vit-batches", lambda: preprocess(teacher, split, c.sizes["teacher_batch"], c.device)[0])
    time_bare_forward(teacher.model, batches[:1], c.device, precision)  # warm-up: kernels of this precision
    bare = min(time_bare_forward(teacher.model, batches, c.device, precision) for _ in range(2))
    start = time.perf_counter()
    [report] = cache_teacher.run(CacheConfig(teacher=str(c.vit_dir()), dataset=str(c.folder()), splits=["train"],
                                             out=c.work / f"vit-cache-{precision}", device=c.args.device,
                                             precision=precision, batch_size=c.sizes["teacher_batch"], force=True))
    wall = time.perf_counter() - start
    n, bare_ips = len(split), len(split) / bare
    return {"images_per_s": report.images_per_s, "bare_forward_images_per_s": round(bare_ips, 2),
            "stage_one_over_bare": round(report.images_per_s / bare_ips, 4), "images": n,
            "batch_size": c.sizes["teacher_batch"], "workers": runtime.default_workers(c.device),
            "run_wall_s_incl_teacher_load": round(wall, 3),
            "teacher_parameters": sum(p.numel() for p in teacher.model.parameters())}


def _load_prepared(c: Check, folder: Path):
    teacher = load_teacher(str(folder))
    teacher.model = runtime.prepare_model(teacher.model, c.device)
    return teacher


def agreement(c: Check, precision: str) -> dict:
    if precision == "fp16" and not c.cuda:
        raise Skip("fp16 is for CUDA (runtime.resolve_precision refuses it on a CPU)")
    split = c.sizes["agree_split"]

    def cache(device: str, p: str, out: Path) -> np.ndarray:
        cache_teacher.run(CacheConfig(teacher=str(c.teacher_dir()), dataset=str(c.folder()), splits=[split], out=out,
                                      device=device, precision=p, batch_size=c.sizes["teacher_batch"]))
        return logit_store.read_split(logit_store.split_path(out, split))

    ref = c.memo("cpu-reference", lambda: cache("cpu", "fp32", c.work / "agree-cpu-fp32"))
    got = cache(c.args.device, precision, c.work / f"agree-{c.device.type}-{precision}")
    out = {"split": split, "images": len(ref.ids), **_compare(got, ref), "tolerance": TOLERANCE[precision],
           "reference": "the same teacher, CPU, fp32"}
    out["within_tolerance"] = out["max_abs_logit_diff"] <= TOLERANCE[precision]
    if precision == "bf16":  # bf16's own rounding, side by side: the CPU's bf16 cache against the same two
        cpu = c.memo("cpu-bf16", lambda: cache("cpu", "bf16", c.work / "agree-cpu-bf16"))
        out["vs_cpu_bf16"] = _compare(got, cpu)  # the same precision on both sides
        out["cpu_bf16_vs_cpu_fp32"] = _compare(cpu, ref)
    return out


def _compare(got, ref) -> dict:
    """Two caches of the same images, as inspect-cache --verify compares live and cached logits
    (cache_verify.compare_logits): max |Δlogit|, mean KL(ref || got) and argmax agreement."""
    if got.ids != ref.ids:
        raise RuntimeError("the two caches hold other images")
    m = cache_verify.compare_logits(np.array(got.logits), np.array(ref.logits), None)  # copies: the files' are read-only
    return {"max_abs_logit_diff": m["max_abs_diff"], "mean_kl": m["mean_kl"], "argmax_agreement": m["agreement"]}


# ------------------------------------------------------------------------------------------ stage two


def stage_two(c: Check, variant: str) -> dict:
    if variant == "compile" and not c.args.compile:
        raise Skip("--compile not given (default on a GPU only: a cold compile took ~76 s on a 2-core CPU)")
    cfg = c.train_config(variant, views=variant == "views", compile=variant == "compile",
                         **({"precision": "fp32"} if variant == "fp32" else {}))
    report = train_student.run(cfg)
    n = len(c.dataset("train"))
    per_epoch = [n / r["train_time_s"] for r in report.history]
    steady = per_epoch[1:] or per_epoch
    c._memo[f"run-{variant}"] = report
    return {"images_per_s": round(max(steady), 2), "first_epoch_images_per_s": round(per_epoch[0], 2),
            "per_epoch_images_per_s": [round(x, 2) for x in per_epoch], "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "precision": report.run["precision"], "images": n,
            "validation_accuracy": report.validation["accuracy"],
            "test_accuracy": report.test["accuracy"] if report.test else None,
            "note": "train images/s of the fastest epoch after the first (train_time_s in metrics.jsonl)"}


def bare_step(c: Check, variant: str) -> dict:
    """forward / KD loss / backward / AdamW step on pre-normalised device tensors, as fast as it gets."""
    compiled = variant == "compiled"
    if compiled and not c.args.compile:
        raise Skip("--compile not given (default on a GPU only: a cold compile took ~76 s on a 2-core CPU)")
    channels_last = compiled or variant.startswith("channels_last")
    precision = c.precision if compiled or variant.endswith("+autocast") else "fp32"
    split, u8, inp = c.dataset("train"), c.store(), c.inputs()
    n, b = len(split), c.sizes["student_batch"]
    torch.manual_seed(0)
    model = build_student(None, BEANS_LABELS, c.sizes["student_config"])
    model = runtime.prepare_model(model, c.device) if channels_last else model.to(c.device)
    forward = runtime.compile_model(model, c.device) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, n, b):
        x = pixels.normalise(torch.from_numpy(u8[start:start + b]).to(c.device), inp["mean_t"], inp["std_t"])
        batches.append((x if channels_last else x.contiguous(),
                        torch.from_numpy(split.labels[start:start + b]).to(c.device),
                        torch.randn(len(x), len(BEANS_LABELS), generator=g).to(c.device)))

    def one_pass():
        for x, labels, teacher_logits in batches:
            kd_step(forward, optimizer, x, labels, teacher_logits, c.device, precision, 5.0, 0.5)

    model.train()
    start = time.perf_counter()
    for x, labels, teacher_logits in batches[:2] + batches[-1:]:  # warm-up (a compiled model compiles for
        # the full batch and again for the smaller last one; timing that had measured 13 img/s on an H200)
        kd_step(forward, optimizer, x, labels, teacher_logits, c.device, precision, 5.0, 0.5)
    sync(c.device)
    warm = time.perf_counter() - start
    return {**c.timed(one_pass, n), "warm_up_s": round(warm, 3), "precision": precision,
            "channels_last": channels_last, "compiled": compiled, "batch_size": b, "images": n}


def resume_after_kill(c: Check) -> dict:
    """Kill -9 after the first checkpoint, --resume, compare with the uninterrupted run; reload on a CPU."""
    reference = c._memo.get("run-default")
    if reference is None:
        raise Skip("needs stage_two.train_student (the uninterrupted run)")
    cfg = c.train_config("killed", log_tensorboard=True)  # as the CLI runs it: --resume compares settings
    out = cfg.out
    flags = ["train-student", "--cache", cfg.cache, "--epochs", cfg.epochs, "--batch-size", cfg.batch_size,
             "--lr", cfg.lr, "--device", cfg.device, "--precision", cfg.precision, "--seed", cfg.seed, "--out", out]
    if cfg.student_config:
        flags += ["--student-config", ",".join(f"{k}={v}" for k, v in cfg.student_config.items())]
    env = subprocess_env()
    log = c.work / "killed.log"  # a file, not a pipe: a child blocked on a full pipe would never checkpoint
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "kdpipe", *map(str, flags)], cwd=c.work, env=env, stdout=f,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + c.subprocess_timeout()
        while proc.poll() is None and time.monotonic() < deadline and not (out / "checkpoint.pt").exists():
            time.sleep(0.005)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    if not killed or (out / "run.json").exists() or not (out / "checkpoint.pt").exists():
        raise RuntimeError(f"not killed after its first checkpoint (exit {proc.returncode}): "
                           f"{log.read_text().strip()[-300:]}")
    resumed = train_student.run(c.train_config("killed", log_tensorboard=True, resume=True))
    a = [r["train"]["loss"] for r in reference.history]
    b = [r["train"]["loss"] for r in resumed.history]
    rel = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
    cpu = evaluate.saved(out, "test", device="cpu")
    pipe = _pipeline_accuracy(out / "model", c.dataset("test"))
    return {"epochs_resumed": len(resumed.history), "max_rel_train_loss_diff": rel, "within_1e-5": rel <= 1e-5,
            "same_test_accuracy": resumed.test["accuracy"] == reference.test["accuracy"],
            "test_accuracy_device": resumed.test["accuracy"], "test_accuracy_cpu_evaluate": cpu["accuracy"],
            "test_accuracy_cpu_pipeline": pipe, "cpu_agrees": abs(cpu["accuracy"] - pipe) < 1e-9}


def _pipeline_accuracy(model_dir: Path, split) -> float:
    """The saved student through transformers.pipeline on the CPU, on raw decoded images."""
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(model_dir), device="cpu")
    names = [BEANS_LABELS[y] for y in split.labels]
    predicted = [r[0]["label"] for r in classify([split.image(i) for i in range(len(split))], top_k=1)]
    return sum(p == t for p, t in zip(predicted, names)) / len(names)


# ------------------------------------------------------------------------------------------- torchrun


def torchrun(c: Check, stage: str) -> dict:
    """A stage under torchrun, one process per GPU (at least 2), or with --device cpu 2 processes on gloo
    sharing the cores (so the launch, the sharding and the join run here too): stage one's cache against the
    one-process cache of stage_one's, stage two's accuracy beside the one-process run's (BatchNorm statistics
    are per process, so the two runs are not expected to be equal)."""
    n = min(torch.cuda.device_count(), 8) if c.cuda else 2
    if n < 2:
        raise Skip(f"needs >= 2 GPUs ({n} visible); --device cpu runs it on 2 CPU processes")
    env = subprocess_env()
    if not c.cuda:  # each process a share of the cores, not all of them each
        env["OMP_NUM_THREADS"] = str(max(1, runtime.cpu_cores() // n))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m", "kdpipe"]
    if stage == "cache_teacher":
        single = c.cache()
        out = c.work / "cache-torchrun"
        cmd = ["cache-teacher", "--teacher", c.teacher_dir(), "--dataset", c.folder(), "--out", out,
               "--device", c.device.type, "--batch-size", c.sizes["teacher_batch"]]
    else:
        cfg = c.train_config("torchrun")
        out = cfg.out
        cmd = ["train-student", "--cache", cfg.cache, "--epochs", cfg.epochs, "--batch-size", cfg.batch_size, "--lr",
               cfg.lr, "--seed", cfg.seed, "--device", c.device.type, "--out", out]
        if cfg.student_config:
            cmd += ["--student-config", ",".join(f"{k}={v}" for k, v in cfg.student_config.items())]
    start = time.perf_counter()
    done = subprocess.run([*launch, *map(str, cmd)], cwd=c.work, env=env, capture_output=True, text=True,
                          timeout=c.subprocess_timeout())
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"torchrun exit {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
    if stage == "train_student":
        run = json.loads((out / "run.json").read_text())
        one = c._memo.get("run-default")
        return {"processes": n, "images_per_s": run["train_images_per_s"], "wall_s_incl_start": round(wall, 2),
                "test_accuracy": run["test"]["accuracy"] if run.get("test") else None,
                "test_accuracy_one_process": one.test["accuracy"] if one is not None and one.test else None}
    diffs, rows = {}, 0
    for name, path in logit_store.cache_splits(single).items():
        a, b = logit_store.read_split(path), logit_store.read_split(logit_store.split_path(out, name))
        if a.ids != b.ids:
            raise RuntimeError(f"split {name}: the torchrun cache holds other ids than the one-process cache")
        diffs[name] = float(np.abs(a.logits - b.logits).max())
        rows += len(a.ids)
    return {"processes": n, "images_per_s": round(rows / wall, 2), "wall_s_incl_start": round(wall, 2),
            "max_abs_logit_diff_vs_one_process": diffs, "tolerance": TOLERANCE[c.precision],
            "within_tolerance": max(diffs.values()) <= TOLERANCE[c.precision]}


# ------------------------------------------------------------------------------------------- the report


def subprocess_env() -> dict:
    """This process's environment for a `python -m kdpipe` child, the repository first on its PYTHONPATH
    and the caller's own entries kept (kdpipe may be importable only through them)."""
    path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def plan() -> list[tuple]:
    """Every measurement in order of importance (the budget cuts from the end)."""
    steps = [("data_path.plain", data_path_plain, False), ("data_path.plain_host", data_path_plain, True),
             ("data_path.gather_host", data_path_plain, True, False),
             ("stage_one.decode", decode)]
    steps += [(f"stage_one.vit.{p}", stage_one_vit, p) for p in ("fp16", "bf16", "fp32")]
    steps += [(f"stage_one.agreement.{p}", agreement, p) for p in PRECISIONS]
    steps += [("stage_two.train_student", stage_two, "default")]
    steps += [(f"stage_two.bare.{v}", bare_step, v) for v in BARE_VARIANTS if v != "compiled"]
    steps += [("data_path.views", data_path_views),
              ("data_path.views_agreement", views_agreement),
              ("stage_two.train_student.views", stage_two, "views"), ("stage_two.resume", resume_after_kill),
              ("stage_two.train_student.fp32", stage_two, "fp32"),
              ("stage_two.bare.compiled", bare_step, "compiled"), ("stage_two.train_student.compile", stage_two, "compile"),
              ("torchrun.cache_teacher", torchrun, "cache_teacher"), ("torchrun.train_student", torchrun, "train_student")]
    return steps


def ratios(r: dict) -> dict:
    def ips(name):
        m = r.get(name, {})
        return m.get("images_per_s") if m.get("status") == "ok" else None

    def ratio(a, b):
        return round(a / b, 4) if a and b else None

    bare = ips("stage_two.bare.channels_last+autocast")
    out = {
        "train_student_over_bare_step": ratio(ips("stage_two.train_student"), bare),
        "views_over_no_views": ratio(ips("stage_two.train_student.views"), ips("stage_two.train_student")),
        "fp32_over_auto_precision_train_student": ratio(ips("stage_two.train_student.fp32"),
                                                        ips("stage_two.train_student")),
        "compile_speedup_train_student": ratio(ips("stage_two.train_student.compile"), ips("stage_two.train_student")),
        "compile_speedup_bare": ratio(ips("stage_two.bare.compiled"), bare),
        "channels_last_speedup_autocast": ratio(bare, ips("stage_two.bare.nchw+autocast")),
        "channels_last_speedup_fp32": ratio(ips("stage_two.bare.channels_last"), ips("stage_two.bare.nchw")),
        "autocast_speedup_channels_last": ratio(bare, ips("stage_two.bare.channels_last")),
        "data_path_over_bare_step": ratio(ips("data_path.plain"), bare),
        "view_batches_over_bare_step": ratio(ips("data_path.views"), bare),
    }
    for p in ("fp16", "bf16", "fp32"):
        m = r.get(f"stage_one.vit.{p}", {})
        out[f"stage_one_over_bare_forward_{p}"] = m.get("stage_one_over_bare") if m.get("status") == "ok" else None
    vit = [r[k]["bare_forward_images_per_s"] for k in ("stage_one.vit.fp16", "stage_one.vit.bf16")
           if r.get(k, {}).get("status") == "ok"]
    per_worker = r.get("stage_one.decode", {}).get("per_worker_images_per_s")
    out["decode_workers_to_feed_bare_vit"] = math.ceil(max(vit) / per_worker) if vit and per_worker else None
    return out


def table(c: Check, result: dict) -> None:
    rows = []
    for name, m in result["measurements"].items():
        ips = m.get("images_per_s")
        extra = {"stage_one.vit": "bare_forward_images_per_s", "stage_one.agreement": "max_abs_logit_diff"}
        note = m.get("error") or m.get("reason") or ""
        for prefix, key in extra.items():
            if name.startswith(prefix) and key in m:
                note = f"{key.replace('_', ' ')} {m[key]:.4g}" + (
                    f" (tol {m['tolerance']:g}: {'ok' if m['within_tolerance'] else 'OUTSIDE'})" if "tolerance" in m else "")
        if m.get("vs_cpu_bf16"):
            note += (f"; vs CPU bf16 {m['vs_cpu_bf16']['max_abs_logit_diff']:.3g}, CPU bf16 vs fp32 "
                     f"{m['cpu_bf16_vs_cpu_fp32']['max_abs_logit_diff']:.3g}")
        if name == "stage_one.decode" and m.get("by_workers"):
            note = "workers " + ", ".join(f"{w}: {v:.0f}" for w, v in m["by_workers"].items())
        if name == "stage_two.resume" and m["status"] == "ok":
            note = (f"loss rel diff {m['max_rel_train_loss_diff']:.1e}; test acc device "
                    f"{m['test_accuracy_device']:.3f}, cpu evaluate {m['test_accuracy_cpu_evaluate']:.3f}, "
                    f"cpu pipeline() {m['test_accuracy_cpu_pipeline']:.3f}")
        if name == "data_path.views_agreement" and m["status"] == "ok":
            note = (f"{m['views']} views: max |diff| {m['plain']['max_abs_diff']} plain, {m['mixed']['max_abs_diff']} "
                    f"mixed ({'bit-equal' if m['bit_equal'] else 'NOT bit-equal'})")
        if name == "torchrun.cache_teacher" and m["status"] == "ok":
            note = (f"{m['processes']} processes: max |Δlogit| vs one process "
                    f"{max(m['max_abs_logit_diff_vs_one_process'].values()):.3g} (tol {m['tolerance']:g})")
        rows.append([name, m["status"], f"{ips:,.1f}" if ips else "", m.get("peak_device_mib", ""),
                     m.get("seconds", ""), note[:140]])
    print_table(f"device check: {result['environment']['device']}, auto precision {c.precision}, mode {c.mode}",
                ["measurement", "status", "images/s", "peak MiB", "s", "note"], rows)
    print_table("ratios (side by side in this run)", ["ratio", "value"],
                [[k, v if v is not None else "-"] for k, v in result["ratios"].items()])
    ref_rows = []
    for ref in REFERENCES:
        ours = [f"{k}: {result['measurements'][k]['images_per_s']:,.0f}" for k in ref["compare"]
                if result["measurements"].get(k, {}).get("status") == "ok"]
        figure = "-".join(f"{x:,}" for x in ref["range"]) if "range" in ref else f"{ref['images_per_s']:,}"
        ref_rows.append([ref["what"], f"{figure} ({ref['hardware']})", "; ".join(ours) or "-"])
    print_table("public references (timm results CSVs) beside this run", ["reference", "images/s", "this run"],
                ref_rows)


def environment(c: Check) -> dict:
    env = {"device": runtime.describe(c.device), "device_type": c.device.type, "torch": torch.__version__,
           "cuda": torch.version.cuda, "cpu": cpu_info(), "platform": platform.platform(),
           "versions": runtime.versions(), "loadavg_1m_at_start": os.getloadavg()[0], "auto_precision": c.precision,
           "compile_problem": runtime.compile_problem(c.device)}
    if c.cuda:
        props = torch.cuda.get_device_properties(c.device)
        env.update(gpus=torch.cuda.device_count(), gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    return env


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.add_argument("--dataset", default=str(SHARED / "beans"), help="image folder (split/class/*.jpg)")
    p.add_argument("--teacher", default=str(SHARED / "teachers" / "beans-efficientnet-lite0"),
                   help="the real teacher: correctness and stage two's cache")
    p.add_argument("--tiny", action="store_true", help="generated images and tiny models: seconds on a CPU (the test)")
    p.add_argument("--images", type=int, default=None, help="first N train images (default: all on a GPU, 64 on a CPU)")
    p.add_argument("--epochs", type=int, default=None, help="train-student epochs (default 3 on a GPU, 2 otherwise)")
    p.add_argument("--batch-size", type=int, default=None, help="student batch (default 128 on a GPU)")
    p.add_argument("--teacher-batch-size", type=int, default=None, help="teacher batch (default 128 on a GPU)")
    p.add_argument("--decode-images", type=int, default=None, help="images per stage_one.decode timing (512 on a GPU)")
    p.add_argument("--workers", default=None, help="stage_one.decode worker counts, e.g. 0,1,2 (default up to the cores)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include the torch.compile measurements (default: on a GPU only)")
    p.add_argument("--only", default=None, help="comma-separated measurement names or prefixes to run")
    p.add_argument("--skip", default=None, help="comma-separated measurement names or prefixes to leave out")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no measurement after this many seconds (420: the last one ends within ~8 min)")
    p.add_argument("--json", type=Path, default=None,
                   help="output (default benchmarks/results/benchmarks/device_check_<device>.json; none with --tiny)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (caches, runs) and print its path")
    args = p.parse_args(argv)
    device = runtime.resolve_device(args.device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    json_path = args.json or (None if args.tiny else REPO / "benchmarks" / "results" / "benchmarks" /
                              f"device_check_{device.type}.json")
    if json_path is not None:  # absolute before the working directory changes
        json_path = Path(json_path).resolve()
        json_path.parent.mkdir(parents=True, exist_ok=True)
    if not args.tiny:
        args.dataset, args.teacher = str(Path(args.dataset).resolve()), str(Path(args.teacher).resolve())
    work = Path(tempfile.mkdtemp(prefix="kdpipe-device-check-"))
    cwd = os.getcwd()
    os.chdir(work)  # data/pixels and every default output folder go to the scratch folder
    try:
        c = Check(args, work)
        c.partial_json = json_path
        print(f"device check: {runtime.describe(c.device)}, mode {c.mode}, sizes {c.sizes}, budget {args.budget_s:g} s",
              flush=True)
        result = {"check": "device_check", "format": 1, "mode": c.mode, "argv": sys.argv[1:] if argv is None else argv,
                  "settings": {**c.sizes, "decode_workers": c.workers, "compile": args.compile,
                               "budget_s": args.budget_s, "tolerance": TOLERANCE},
                  "environment": environment(c)}
        for name, fn, *extra in plan():
            c.measure(name, fn, c, *extra)
        result["measurements"] = c.results
        result["ratios"] = ratios(c.results)
        result["references"] = [{**ref, "this_run": {k: c.results[k]["images_per_s"] for k in ref["compare"]
                                                     if c.results.get(k, {}).get("status") == "ok"}}
                                for ref in REFERENCES]
        result["peak_host_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        result["elapsed_s"] = round(c.elapsed(), 1)
        result["environment"]["loadavg_1m_at_end"] = os.getloadavg()[0]
        table(c, result)
        print(f"\n{result['elapsed_s']:.0f} s; peak host RSS {result['peak_host_rss_mib']:.0f} MiB")
    finally:
        os.chdir(cwd)
        if args.keep:
            print(f"scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if json_path is not None:
        files.write_text(json_path, json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {json_path}")
    return result


if __name__ == "__main__":
    try:
        main()
    except KdpipeError as e:  # bad flags or inputs: one line, as kdpipe's own commands
        sys.exit(f"error: {e}")
