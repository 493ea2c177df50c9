"""The device logic, checked on a CPU: decisions are pure functions of what torch reports (monkeypatched
here to describe a GPU), and batches are moved to the `meta` device, which has no data, so anything left
on the CPU or computed on the host by mistake shows up as a device mismatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import tiny_train_config
from kdpipe import pixels, run_folder, runtime, train_student
from kdpipe.errors import KdpipeError
from kdpipe.logit_store import TopK
from kdpipe.student_data import SplitData

CUDA = torch.device("cuda", 0)  # a descriptor only: nothing is allocated on it in these tests
META = torch.device("meta")


@pytest.fixture
def gpu(monkeypatch):
    """torch reports one Ampere GPU (compute capability 8.0); returns a setter for the capability."""
    state = {"capability": (8, 0), "count": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    return state


@pytest.fixture
def backend_flags():
    names = [(torch.backends.cudnn, "deterministic"), (torch.backends.cudnn, "benchmark"),
             (torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
    saved = [getattr(obj, name) for obj, name in names]
    yield
    for (obj, name), value in zip(names, saved):
        setattr(obj, name, value)


# ------------------------------------------------------------------------------------- device choice


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(KdpipeError, match="--device cuda: no CUDA device"):
        runtime.resolve_device("cuda")


def test_auto_picks_the_gpu_and_torchrun_processes_their_own(gpu, monkeypatch):
    assert runtime.resolve_device("auto") == torch.device("cuda")
    gpu["count"] = 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")  # a third process on a 2-GPU machine
    with pytest.raises(KdpipeError, match=r"LOCAL_RANK 2: only 2 CUDA device.*--nproc_per_node 2"):
        runtime.resolve_device("auto")


def test_a_gpu_process_makes_its_device_current_before_joining_nccl(monkeypatch):
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    runtime.start_distributed(torch.device("cuda", 1))
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]
    calls.clear()
    runtime.start_distributed(torch.device("cpu"))
    assert calls == [("init", "gloo")]


# ------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16")])
def test_auto_precision_on_a_gpu_is_bf16_only_with_bf16_tensor_cores(gpu, capability, expected):
    gpu["capability"] = capability  # 7.x (V100, T4) emulates bf16: is_bf16_supported() would say yes
    assert runtime.resolve_precision("auto", CUDA) == expected
    assert runtime.resolve_precision("fp32", CUDA) == "fp32"
    assert runtime.resolve_precision("fp16", CUDA) == "fp16"


def test_fp16_is_refused_on_a_cpu_and_a_recorded_fp16_replays_in_fp32_there():
    with pytest.raises(KdpipeError, match="--precision fp16 is for CUDA"):
        runtime.resolve_precision("fp16", torch.device("cpu"))
    cpu = torch.device("cpu")
    assert [runtime.precision_on(p, cpu) for p in ("fp16", "bf16", "fp32")] == ["fp32", "bf16", "fp32"]
    assert [runtime.precision_on(p, CUDA) for p in ("fp16", "bf16", "fp32")] == ["fp16", "bf16", "fp32"]


def test_loss_scaling_is_for_fp16_only(monkeypatch):
    cpu = torch.device("cpu")
    assert [runtime.grad_scaler(cpu, p).is_enabled() for p in ("fp16", "bf16", "fp32")] == [True, False, False]
    made = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: made.append((device, enabled)))
    runtime.grad_scaler(CUDA, "fp16")
    runtime.grad_scaler(CUDA, "bf16")
    assert made == [("cuda", True), ("cuda", False)]


def test_backends_are_deterministic_and_fp32_means_no_tf32(backend_flags):
    torch.backends.cudnn.benchmark = True
    runtime.configure_backends(CUDA, "fp32")
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    runtime.configure_backends(CUDA, "bf16")
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


# ------------------------------------------------------------------------------------- torch.compile


def test_compile_is_refused_up_front_where_it_cannot_work(gpu, monkeypatch):
    import importlib.util
    import shutil

    real_find_spec = importlib.util.find_spec
    triton = {"installed": False}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if triton["installed"] else None) if name == "triton"
                        else real_find_spec(name, *a))
    assert "Triton" in runtime.compile_problem(CUDA)
    triton["installed"] = True
    assert runtime.compile_problem(CUDA) is None
    gpu["capability"] = (6, 1)  # Pascal: too old for Triton
    assert "compute capability 7.0 or newer; this one is 6.1" in runtime.compile_problem(CUDA)
    with pytest.raises(KdpipeError, match="--compile: Triton needs .* drop --compile"):
        runtime.compile_model(torch.nn.Linear(2, 2), CUDA)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "C++ compiler" in runtime.compile_problem(torch.device("cpu"))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert runtime.compile_problem(torch.device("cpu")) is None


# ---------------------------------------------------------------------------------- workers, memory


@pytest.mark.parametrize("cores, local_world, cpu, gpu_workers",
                         [(1, 1, 0, 1), (2, 1, 1, 1), (16, 1, 4, 15), (64, 1, 4, 32), (16, 4, 3, 3), (16, 8, 1, 1)])
def test_default_workers_from_this_process_share_of_the_cores(monkeypatch, cores, local_world, cpu, gpu_workers):
    monkeypatch.setattr(runtime, "cpu_cores", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert runtime.default_workers() == runtime.default_workers(torch.device("cpu")) == cpu
    assert runtime.default_workers(CUDA) == gpu_workers


def test_the_pixel_store_goes_to_the_gpu_only_within_the_headroom(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))  # (free, total) bytes
    assert pixels.fits_on_device(500, CUDA) and not pixels.fits_on_device(501, CUDA)
    assert pixels.fits_on_device(900, CUDA, headroom=0.9)
    assert not pixels.fits_on_device(1, torch.device("cpu"))  # a CPU keeps the memory map
    store = np.zeros((4, 8, 8, 3), np.uint8)
    assert pixels.as_tensor(store, torch.device("cpu")).data_ptr() == store.__array_interface__["data"][0]


def test_the_gpu_random_state_is_saved_and_restored(monkeypatch):
    saved = torch.tensor([1, 2, 3], dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    assert runtime.device_rng_state(torch.device("cpu")) is None  # torch.get_rng_state() covers the CPU
    assert runtime.device_rng_state(CUDA) is saved
    runtime.set_device_rng_state(CUDA, None)  # a checkpoint made on a CPU, resumed on a GPU
    runtime.set_device_rng_state(torch.device("cpu"), saved)  # made on a GPU, resumed on a CPU
    assert restored == []
    runtime.set_device_rng_state(CUDA, saved)
    assert restored == [(saved, CUDA)]


# --------------------------------------------------------------------------- batches on another device


def _split(views: int = 1, topk: bool = False) -> SplitData:
    n, c, size = 6, 3, 8
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (n * views, size, size, 3), dtype=torch.uint8, generator=g)
    logits = torch.randn(n * views, c, generator=g)
    teacher = logits
    if topk:
        teacher = TopK.from_logits(logits.numpy(), 2)  # densified per batch on the host
    data = SplitData("train", [str(i) for i in range(n)], u8, torch.arange(n) % c, teacher, per_image=views)
    if views > 1:
        data.view_of = torch.arange(n) % views
    return data


@pytest.mark.parametrize("views, topk", [(1, False), (3, False), (1, True)], ids=["plain", "views", "topk"])
def test_a_batch_lands_on_the_target_device_and_normalises_there(views, topk):
    """Pixels, labels and targets on the host (a store too big for the GPU, sparse targets) all arrive on
    the target device, and normalising runs there."""
    data = _split(views, topk)
    batch = data.batch(torch.tensor([4, 0, 2]), META)
    assert {k: v.device for k, v in batch.items()} == {k: META for k in ("pixels", "labels", "teacher_logits")}
    assert batch["pixels"].shape == (3, 8, 8, 3) and batch["teacher_logits"].shape == (3, 3)
    x = pixels.normalise(batch["pixels"], torch.zeros(3, device=META), torch.ones(3, device=META))
    assert x.device == META and x.shape == (3, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)


def test_to_device_moves_tensors_only():
    out = runtime.to_device({"x": torch.ones(2), "name": "a", "n": 3}, META)
    assert out["x"].device == META and out["name"] == "a" and out["n"] == 3


# ------------------------------------------------------------------------------ fp16 loss scaling, on CPU


def test_a_scaled_epoch_trains_like_an_unscaled_one_and_its_scale_resumes(cache_dir, tmp_path):
    """train_epoch's fp16 path (GradScaler), run on a CPU in fp32 with a CPU scaler: the scaled gradients
    are unscaled before AdamW steps, so the weights follow the unscaled run; the scale, grown once per
    step, is saved in the checkpoint and restored by resume."""
    def one_epoch(out, scaler):
        s = train_student.setup(tiny_train_config(cache=cache_dir, epochs=1, out=out))
        s.scaler = scaler
        train = train_student.train_epoch(s, 0)
        return s, train

    plain, plain_train = one_epoch(tmp_path / "plain", None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    scaled, scaled_train = one_epoch(tmp_path / "scaled", scaler)
    steps = len(scaled.splits["train"]) // scaled.cfg.batch_size + bool(len(scaled.splits["train"]) % scaled.cfg.batch_size)
    assert scaler.get_scale() == 2.0 ** (8 + steps)  # no overflow: every step was taken and grew the scale
    assert scaled_train["loss"] == pytest.approx(plain_train["loss"], rel=1e-5)
    for a, b in zip(plain.model.state_dict().values(), scaled.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    scaled.history.append({"epoch": 1, "epoch_time_s": 0.0})
    run_folder.write_checkpoint(scaled.out, train_student.checkpoint_state(scaled), scaled.history)
    again = train_student.setup(tiny_train_config(cache=cache_dir, epochs=1, out=tmp_path / "scaled", resume=True))
    again.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1)
    assert train_student.resume(again)
    assert again.scaler.get_scale() == scaler.get_scale()


@pytest.mark.parametrize("capability, flags, fast", [("AVX512", "fpu avx512_bf16 sse", True),
                                                     ("AVX512", "fpu amx_bf16", True),
                                                     ("AVX2", "fpu avx512_bf16", False),  # kernels capped below AVX-512
                                                     ("AVX512", "fpu avx512f avx2", False)])
def test_cpu_bf16_is_fast_only_with_the_flag_and_the_kernels_to_use_it(monkeypatch, tmp_path, capability, flags, fast):
    import builtins

    real_open = builtins.open
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"flags\t\t: {flags}\n")
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    runtime.cpu_has_fast_bf16.cache_clear()
    try:
        assert runtime.cpu_has_fast_bf16() is fast
        assert runtime.resolve_precision("auto", torch.device("cpu")) == ("bf16" if fast else "fp32")
    finally:
        runtime.cpu_has_fast_bf16.cache_clear()


def test_a_cpu_is_described_by_its_model_kernels_and_bf16(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu amx_bf16\n")
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AMX")
    runtime.cpu_model.cache_clear()
    runtime.cpu_has_fast_bf16.cache_clear()
    try:
        said = runtime.describe(torch.device("cpu"))
    finally:
        runtime.cpu_model.cache_clear()
        runtime.cpu_has_fast_bf16.cache_clear()
    assert said.startswith("cpu Intel(R) Xeon(R) Platinum 8480+ (") and "AMX kernels, bf16 native" in said
