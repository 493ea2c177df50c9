"""Load a fine-tuned teacher (hub id or `save_pretrained` folder) with its own image processor, and map
its labels onto a dataset's labels by name (or, asked for, by index where its names are generic)."""

from __future__ import annotations

import hashlib
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import hub
from .errors import CONFIG_ERRORS, KdpipeError, reason

if TYPE_CHECKING:  # imported where used: torch takes seconds to import
    import torch


@dataclass
class Teacher:
    model: torch.nn.Module  # eval mode
    processor: object  # the teacher's own AutoImageProcessor
    spec: str
    revision: str | None  # resolved commit hash for hub models, None for folders
    weights_sha256: str | None  # for local folders: what exactly was loaded
    label_names: list[str]  # in the teacher's output order

    @property
    def identity(self) -> dict:
        return {"spec": self.spec, "revision": self.revision, "weights_sha256": self.weights_sha256,
                "architecture": type(self.model).__name__, "label_names": self.label_names}


def load_teacher(spec: str, revision: str | None = None, trust_remote_code: bool = False) -> Teacher:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from . import demo
    from .data import looks_like_hub_id

    local = Path(demo.resolve(spec, "teacher")).expanduser()
    if not local.exists() and not looks_like_hub_id(spec):  # a path (./x, /x, ~/x, a/b/c), not an owner/name id
        raise KdpipeError(f"--teacher {spec}: no such folder; pass a save_pretrained folder or a Hub id "
                          "like owner/name")
    if local.exists() and not local.is_dir():
        raise KdpipeError(f"--teacher {spec}: a file; pass the save_pretrained folder that holds config.json and "
                          "the weights")
    if not local.is_dir():
        hub.require("--teacher", spec,
                    "a local save_pretrained folder, e.g. --teacher ../shared/teachers/beans-efficientnet-lite0")
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        with warnings.catch_warnings(record=True) as caught:  # shown on success only (a refusal is one line)
            model = AutoModelForImageClassification.from_pretrained(str(local) if local.is_dir() else spec, **kwargs)
            processor = AutoImageProcessor.from_pretrained(str(local) if local.is_dir() else spec, **kwargs)
    except OSError as e:
        if local.exists():
            raise KdpipeError(f"--teacher {spec}: not a loadable transformers checkpoint folder ({reason(e)})") from None
        raise KdpipeError(
            f"--teacher {spec}: could not load it from the Hugging Face Hub ({reason(e)}), and there is no "
            "local folder of that name; offline? pass a local save_pretrained folder, e.g. "
            "--teacher ../shared/teachers/beans-efficientnet-lite0"
        ) from None
    except pickle.UnpicklingError:
        raise KdpipeError(f"--teacher {spec}: its pickle checkpoint holds more than tensors, so it was refused "
                          "(read with torch.load(weights_only=True), nothing in it was run); use a safetensors "
                          "checkpoint from a source you trust") from None
    except CONFIG_ERRORS as e:
        hint = "; pass --trust-remote-code only if you trust that repository's code" if "trust_remote_code" in str(e) else ""
        raise KdpipeError(f"--teacher {spec}: {reason(e)}{hint}") from None
    except RuntimeError as e:
        what = ("its weights have other shapes than the model its config.json describes"
                if "mismatched_sizes" in str(e) else f"cannot load its weights ({reason(e)})")
        raise KdpipeError(f"--teacher {spec}: {what}; is config.json the one saved with these weights?") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    model.eval()
    names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    resolved = getattr(model.config, "_commit_hash", None) if not local.is_dir() else None
    return Teacher(model, processor, spec, resolved or (revision if not local.is_dir() else None),
                   _weights_sha256(local) if local.is_dir() else None, names)


def _weights_sha256(folder: Path) -> str | None:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _label_key(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def generic_names(names: list[str]) -> bool:
    """LABEL_0 ... LABEL_{n-1} in order: transformers' names for a config saved without id2label."""
    return names == [f"LABEL_{i}" for i in range(len(names))]


def label_mapping(teacher_names: list[str], dataset_names: list[str], by_index: bool = False) -> np.ndarray:
    """Column order that puts teacher logits in dataset label order: `teacher_logits[:, perm]`.

    Names are compared ignoring case and `_`/`-`/space differences; any other difference is refused
    (re-initialising the head, as `ignore_mismatched_sizes=True` does, would yield a useless teacher).
    `by_index` (--labels-by-index): a teacher with generic names (LABEL_i) whose count agrees is matched by
    position, output i to the dataset's class i; asked for, never assumed.
    """
    generic = generic_names(teacher_names) and len(teacher_names) == len(dataset_names)
    if by_index:
        if not generic:
            raise KdpipeError(f"--labels-by-index matches a teacher with generic labels (LABEL_0 ... LABEL_{{n-1}}) "
                              f"to as many dataset classes; {_describe_mismatch(teacher_names, dataset_names, str)}: "
                              "leave it out (labels are then matched by name)")
        return np.arange(len(dataset_names), dtype=np.int64)
    key = _label_key
    if len({key(n) for n in teacher_names}) < len(teacher_names) or len({key(n) for n in dataset_names}) < len(dataset_names):
        key = str  # names that differ only in case or separators ("leaf spot", "leaf_spot"): match exactly
    index = {key(n): i for i, n in enumerate(teacher_names)}
    if len(teacher_names) != len(dataset_names) or any(key(n) not in index for n in dataset_names):
        if generic:
            raise KdpipeError(f"{_describe_mismatch(teacher_names, dataset_names, key)}: the teacher's names are "
                              "generic (saved without id2label); if it was fine-tuned on these classes in this order, "
                              "pass --labels-by-index to match output i to class i (recorded in the cache)")
        raise KdpipeError(f"{_describe_mismatch(teacher_names, dataset_names, key)}; use a teacher fine-tuned on "
                          "these classes (labels are matched by name)")
    return np.array([index[key(n)] for n in dataset_names], dtype=np.int64)


def _describe_mismatch(teacher: list[str], dataset: list[str], key, show: int = 10) -> str:
    """Both lists when short; for large label sets, the counts and the names only one side has."""
    if len(teacher) + len(dataset) <= 2 * show:
        return f"teacher labels {teacher} do not match dataset labels {dataset}"
    t, d = {key(n) for n in teacher}, {key(n) for n in dataset}
    only_t, only_d = [n for n in teacher if key(n) not in d], [n for n in dataset if key(n) not in t]

    def some(names):
        return f"{names[:show]}{' and ' + str(len(names) - show) + ' more' if len(names) > show else ''}"
    return (f"teacher has {len(teacher)} labels, dataset {len(dataset)}; only the teacher has {some(only_t)}, "
            f"only the dataset has {some(only_d)}")
