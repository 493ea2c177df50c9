"""The one place that knows about hardware: device, precision, memory format, seeding, batch moves."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import random
import shutil

import numpy as np
import torch

from .errors import KdpipeError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Largest |Δlogit| between a teacher's logits at a precision and its fp32 logits on a CPU (set before any GPU run;
# the device check holds caches to them): fp32 differs by summation order only; fp16 keeps 11 significant bits,
# bf16 8 (logits of magnitude ~10). Two results, each within its own, differ by at most the sum (logit_tolerance).
LOGIT_TOLERANCE = {"fp32": 1e-3, "fp16": 0.05, "bf16": 0.25}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AMX or AVX512-BF16): autocast pays off there. Also asks
    torch which kernels it dispatches to: with them capped below AVX-512 (ATEN_CPU_CAPABILITY=avx2, as CI does
    to stand in for an AVX2-only CPU) bf16 would be emulated, so fp32 it is."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
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
    if name == "cuda" and distributed()[1] > 1:  # one GPU per process: the launcher's LOCAL_RANK
        local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= count:
            raise KdpipeError(f"LOCAL_RANK {local}: only {count} CUDA device(s) visible on this machine; launch at "
                              f"most {count} processes per machine (torchrun --nproc_per_node {count})")
        return torch.device("cuda", local)
    return torch.device(name)


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process as `torchrun` or `accelerate launch` set them; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def main_process() -> bool:
    """Whether this process reports and writes for its job: rank 0 of a launcher's job, or a process alone."""
    return distributed()[0] == 0


def start_distributed(device: torch.device) -> None:
    """Join the process group the launcher described (NCCL between GPUs, gloo on CPUs). On a GPU the
    process first makes its own device current: NCCL runs collectives and barrier() on the current
    device, which is otherwise cuda:0 in every process (all ranks would share one GPU)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
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
        return "bf16" if cuda_has_fast_bf16(device) else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cuda_has_fast_bf16(device: torch.device) -> bool:
    """True on GPUs with bf16 tensor cores (compute capability 8.0, Ampere, and later). Not
    torch.cuda.is_bf16_supported(), which by default also counts the slow emulation of older GPUs."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def logit_tolerance(*precisions: str) -> float:
    """The largest |Δlogit| expected between results computed at `precisions` (each a LOGIT_TOLERANCE key): the
    sum of their tolerances, as each lies within its own of the fp32 answer."""
    return sum(LOGIT_TOLERANCE[p] for p in precisions)


def precision_on(precision: str, device: torch.device) -> str:
    """A recorded precision (a run's or a cache's) as it can be replayed on `device`: fp16 is CUDA-only
    (resolve_precision refuses it on a CPU, where it is emulated), so a GPU's fp16 becomes fp32 on a CPU."""
    return "fp32" if precision == "fp16" and device.type != "cuda" else precision


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 training (Micikevicius et al. 2018, "Mixed Precision Training",
    arXiv:1710.03740): the loss is multiplied by S before backward so small gradients do not underflow
    fp16's range (below 6e-8 they become 0), and the gradients are divided by S before the step, which is
    skipped (and S halved) when they overflow. fp16 only: bf16 has fp32's exponent range and needs none,
    so for bf16 and fp32 the scaler is disabled (scale() and step() pass through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def configure_backends(device: torch.device, precision: str) -> None:
    """Set the process-wide numerics a run's flags promise, before it starts. cuDNN: deterministic
    algorithms and no autotuning (`benchmark` picks kernels by timing, so two runs of one seed could
    differ, and a resumed run would not follow the uninterrupted one). TF32 (Ampere and later: fp32
    matmuls and convolutions with a 10-bit mantissa) only where the run is low-precision anyway: `fp32`
    means IEEE fp32, so an fp32 cache made on a GPU matches the CPU's to float rounding. No effect on a CPU."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def autocast(device: torch.device, precision: str):
    """Autocast context for `precision` (a no-op for fp32). Weights stay fp32; matmuls/convs run low."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to `device` in channels_last (faster convolutions with oneDNN and cuDNN)."""
    return model.to(device=device, memory_format=torch.channels_last)


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile (inductor) cannot work on `device`, or None: it generates Triton kernels on a GPU
    (Triton installed, compute capability 7.0 or newer) and C++ on a CPU (a compiler on PATH)."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile needs Triton on a GPU and it is not installed (pip install triton)"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (7, 0):
            return f"Triton needs a GPU of compute capability 7.0 or newer; this one is {major}.{minor}"
    elif device.type == "cpu":
        if not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c):
            return "torch.compile on a CPU needs a C++ compiler (g++ or clang++) and none is on PATH"
    return None


def compile_model(model: torch.nn.Module, device: torch.device):
    """torch.compile(model), refused up front with a one-line error where it cannot work (compile_problem)
    instead of failing inside the first training step."""
    problem = compile_problem(device)
    if problem:
        raise KdpipeError(f"--compile: {problem}; install it, or drop --compile (eager mode trains the same model)")
    return torch.compile(model)


def to_device(batch: dict, device: torch.device) -> dict:
    """The one function that moves a batch: tensors go to `device` without blocking. Host to GPU only:
    from pinned memory (stage one's DataLoader pins on CUDA) the copy overlaps compute; from pageable
    memory CUDA stages it synchronously, which is safe. Results come back with .cpu(), which waits."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def device_rng_state(device: torch.device) -> torch.Tensor | None:
    """The random state of `device`'s own generator (dropout on a GPU draws from it, not from the CPU's),
    for checkpoints; None on a CPU, whose state torch.get_rng_state() holds."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_device_rng_state(device: torch.device, state: torch.Tensor | None) -> None:
    """Restore device_rng_state; a no-op for a CPU or a checkpoint without one (resumed on another device)."""
    if state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state, device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for data order so it is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(device: torch.device | None = None) -> int:
    """Data-loading workers for stage one, from this process's share of the cores (cores / processes on
    this machine under torchrun, LOCAL_WORLD_SIZE). CPU teacher: one per spare core, at most 4, none on a
    1-core box (the teacher needs the cores too). GPU teacher: decoding is the bottleneck (one core decodes
    ~150 Beans images/s, a GPU runs a ViT-B/16 at thousands; docs/scaling.md), so every spare core, at most 32."""
    share = max(1, cpu_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if device is not None and device.type == "cuda":
        return max(1, min(32, share - 1))
    return max(0, min(4, share - 1))


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else the platform's word for it): numerics and speed differ by
    CPU, so every result names the one it ran on."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(device: torch.device) -> str:
    """The device in words, for provenance: the GPU and its compute capability, or the CPU's model, cores,
    threads, the kernels torch dispatches to (AVX2, AVX512, AMX...) and whether bf16 is native."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm {major}.{minor}, {cpu_cores()} CPU cores)"
    return (f"cpu {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"{torch.backends.cpu.get_cpu_capability()} kernels, bf16 {'native' if cpu_has_fast_bf16() else 'emulated'})")


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
