"""Stage two: train a student against cached teacher logits. setup -> fit -> finish.

The teacher is never loaded here. The data comes from student_data.py (images decoded once into a uint8 store,
or views rendered when used); each step slices a batch, normalises it on the device and runs the student under
autocast in channels_last. The run folder's files are run_folder.py's; evaluate.py reloads a saved student.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import files, locking, loss, metrics, model_card, pixels, run_folder, runtime, student_data, views
from .config import TrainConfig
from .data import ImageDataset, left_out_note
from .errors import KdpipeError
from .evaluate import predict
from .logit_store import TopK
from .run_folder import RunReport, load_report
from .student import batchnorm_layers, initialise_student, save_student, set_bn_momentum
from .student_data import SharedData, SplitData

Progress = Callable[[str, int, int, str], None]  # (task, done, total, info)
LOG_EVERY = 25  # steps between host syncs for the live loss


@dataclass
class Setup:
    cfg: TrainConfig
    device: torch.device
    precision: str
    model: torch.nn.Module  # the student (uncompiled: its state_dict is what we save)
    forward: Callable  # the model, or its torch.compile'd version
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    splits: dict[str, SplitData]
    label_names: list[str]
    inputs: dict  # size, resample, mean, std: how pixels become the student's input
    out: Path
    provenance: dict
    generator: torch.Generator
    sources: dict = field(default_factory=dict)  # what it reads, by content (student_data.inputs_identity)
    history: list[dict] = field(default_factory=list)
    # per best-epoch rule (metrics.BEST_EPOCH_RULES): {"epoch", "state"}, the epoch it chooses so far and its weights
    # on the CPU (one copy when the rules agree); "state" None: weights an earlier kdpipe's checkpoint did not keep
    best: dict = field(default_factory=dict)
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (runtime.grad_scaler); None = plain steps
    rank: int = 0  # this process in a torchrun job (runtime.distributed), decided once at setup
    world: int = 1

    @property
    def main(self) -> bool:
        """The process that writes checkpoints, metrics, the model and run.json (rank 0; a process alone)."""
        return self.rank == 0


# --------------------------------------------------------------------------------------------- setup


def setup(cfg: TrainConfig, progress: Progress | None = None, shared: SharedData | None = None,
          announce: Callable[[str], None] | None = None) -> Setup:
    """Everything a run needs, decided once: its folder claimed, the seed set, the data loaded and checked against
    the cache (student_data.prepare), the student built (random init, after the seed), the model on its device
    with its optimiser, schedule and (under torchrun) DDP wrapper. `shared` lets a sweep's runs read the data
    once; `announce` gets a line for the user: the recipe, the student's resolution and why (once the data is
    opened: a refused --dataset or --cache prints nothing else)."""
    out = cfg.out_dir()
    run_folder.claim(out, cfg.resume)
    generator = runtime.seed_everything(cfg.seed)
    device = runtime.resolve_device(cfg.device)
    precision = runtime.resolve_precision(cfg.precision, device)
    runtime.configure_backends(device, precision)
    data = student_data.prepare(cfg, device, shared, progress, announce)
    model, init = initialise_student(cfg.student, data.dataset.label_names, data.resolution["student_config"])
    set_bn_momentum(model, cfg.bn_momentum)
    model = runtime.prepare_model(model, device)
    rank, world = runtime.distributed()
    steps = len(epoch_batches(torch.arange(len(data.splits[cfg.train_split])), cfg.batch_size, world))
    optimizer, scheduler = _optimizer(model, cfg, steps_per_epoch=steps)
    forward = runtime.compile_model(model, device) if cfg.compile else model
    if world > 1:  # data-parallel: gradients averaged across processes every step
        forward = torch.nn.parallel.DistributedDataParallel(forward, device_ids=[device] if device.type == "cuda" else None)
    provenance = {**_provenance(cfg, data.cache, data.dataset, device, precision), "student_init": init,
                  "student_resolution": {"size": data.resolution["size"], "reason": data.resolution["reason"]}}
    inputs = {**data.inputs, "size": data.eval_size, "train_size": data.inputs["size"]}  # evaluation at --eval-size
    return Setup(cfg, device, precision, model, forward, optimizer, scheduler, data.splits, data.dataset.label_names,
                 student_data.with_tensors(inputs, device), out, provenance, generator, sources=data.sources,
                 scaler=runtime.grad_scaler(device, precision), rank=rank, world=world)


def _optimizer(model, cfg: TrainConfig, steps_per_epoch: int):
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no decay on biases and norm scales
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _consistency(cfg: TrainConfig, cache: dict | None) -> dict:
    """Whether the student's inputs are the inputs the cached teacher logits belong to."""
    stored = cache[cfg.train_split].meta.get("augment") if cache and cfg.train_split in cache else None
    return {"views": bool(cfg.views), "stored_views": stored, "consistent": True}  # no online augmentation


