"""The one place that knows about hardware: device, precision, memory format, seeding, batch moves."""

from __future__ import annotations

import contextlib
import functools
import os
import random

import numpy as np
import torch

from .errors import KdpipeError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AMX or AVX512-BF16): autocast pays off there."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise KdpipeError(f"--device {name!r} is not one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise KdpipeError("--device cuda: no CUDA device is visible here; use --device cpu (or auto)")
    if name == "cuda" and distributed()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    return torch.device(name)


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process as `torchrun` or `accelerate launch` set them; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def start_distributed(device: torch.device) -> None:
    """Join the process group the launcher described (NCCL between GPUs, gloo on CPUs)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` picks bf16 where the hardware runs it fast (CUDA with bf16, AMX/AVX512-BF16 CPUs), else fp32."""
    if name not in PRECISIONS:
        raise KdpipeError(f"--precision {name!r} is not one of {', '.join(PRECISIONS)}")
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise KdpipeError("--precision fp16 is for CUDA; on the CPU use bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """Autocast context for `precision` (a no-op for fp32). Weights stay fp32; matmuls/convs run low."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to `device` in channels_last (faster convolutions with oneDNN and cuDNN)."""
    return model.to(device=device, memory_format=torch.channels_last)


def to_device(batch: dict, device: torch.device) -> dict:
    """The one function that moves a batch: tensors go to `device` without blocking."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for data order so it is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_workers() -> int:
    """Data-loading workers: one per spare core, none on a 1-core box (workers would only compete)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, bf16 {'native' if cpu_has_fast_bf16() else 'emulated'})"


def versions() -> dict:
    """Versions of everything that can change a result, for provenance records."""
    import platform

    import datasets
    import pyarrow
    import transformers

    from . import __version__

    return {"kdpipe": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__,
            "pyarrow": pyarrow.__version__, "numpy": np.__version__}
