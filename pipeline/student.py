"""Build, adjust and save the student."""

from __future__ import annotations

import contextlib
import difflib
from pathlib import Path

import torch

from . import hub
from .errors import CONFIG_ERRORS, KdpipeError, reason


def student_config(spec: str | None, overrides: dict | None = None, label_names: list[str] | None = None):
    """The student's config, checked before any weights exist: MobileNetV2's defaults when `spec` is None, else
    the checkpoint's (hub id or folder); `overrides` (config fields, e.g. depth_multiplier, image_size) applied,
    a field the config does not have refused; `label_names` for a fresh head."""
    from transformers import AutoConfig, MobileNetV2Config

    labels = {} if label_names is None else {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                                              "label2id": {n: i for i, n in enumerate(label_names)}}
    overrides = dict(overrides or {})
    with _load_errors(spec, overrides):
        if spec is None:
            _refuse_unknown(MobileNetV2Config(), overrides)
            return MobileNetV2Config(**labels, **overrides)
        if not Path(spec).expanduser().is_dir():
            hub.require("--student", spec, "a local save_pretrained folder, or leave --student unset for MobileNetV2 "
                        "from scratch")
        _refuse_unknown(AutoConfig.from_pretrained(spec), overrides)
        return AutoConfig.from_pretrained(spec, **labels, **overrides)


def build_student(spec: str | None, label_names: list[str], overrides: dict | None = None) -> torch.nn.Module:
    """MobileNetV2 from random init (the guide's student) when `spec` is None, else any
    AutoModelForImageClassification checkpoint (hub id or folder) with a fresh head for `label_names`;
    `overrides` as student_config takes them."""
    return initialise_student(spec, label_names, overrides)[0]


def initialise_student(spec: str | None, label_names: list[str],
                       overrides: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """build_student's model and how it was initialised, for run.json: {"from": "random"}, or {"from": spec,
    "reinitialised": [...]}, the checkpoint's weights not loaded as they are but drawn afresh: those whose shape
    changed (a head for other labels, position embeddings for another image_size) or that it lacks."""
    from transformers import AutoModelForImageClassification, MobileNetV2ForImageClassification

    config = student_config(spec, overrides, label_names)
    with _load_errors(spec, overrides):
        if spec is None:
            return MobileNetV2ForImageClassification(config), {"from": "random"}
        # A new label set needs a new head: only layers whose shape changes are re-initialised.
        model, info = AutoModelForImageClassification.from_pretrained(spec, config=config, ignore_mismatched_sizes=True,
                                                                      output_loading_info=True)
    changed = {k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys", [])}
    return model, {"from": spec, "reinitialised": sorted(changed | set(info.get("missing_keys", [])))}


@contextlib.contextmanager
def _load_errors(spec: str | None, overrides: dict):
    """What transformers raises while loading or configuring the student, as one line naming the flag."""
    try:
        yield
    except OSError as e:
        raise KdpipeError(f"--student {spec}: cannot load it ({reason(e)}); offline? pass a local "
                          "save_pretrained folder, or leave --student unset for MobileNetV2 from scratch") from None
    except CONFIG_ERRORS as e:
        raise KdpipeError(f"--student-config {overrides}: {reason(e)}") from None


def _refuse_unknown(config, overrides: dict) -> None:
    """A key the config does not have would be stored on it and ignored: a misspelt field would train the
    default silently."""
    fields = [k for k in config.to_dict() if not k.startswith("_")]
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]}?" if close else f"its fields: {', '.join(sorted(fields))}"
            raise KdpipeError(f"--student-config {key}: not a field of {type(config).__name__}; {hint}")


MOBILENET_SIZE = 224  # MobileNetV2Config's image_size, and the size of a config that names none


def image_size(config) -> tuple[int, int]:
    """The student's input resolution (H, W) from its config (224 where the config names none)."""
    size = getattr(config, "image_size", MOBILENET_SIZE)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if min(size) < 1:
        raise KdpipeError(f"--student-config: image size {size} must be at least 1 pixel a side")
    return size


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def set_bn_momentum(model: torch.nn.Module, momentum: float | None) -> int:
    """Set every BatchNorm's momentum (PyTorch semantics: the weight of the newest batch). Returns the count.

    transformers' MobileNetV2 ports TensorFlow's `decay=0.997` as `momentum=0.997`, which in PyTorch means
    "keep 0.3% of the history": the running statistics become those of the last batch.
    """
    layers = batchnorm_layers(model)
    if momentum is not None:
        for m in layers:
            m.momentum = momentum
    return len(layers)


def save_student(model: torch.nn.Module, folder: Path, size: tuple[int, int], mean, std, resample: int) -> None:
    """`save_pretrained` (safetensors) plus a preprocessor_config.json that reproduces the training inputs,
    so `transformers.pipeline("image-classification", model=folder)` works on raw images."""
    try:  # the PIL implementation: what loads without torchvision, and the same preprocessing
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor

    model.save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(do_resize=True, size={"height": size[0], "width": size[1]}, resample=resample,
                      do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                      image_mean=list(mean), image_std=list(std)).save_pretrained(folder)