def _data_warnings(cfg: TrainConfig, dataset: ImageDataset) -> dict:
    """run.json's record of what the data holds that a run should say: label issues accepted with
    --allow-label-issues, images shared by the train split and another, an image folder's files not used."""
    out = {}
    issues = student_data.label_issues(dataset, cfg.train_split)
    if text := student_data.describe_label_issues(issues, cfg.train_split):  # only reached with the flag
        out["label_issues"] = {**issues, "accepted": True, "flag": "--allow-label-issues",
                               "warning": f"trained with --allow-label-issues: {text}"}
    if shared := issues.get("images_in_train_and_another_split"):
        out["split_overlap"] = {**shared, "warning": f"{shared['pairs']} image(s) of --train-split {cfg.train_split} "
                                f"are also in another split (e.g. {shared['example']}): its score is flattered"}
    if note := left_out_note(dataset.spec, dataset.left_out):
        out["dataset_left_out"] = {"files": dataset.left_out[:100], "count": len(dataset.left_out), "warning": note}
    return out


def _provenance(cfg, cache, dataset: ImageDataset, device, precision) -> dict:
    out = {"config": cfg.to_dict(), "versions": runtime.versions(), "device": runtime.describe(device),
           "precision": precision, "processes": runtime.distributed()[1], "dataset": dataset.identity,
           "dataset_fingerprints": {n: s.fingerprint() for n, s in dataset.splits.items()},
           "consistency": _consistency(cfg, cache), **_data_warnings(cfg, dataset)}
    if cache is not None:
        meta = next(iter(cache.values())).meta
        out["cache"] = {"dir": str(cfg.cache), "teacher": meta["teacher"], "processor": meta["processor"],
                        "precision": meta["precision"],
                        "splits": {n: {"content_sha256": s.meta["content_sha256"],
                                       "dataset_fingerprint": s.meta["dataset_fingerprint"],
                                       "teacher_accuracy": s.meta["teacher_accuracy"]} for n, s in cache.items()}}
        changed = student_data.changed_images(cache, dataset)
        out["cache_matches_dataset_contents"] = not changed
        if changed:  # only reached with --allow-changed-data (_refuse_changed_images)
            out["changed_data"] = {"accepted": True, "flag": "--allow-changed-data", "splits": changed,
                                   "warning": f"trained with --allow-changed-data: {student_data.describe_changed(changed)}; "
                                              "the cached teacher logits of those examples belong to other pixels"}
    return out


# ----------------------------------------------------------------------------------------------- fit


def student_inputs(s: Setup, batch: dict) -> torch.Tensor:
    return pixels.normalise(batch["pixels"], s.inputs["mean_t"], s.inputs["std_t"])  # (B, 3, H, W)


