"""A train-student run folder and its files. What a folder holds while training: checkpoint.pt (everything
needed to resume, after every epoch) with checkpoint.sha256, metrics.jsonl (one line per epoch); when
complete: run.json (results and provenance), model/ (the student, save_pretrained + model card) and
predictions/<split>.parquet (the chosen epoch's logits per image on validation and test), and the checkpoint
is removed. Every file is replaced whole (files.py). train_student decides what goes in them."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import files, locking
from .config import TrainConfig, comparable
from .errors import KdpipeError

CHECKPOINT, SUMS, METRICS, RUN_JSON, MODEL = "checkpoint.pt", "checkpoint.sha256", "metrics.jsonl", "run.json", "model"
TENSORBOARD, PREDICTIONS, ONNX = "tensorboard", "predictions", "onnx"  # onnx/: written by kdpipe export
RUN_FILES = (CHECKPOINT, SUMS, METRICS, RUN_JSON, MODEL, TENSORBOARD, PREDICTIONS, ONNX)  # what a run folder may hold
PREDICTIONS_KEY = b"kdpipe"  # the predictions files' JSON metadata, as in a cache's files


def claim(out: Path, resume: bool) -> None:
    """Make `out` this run's folder: a new or empty one, or (with --resume) a run's; never anything else."""
    held = sorted(p.name for p in out.iterdir() if p.name != locking.LOCK_NAME) if out.is_dir() else []
    if held and not set(held) & set(RUN_FILES):  # a cache, a sweep, someone's documents: never written into
        raise KdpipeError(f"--out {out} is not a train-student run folder (it holds {', '.join(held[:3])}"
                          f"{', ...' if len(held) > 3 else ''}), so there is no run to --resume there; choose a new or "
                          "empty --out")
    if held and not resume:
        raise KdpipeError(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def write_checkpoint(out: Path, state: dict, history: list[dict]) -> None:
    """`state` (torch.save'able, weights_only) to checkpoint.pt and `history` to metrics.jsonl, each replaced
    whole. checkpoint.sha256 lists the digests a valid checkpoint.pt may have (the new one first, then the
    one it replaces, so a crash between the two renames is not mistaken for corruption)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path, sums = out / CHECKPOINT, out / SUMS
    before = sums.read_text() if sums.exists() else None
    previous = before.split()[:1] if before else []
    try:
        files.write_text(sums, "\n".join([hashlib.sha256(data).hexdigest(), *previous]) + "\n")
        files.write_bytes(path, data, fsync=True)
        files.write_text(out / METRICS, "".join(files.json_text(record) + "\n" for record in history))
    except OSError as e:
        if not path.exists() or (before is not None and files.sha256(path) in before.split()):
            _restore(sums, before)  # the new checkpoint did not land: the digests are those of the one there
        fix = "free space and --resume" if before is not None else \
            "free space and run the same command again (no epoch was saved: it starts from epoch 1)"
        raise KdpipeError(f"cannot write checkpoint in {out}: {e.strerror or e}; {fix}") from None


def _restore(path: Path, text: str | None) -> None:
    """Put back a small file as it was (None: absent), on a best-effort basis: the disk may still be full."""
    try:
        if text is None:
            path.unlink(missing_ok=True)
        else:
            files.write_text(path, text)
    except OSError:
        pass


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint after checking its digest; never unpickles arbitrary objects (weights_only)."""
    data = path.read_bytes()
    sums = path.with_name(SUMS)
    fix = f"delete {path} to restart the run from epoch 1, or choose another --out"
    if not sums.exists() or hashlib.sha256(data).hexdigest() not in sums.read_text().split():
        raise KdpipeError(f"{path} does not match its checksum (corrupted or edited); {fix}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a valid digest of an unreadable file: written by something else
        raise KdpipeError(f"{path} cannot be read ({type(e).__name__}); {fix}") from None


def refuse_other_settings(cfg: TrainConfig, saved: dict, out: Path) -> None:
    """--resume continues a run (interrupted or finished) only with the settings it was started with."""
    now = comparable(cfg.to_dict(), saved)
    ignored = ("resume", "out", "device", "allow_changed_data", "allow_outside_images",  # where it runs;
               "allow_label_issues")  # permissions
    differs = [k for k in now if k not in ignored and saved.get(k) != now[k]]
    if differs:
        raise KdpipeError(f"--resume: {out} was started with other settings ({', '.join(differs)}); "
                          "use the same flags, or another --out")


def saved_config(out: Path) -> dict | None:
    """The settings a run in `out` was started with (its run.json, else its checkpoint); None if none."""
    if (Path(out) / RUN_JSON).exists():
        return load_report(out).run.get("config", {})
    if (Path(out) / CHECKPOINT).exists():
        return dict(read_checkpoint(Path(out) / CHECKPOINT)["config"])
    return None


@dataclass
class RunReport:
    out: Path
    best_epoch: int
    validation: dict
    test: dict | None
    confusion_matrix: list | None
    label_names: list[str]
    wall_time_s: float
    history: list[dict]
    run: dict  # the run.json contents


def read_history(out: Path) -> list[dict]:
    """metrics.jsonl: one record per finished epoch, in order."""
    return [json.loads(line) for line in (Path(out) / METRICS).read_text().splitlines() if line.strip()]


def load_report(out: Path) -> RunReport:
    """The report of a complete run, from its run.json and metrics.jsonl."""
    try:
        r = json.loads((Path(out) / RUN_JSON).read_text())
        history = read_history(out)
        assert isinstance(r, dict) and {"best_epoch", "validation", "test", "test_confusion_matrix", "label_names",
                                         "total_time_s"} <= r.keys()
    except (OSError, ValueError, AssertionError) as e:
        raise KdpipeError(f"{out}: its run.json or metrics.jsonl is missing or damaged "
                          f"({type(e).__name__}); train it again in another --out") from None
    return RunReport(Path(out), r["best_epoch"], r["validation"], r["test"], r["test_confusion_matrix"],
                     r["label_names"], r["total_time_s"], history, r)




@dataclass(frozen=True)
class Predictions:
    """A run's per-image predictions on one split at its chosen epoch (predictions/<split>.parquet)."""
    ids: list[str]  # the dataset's example ids, as in the cache
    labels: np.ndarray  # (N,) int64
    logits: np.ndarray  # (N, C) float32, the student's raw logits
    epoch: int  # the epoch whose weights made them (run.json's best_epoch)

    @property
    def correct(self) -> np.ndarray:
        """(N,) bool: whether the student's top class is the label."""
        return self.logits.argmax(1) == self.labels


def predictions_path(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / PREDICTIONS / f"{split}.parquet"


def predictions_table(ids: list[str], labels: np.ndarray, logits: np.ndarray, meta: dict) -> pa.Table:
    """One split's predictions as a table: id (string), label (int64), logits (list<float32>), and `meta`
    (JSON) under the key b"kdpipe" with n and num_labels added."""
    n, c = logits.shape  # (N, C)
    values = pa.array(np.ascontiguousarray(logits, dtype=np.float32).ravel(), pa.float32())
    column = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * c), values)
    meta = {**meta, "n": n, "num_labels": c}
    schema = pa.schema([("id", pa.string()), ("label", pa.int64()), ("logits", pa.list_(pa.float32()))],
                       metadata={PREDICTIONS_KEY: json.dumps(meta, sort_keys=True).encode()})
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(np.asarray(labels, np.int64)), column],
                                schema=schema)


