"""Build, adjust and save the student."""

from __future__ import annotations

from pathlib import Path

import torch

from . import hub
from .errors import KdpipeError


def build_student(spec: str | None, label_names: list[str], overrides: dict | None = None) -> torch.nn.Module:
    """MobileNetV2 from random init (the guide's student) when `spec` is None, else any
    AutoModelForImageClassification checkpoint (hub id or folder) with a fresh head for `label_names`.

    `overrides` are config fields (e.g. depth_multiplier, image_size) applied before the weights exist.
    """
    from transformers import AutoConfig, AutoModelForImageClassification, MobileNetV2Config, \
        MobileNetV2ForImageClassification

    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {n: i for i, n in enumerate(label_names)}}
    overrides = dict(overrides or {})
    try:
        if spec is None:
            return MobileNetV2ForImageClassification(MobileNetV2Config(**labels, **overrides))
        if not Path(spec).expanduser().is_dir():
            hub.require("--student", spec, "a local save_pretrained folder, or leave --student unset for MobileNetV2 "
                        "from scratch")
        config = AutoConfig.from_pretrained(spec, **labels, **overrides)
        # A new label set needs a new head: only layers whose shape changes are re-initialised.
        return AutoModelForImageClassification.from_pretrained(spec, config=config, ignore_mismatched_sizes=True)
    except OSError as e:
        raise KdpipeError(f"--student {spec}: cannot load it ({str(e).splitlines()[0]}); offline? pass a local "
                          "save_pretrained folder, or leave --student unset for MobileNetV2 from scratch") from None
    except (TypeError, ValueError) as e:
        raise KdpipeError(f"--student-config {overrides}: {e}") from None


def image_size(model: torch.nn.Module) -> tuple[int, int]:
    size = getattr(model.config, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


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