def train_epoch(s: Setup, epoch: int, progress: Progress | None = None) -> dict:
    """One pass over the train split in batches of cfg.batch_size. Under torchrun each of N processes
    takes every N-th example of each batch (same order everywhere: same seed), DDP averages the
    gradients, and a final batch smaller than N is skipped so no process idles in a step."""
    cfg, data = s.cfg, s.splits[s.cfg.train_split]
    rank, world = s.rank, s.world
    s.model.train()
    if data.per_image > 1:  # this epoch's view of every image; its teacher targets come with it (consistent)
        data.view_of = torch.from_numpy(views.epoch_views(len(data), data.per_image, epoch, cfg.seed))
    order = torch.randperm(len(data), generator=s.generator)
    names = loss.LOSSES[cfg.loss].parts  # loss, ce, kd and the loss's own parts
    sums = torch.zeros(len(names) + 1, device=s.device)  # each part summed over examples, then the examples
    batches = epoch_batches(order, cfg.batch_size, world)  # the same on every process; each takes its share
    steps = len(batches)
    data.plan([b[rank::world] for b in batches])  # views rendered ahead, off this thread (view_source.ViewSource)
    bad_at = torch.full((len(names),), steps, dtype=torch.long, device=s.device)  # first non-finite step per part
    for step, whole in enumerate(batches):
        if world > 1 and len(whole) < world:
            continue
        batch = data.batch(whole[rank::world], s.device)
        parts = train_step(s, batch)
        n = len(batch["labels"])
        values = torch.stack([parts[k].detach().float() for k in names])
        bad_at = torch.where(torch.isfinite(values), bad_at, bad_at.clamp(max=step))  # on the device: no sync
        sums += torch.cat([values * n, torch.tensor([float(n)], device=s.device)])
        if step % LOG_EVERY == 0:  # a host sync every LOG_EVERY steps, as for the live loss
            _stop_if_non_finite(bad_at, names, epoch, steps, world)
        if progress and (step % LOG_EVERY == 0 or step == steps - 1):
            progress(f"epoch {epoch + 1}/{cfg.epochs}", step + 1, steps, f"loss {(sums[0] / sums[-1]).item():.4f}")
    _stop_if_non_finite(bad_at, names, epoch, steps, world)
    if world > 1:
        torch.distributed.all_reduce(sums)  # every process's examples
    return dict(zip(names, (sums[:-1] / sums[-1]).tolist()))


def epoch_batches(order: torch.Tensor, batch_size: int, world: int = 1) -> tuple[torch.Tensor, ...]:
    """`order` in batches of `batch_size`, except that a last batch too small to give every process two
    examples joins the one before it: BatchNorm in training mode cannot normalise one example whose feature
    map is 1 x 1 (MobileNetV2 below 64 px), so a train split of N = k * B + 1 crashed on its last step."""
    batches = order.split(batch_size)
    if len(batches) > 1 and len(batches[-1]) < 2 * world:
        batches = (*batches[:-2], torch.cat(batches[-2:]))
    return batches


def train_step(s: Setup, batch: dict) -> dict:
    """One optimiser step on one batch: the student's forward (under autocast), the configured loss
    against the batch's labels and cached teacher logits, backward, step; returns the loss's parts."""
    cfg = s.cfg
    x = student_inputs(s, batch)  # (B, 3, H, W)
    try:
        with runtime.autocast(s.device, s.precision):
            student_logits = s.forward(pixel_values=x).logits  # (B, C)
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        raise KdpipeError(f"--batch-size {cfg.batch_size}: BatchNorm in training mode cannot normalise a single example "
                          f"whose feature map is 1 x 1 (a student below 64 px); use at least 2 per batch "
                          f"and process") from None
    own = {s.field: getattr(cfg, s.field) for s in loss.LOSSES[cfg.loss].settings}  # e.g. dkd_beta
    parts = loss.compute(cfg.loss, student_logits, batch["labels"], batch.get("teacher_logits"),
                         temperature=cfg.temperature, alpha=cfg.alpha, standardize=cfg.standardize, **own)
    if s.scaler is not None:  # fp16: scaled backward, unscaled (or skipped) step
        s.scaler.scale(parts["loss"]).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        parts["loss"].backward()
        s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return parts