def write_predictions(folder: Path, tables: dict[str, pa.Table]) -> None:
    """predictions/ with one <split>.parquet per table, replaced as a whole (one rename)."""
    with files.replacing(Path(folder) / PREDICTIONS) as tmp:
        tmp.mkdir()
        for split, table in tables.items():
            pq.write_table(table, tmp / f"{split}.parquet")


def read_predictions(run_dir: Path, split: str) -> Predictions:
    """The chosen epoch's predictions of a finished run on `split` (validation or test)."""
    path = predictions_path(run_dir, split)
    if not path.is_file():
        raise KdpipeError(f"{path} is missing: the run kept no predictions on split {split!r} (a run from before "
                          "kdpipe kept them, or one without that split); train it again to have them")
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[PREDICTIONS_KEY])
        logits = table.column("logits").combine_chunks()
        n, c = int(meta["n"]), int(meta["num_labels"])
        values = logits.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        assert table.num_rows == n and len(values) == n * c and meta["split"] == split
        return Predictions(table.column("id").to_pylist(), table.column("label").to_numpy().astype(np.int64),
                           values.reshape(n, c), int(meta["epoch"]))
    except (OSError, ValueError, KeyError, TypeError, AssertionError, pa.ArrowException) as e:
        raise KdpipeError(f"{path} is damaged ({type(e).__name__}); train the run again in another --out") from None