def _stop_if_non_finite(bad_at: torch.Tensor, names: tuple, epoch: int, steps: int, world: int) -> None:
    """Stop the run when a loss term was inf or NaN at some step so far (`bad_at`: per part of the loss, the
    first such step, `steps` if none), naming the epoch, the step and the terms; the epoch is not
    checkpointed, so nothing non-finite reaches the checkpoint, metrics.jsonl or the saved student."""
    if world > 1:  # every process stops alike (the same steps on all)
        torch.distributed.all_reduce(bad_at, op=torch.distributed.ReduceOp.MIN)
    first = int(bad_at.min())
    if first >= steps:
        return
    terms = [k for k, at in zip(names, bad_at.tolist()) if at == first and k != "loss"] or ["loss"]
    raise KdpipeError(f"the loss became non-finite at epoch {epoch + 1}, step {first + 1} of {steps} "
                      f"({'term' if len(terms) == 1 else 'terms'}: {', '.join(terms)}); the run stopped and nothing "
                      "of this epoch was written (an earlier epoch's checkpoint is kept): lower --lr, raise -T, "
                      "or use --precision fp32")


@torch.no_grad()
def recompute_bn_stats(s: Setup) -> None:
    """Precise BatchNorm (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): set every BN layer's
    running mean/variance to the exact mean/unbiased variance of its inputs over the whole train split,
    with the model in train mode (the activations it trains on) and the training batch size."""
    layers = batchnorm_layers(s.model)
    if not layers:
        return
    batches = {m: [] for m in layers}  # per batch: (count, mean, variance) per channel

    def hook(module, args):
        x = args[0].detach().float()  # (B, C, H, W)
        dims = [d for d in range(x.ndim) if d != 1]
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        batches[module].append((x.numel() // x.shape[1], mean.double(), var.double()))

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    data = s.splits[s.cfg.train_split]
    chunks = epoch_batches(torch.arange(len(data)), s.cfg.batch_size)
    data.plan(list(chunks))
    s.model.train()
    # fork_rng: dropout draws in these forwards must not change the training run's random stream
    try:
        with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []), \
                runtime.autocast(s.device, s.precision):
            for rows in chunks:
                s.model(pixel_values=student_inputs(s, data.batch(rows, s.device)))
    finally:
        for h in handles:
            h.remove()
    for m, parts in batches.items():
        mean, var = _pooled_mean_var(parts)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))


def _pooled_mean_var(parts: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and unbiased variance of the union of batches from their (count, mean, biased var):
    M2 = sum_b n_b * (var_b + (mean_b - mean)^2)."""
    n = sum(c for c, _, _ in parts)
    mean = sum(c * mu for c, mu, _ in parts) / n
    m2 = sum(c * (v + (mu - mean) ** 2) for c, mu, v in parts)
    return mean, m2 / max(1, n - 1)


def evaluate_split(s: Setup, name: str) -> tuple[dict, np.ndarray]:
    data = s.splits[name]
    net = s.forward.module if isinstance(s.forward, torch.nn.parallel.DistributedDataParallel) else s.forward
    logits = predict(net, data, s.device, s.precision, s.inputs)  # every process evaluates the whole split
    teacher = data.teacher_logits
    teacher = teacher.dense() if isinstance(teacher, TopK) else teacher.cpu().numpy() if teacher is not None else None
    return metrics.classification_report(logits, data.labels.cpu().numpy(), teacher), logits


def fit(s: Setup, progress: Progress | None = None, on_epoch: Callable[[dict], None] | None = None) -> None:
    """Train the remaining epochs; after each: (precise BN), validate, keep the best, checkpoint."""
    board = _tensorboard(s)
    try:
        _fit_epochs(s, progress, on_epoch, board)
    finally:
        if board is not None:
            board.close()
            if sys.exc_info()[0] is not None and not (s.out / run_folder.CHECKPOINT).exists():
                shutil.rmtree(s.out / run_folder.TENSORBOARD, ignore_errors=True)  # stopped before a first checkpoint


def _fit_epochs(s: Setup, progress, on_epoch, board) -> None:
    for epoch in range(len(s.history), s.cfg.epochs):
        start = time.perf_counter()
        train = train_epoch(s, epoch, progress)
        train_time = time.perf_counter() - start
        if s.cfg.precise_bn:
            recompute_bn_stats(s)
        val, _ = evaluate_split(s, s.cfg.val_split)
        record = {"epoch": epoch + 1, "lr": s.scheduler.get_last_lr()[0], "train": train, "validation": val,
                  "train_time_s": round(train_time, 3), "epoch_time_s": round(time.perf_counter() - start, 3),
                  "train_images_per_s": round(len(s.splits[s.cfg.train_split]) / train_time, 2)}
        s.history.append(record)
        keep_best(s)
        if s.main:
            run_folder.write_checkpoint(s.out, checkpoint_state(s), s.history)
        if board is not None:
            _log_scalars(board, record)
        if on_epoch:
            on_epoch(record)


def keep_best(s: Setup) -> None:
    """After an epoch: each rule's choice so far; a rule that now chooses this epoch keeps its weights. (A rule's
    choice over one more epoch is its earlier choice or the new epoch: each is the best of an order.)"""
    validation = [r["validation"] for r in s.history]
    state = None
    for rule in metrics.BEST_EPOCH_RULES:
        if metrics.best_epoch(validation, rule) == len(s.history):
            state = state or _cpu_state(s.model)
            s.best[rule] = {"epoch": len(s.history), "state": state}


def _other_rule(rule: str) -> str:
    return next(r for r in metrics.BEST_EPOCH_RULES if r != rule)


def _tensorboard(s: Setup):
    """A SummaryWriter on `<out>/tensorboard` when asked for and the `tensorboard` extra is installed.
    On --resume, events after the resumed epoch (from the interrupted attempt) are purged."""
    if not s.cfg.log_tensorboard or not s.main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the optional extra is absent: metrics.jsonl has everything
        return None
    return SummaryWriter(str(s.out / run_folder.TENSORBOARD), purge_step=len(s.history) + 1)


def _log_scalars(board, record: dict) -> None:
    step = record["epoch"]
    for part, value in record["train"].items():
        board.add_scalar(f"train/{part}", value, step)
    for key, value in record["validation"].items():
        if key != "n" and isinstance(value, (int, float)):
            board.add_scalar(f"validation/{key}", value, step)
    board.add_scalar("lr", record["lr"], step)
    board.add_scalar("train/images_per_s", record["train_images_per_s"], step)
    board.flush()


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ checkpoint and outputs


def checkpoint_state(s: Setup) -> dict:
    """Everything needed to resume after this epoch (run_folder.write_checkpoint writes it)."""
    return {"model": _cpu_state(s.model), "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict(), "generator": s.generator.get_state(),
            "torch_rng": torch.get_rng_state(),  # dropout draws from the global generator
            "device_rng": runtime.device_rng_state(s.device),  # ... or, on a GPU, from the GPU's
            "scaler": s.scaler.state_dict() if s.scaler is not None else {},
            "best": s.best,  # per rule: its epoch and weights (shared tensors are saved once)
            "config": s.cfg.to_dict(), "inputs": s.sources, "history": json.dumps(s.history)}


def resume(s: Setup) -> bool:
    """Load the last checkpoint of `s.out` into `s`; False when there is none."""
    path = s.out / run_folder.CHECKPOINT
    if not path.exists():
        return False
    state = run_folder.read_checkpoint(path)
    run_folder.refuse_other_settings(s.cfg, dict(state["config"]), s.out)
    _refuse_other_inputs(state.get("inputs"), s.sources, s.out)  # None: a checkpoint from before
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    s.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    runtime.set_device_rng_state(s.device, state.get("device_rng"))  # None from a CPU run; absent in older checkpoints
    if s.scaler is not None and state.get("scaler"):
        s.scaler.load_state_dict(state["scaler"])
    s.history = json.loads(state["history"])  # the checkpoint's own, never ahead of or behind its weights
    s.best = state["best"] if "best" in state else _earlier_best(state, s.history)
    return True


def _earlier_best(state: dict, history: list[dict]) -> dict:
    """The rules' choices from a checkpoint of a kdpipe before --best-epoch, which kept the weights of the first
    epoch with the best validation accuracy only: the nll rule's, if it chooses another epoch, are gone."""
    first = {"epoch": state["best_epoch"], "state": state["best_state"]}
    nll = metrics.best_epoch([r["validation"] for r in history], "nll")
    return {"first": first, "nll": first if nll == first["epoch"] else {"epoch": nll, "state": None}}


def _refuse_other_inputs(then: dict | None, now: dict, out: Path) -> None:
    """--resume with the same flags but a cache rebuilt in place (cache-teacher --force) or changed data would
    train the remaining epochs on other targets than the first ones."""
    if then is None or then == now:
        return
    what = [f"{kind} split {name!r}" for kind in ("cache", "dataset")
            for name in sorted(set(then[kind] or {}) | set(now[kind] or {}))
            if (then[kind] or {}).get(name) != (now[kind] or {}).get(name)]
    raise KdpipeError(f"--resume: {out} was started on other inputs ({', '.join(what)} changed since); resuming would "
                      "train the remaining epochs on other targets: restore them, or train again in another --out")


def finish(s: Setup, wall_time: float) -> RunReport:
    """Load the epoch --best-epoch chooses, evaluate it on test, save its predictions per image, the student and
    run.json. (Its validation metrics are those recorded after that epoch: same weights, same BN statistics.)
    Test is also measured at the other rule's epoch, for run.json only: reported, never used to choose."""
    chosen, other = s.best[s.cfg.best_epoch], s.best[_other_rule(s.cfg.best_epoch)]
    if chosen["state"] is None:
        raise KdpipeError(f"--resume: {s.out} was started by an earlier kdpipe, whose checkpoint kept only epoch "
                          f"{other['epoch']}'s weights (the first with the best validation accuracy); --best-epoch "
                          f"{s.cfg.best_epoch} chooses epoch {chosen['epoch']}, whose weights are gone: finish it with "
                          "--resume --best-epoch first (nothing is trained again), or train again in another --out")
    other_test = None
    if s.cfg.test_split and other["state"] is not None and other["epoch"] != chosen["epoch"]:
        s.model.load_state_dict(other["state"])
        other_test = evaluate_split(s, s.cfg.test_split)[0]
    s.model.load_state_dict(chosen["state"])
    val = s.history[chosen["epoch"] - 1]["validation"]
    test = confusion = None
    logits = {}  # split -> (N, C) the chosen epoch's logits
    if s.cfg.test_split:
        test, logits[s.cfg.test_split] = evaluate_split(s, s.cfg.test_split)
        labels = s.splits[s.cfg.test_split].labels.cpu().numpy()
        confusion = metrics.confusion_matrix(logits[s.cfg.test_split].argmax(1), labels, len(s.label_names)).tolist()
        other_test = test if other["epoch"] == chosen["epoch"] else other_test
    if not s.main:  # another process of the job: wait for the first to write everything
        torch.distributed.barrier()
        return load_report(s.out)
    logits[s.cfg.val_split] = evaluate_split(s, s.cfg.val_split)[1]  # the logits behind `val`, kept per image
    run_folder.write_predictions(s.out, {name: _predictions_table(s, name, split_logits)
                                         for name, split_logits in logits.items()})
    try:
        with files.replacing(s.out / run_folder.MODEL) as tmp:
            save_student(s.model.to(memory_format=torch.contiguous_format), tmp, s.inputs["size"], s.inputs["mean"],
                         s.inputs["std"], s.inputs["resample"])
            run = _run_record(s, val, test, confusion, files.sha256(tmp / "model.safetensors"), wall_time, other_test)
            (tmp / "README.md").write_text(model_card.render(run, s.out.name))  # the Hub's model card, inside model/
        files.write_json(s.out / run_folder.RUN_JSON, run)
    except OSError as e:  # a full disk at the very end: the last checkpoint holds every epoch
        raise KdpipeError(f"cannot write the trained student in {s.out}: {e.strerror or e}; free space and rerun with "
                          "--resume (the last epoch's checkpoint is kept: nothing is trained again)") from None
    for name in (run_folder.CHECKPOINT, run_folder.SUMS):  # the run is complete; model/ is the result
        (s.out / name).unlink(missing_ok=True)
    if s.world > 1:
        torch.distributed.barrier()
    return RunReport(s.out, chosen["epoch"], val, test, confusion, s.label_names, wall_time, s.history, run)


def _predictions_table(s: Setup, split: str, logits: np.ndarray):
    """One split's predictions per image at the chosen epoch, with what made them (run_folder.predictions_table)."""
    data = s.splits[split]
    meta = {"split": split, "epoch": s.best[s.cfg.best_epoch]["epoch"], "best_epoch_rule": s.cfg.best_epoch,
            "label_names": s.label_names,
            "run": s.out.name, "seed": s.cfg.seed, "dataset_fingerprint": s.provenance["dataset_fingerprints"].get(split)}
    return run_folder.predictions_table(data.ids, data.labels.cpu().numpy(), logits, meta)


def _run_record(s: Setup, val: dict, test: dict | None, confusion: list | None, weights_sha256: str,
                wall_time: float, other_test: dict | None) -> dict:
    """run.json: the results, the saved student and the provenance gathered at setup."""
    epochs = s.history
    train_images = len(s.splits[s.cfg.train_split]) * len(epochs)
    return {**s.provenance, "status": "complete", "seed": s.cfg.seed, "best_epoch": s.best[s.cfg.best_epoch]["epoch"],
            "best_epoch_rule": _rule_record(s, other_test),
            "validation": val, "test": test, "test_confusion_matrix": confusion, "label_names": s.label_names,
            "student": {"architecture": type(s.model).__name__,
                        "parameters": sum(p.numel() for p in s.model.parameters()), "weights_sha256": weights_sha256,
                        "inputs": {k: s.inputs[k] for k in ("size", "train_size", "resample", "mean", "std")}},
            "predictions": {name: files.sha256(run_folder.predictions_path(s.out, name))
                            for name in (s.cfg.val_split, s.cfg.test_split) if name},
            "epoch_time_s": [r["epoch_time_s"] for r in epochs],
            "train_images_per_s": round(train_images / sum(r["train_time_s"] for r in epochs), 2),
            "total_time_s": round(wall_time, 2),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _rule_record(s: Setup, other_test: dict | None) -> dict:
    """How the epoch was chosen: the rule, its epoch, how many epochs tied on the best validation accuracy, and
    the other rule's epoch with the test metrics there (null without a test split, or where an earlier kdpipe's
    checkpoint did not keep its weights): reported for comparison, never used to choose."""
    rule, other = s.cfg.best_epoch, _other_rule(s.cfg.best_epoch)
    return {"rule": rule, "epoch": s.best[rule]["epoch"], "tied": metrics.tied_epochs([r["validation"] for r in s.history]),
            "other_rule": other, "other_rule_epoch": s.best[other]["epoch"], "test_at_other_rule_epoch": other_test}


def as_started(cfg: TrainConfig) -> TrainConfig:
    """The run as it trains: resumed, one started before recipes keeps its defaults of then."""
    return cfg.as_started(run_folder.saved_config(cfg.out_dir())) if cfg.resume else cfg


def run(cfg: TrainConfig, progress: Progress | None = None, on_epoch: Callable[[dict], None] | None = None,
        shared: SharedData | None = None, announce: Callable[[str], None] | None = None) -> RunReport:
    """setup -> (resume) -> fit -> finish. A finished run with --resume returns its saved report."""
    start = time.perf_counter()
    cfg = as_started(cfg)
    finished = cfg.out_dir() / run_folder.RUN_JSON
    if cfg.resume and finished.exists():  # nothing to train: its report, if these are its settings
        report = load_report(cfg.out_dir())
        run_folder.refuse_other_settings(cfg, report.run.get("config", {}), cfg.out_dir())
        return report
    if runtime.distributed()[1] > 1:
        runtime.start_distributed(runtime.resolve_device(cfg.device))
    with locking.exclusive_for_job(cfg.out_dir()):
        s = setup(cfg, progress, shared, announce)
        earlier = 0.0  # seconds the interrupted attempts spent on the epochs resumed from
        if cfg.resume and resume(s):
            earlier = sum(r["epoch_time_s"] for r in s.history)
        fit(s, progress, on_epoch)
        return finish(s, time.perf_counter() - start + earlier)


