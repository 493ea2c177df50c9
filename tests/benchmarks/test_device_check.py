"""benchmarks/device_check.py in its CPU mode (--device cpu --tiny), so the GPU check cannot rot before a GPU
is at hand: every measurement is run or recorded as skipped with its reason, a failing one is recorded (not
a crash), the budget is respected, and the JSON has its structure. Speed figures are not asserted."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import device_check  # noqa: E402

from kdpipe import runtime  # noqa: E402


def _names() -> list[str]:
    return [step[0] for step in device_check.plan()]


def test_tiny_cpu_run_records_every_measurement(tmp_path, monkeypatch, request):
    # torch.compile refused up front, as on a machine without a compiler: recorded as failed, the run goes on
    monkeypatch.setattr(runtime, "compile_problem", lambda device: "no C++ compiler here (test)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: spinning OpenMP threads would slow it tenfold
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    out = tmp_path / "check.json"
    result = device_check.main(["--device", "cpu", "--tiny", "--workers", "0,1", "--compile",
                                "--skip", "stage_two.resume,torchrun", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    assert result["mode"] == "tiny" and result["environment"]["device_type"] == "cpu"
    assert {"model", "cores", "avx512_bf16", "amx_bf16"} <= set(result["environment"]["cpu"])
    m = result["measurements"]
    assert list(m) == _names()
    for name, record in m.items():
        assert record["status"] in ("ok", "skipped", "failed"), name
        timed = name.startswith(("data_path", "stage_two.bare", "stage_one.vit")) and not name.endswith("agreement")
        assert {"ok": "images_per_s" if timed else "seconds",
                "skipped": "reason", "failed": "error"}[record["status"]] in record, (name, record)

    ok = {n for n, r in m.items() if r["status"] == "ok"}
    assert {"data_path.plain", "data_path.views", "stage_one.decode", "stage_one.vit.bf16", "stage_one.vit.fp32",
            "stage_one.agreement.fp32", "stage_one.agreement.bf16", "stage_two.train_student",
            "stage_two.train_student.views", "stage_two.train_student.fp32", *(f"stage_two.bare.{v}" for v in device_check.BARE_VARIANTS[:4])} <= ok
    assert m["data_path.plain"]["store"] == "host memory map" and m["data_path.plain"]["images"] == 12
    assert set(m["stage_one.decode"]["by_workers"]) == set(m["stage_one.decode"]["with_views_by_workers"]) == {"0", "1"}
    assert m["stage_one.vit.bf16"]["bare_forward_images_per_s"] > 0 and m["stage_one.vit.bf16"]["images"] == 12
    for p in ("fp32", "bf16"):  # the same teacher on the same CPU: well inside every precision's tolerance
        assert m[f"stage_one.agreement.{p}"]["within_tolerance"] and m[f"stage_one.agreement.{p}"]["images"] == 6
    assert m["stage_one.agreement.fp32"]["argmax_agreement"] == 1.0
    bf16 = m["stage_one.agreement.bf16"]  # beside the device's bf16 cache: the CPU's, and bf16's own rounding
    assert bf16["vs_cpu_bf16"]["max_abs_logit_diff"] == 0.0  # on a CPU the device's cache is the CPU's
    assert bf16["cpu_bf16_vs_cpu_fp32"]["max_abs_logit_diff"] == bf16["max_abs_logit_diff"]
    assert len(m["stage_two.train_student"]["per_epoch_images_per_s"]) == 2  # --epochs of the tiny mode
    assert m["data_path.views"]["views_per_image"] == 3 and m["data_path.views"]["images"] == 12
    agree = m["data_path.views_agreement"]  # DeviceViewSource on the CPU: the GPU's renderer, run here
    assert agree["bit_equal"] and agree["views"] == 36 and agree["mixed_views"] > 0

    assert "CUDA" in m["stage_one.vit.fp16"]["reason"] and "CUDA" in m["stage_one.agreement.fp16"]["reason"]
    assert m["data_path.plain_host"]["status"] == "skipped"
    assert m["stage_two.resume"]["reason"] == "in --skip"
    for name in ("stage_two.bare.compiled", "stage_two.train_student.compile"):
        assert m[name]["status"] == "failed" and "--compile: no C++ compiler here" in m[name]["error"]
    assert m["torchrun.cache_teacher"]["reason"] == m["torchrun.train_student"]["reason"] == "in --skip"

    r = result["ratios"]
    assert r["train_student_over_bare_step"] > 0 and r["data_path_over_bare_step"] > 0
    assert r["fp32_over_auto_precision_train_student"] > 0 and m["stage_two.train_student.fp32"]["precision"] == "fp32"
    assert r["compile_speedup_bare"] is None and r["stage_one_over_bare_forward_fp16"] is None
    refs = result["references"]
    assert [ref["images_per_s"] for ref in refs] == [2313, 1832, 2900, 3900]
    assert set(refs[0]["this_run"]) == {"stage_two.bare.channels_last+autocast", "stage_two.train_student"}


def test_nothing_starts_after_the_budget_and_only_selects(tmp_path):
    result = device_check.main(["--device", "cpu", "--tiny", "--budget-s", "0", "--json", str(tmp_path / "c.json")])
    assert {r["status"] for r in result["measurements"].values()} == {"skipped"}
    assert all("time budget of 0 s spent" in r["reason"] for r in result["measurements"].values())
    result = device_check.main(["--device", "cpu", "--tiny", "--only", "torchrun", "--budget-s", "0"])
    assert [n for n, r in result["measurements"].items() if r.get("reason") != "not in --only"] == \
        ["torchrun.cache_teacher", "torchrun.train_student"]


@pytest.mark.slow
def test_torchrun_runs_both_stages_on_two_cpu_processes(tmp_path):
    """The check's torchrun measurements, which a GPU machine runs only with >= 2 GPUs, on 2 CPU processes
    (gloo): the launch, the comparison with the one-process cache and the report, so they cannot rot."""
    out = tmp_path / "check.json"
    result = device_check.main(["--device", "cpu", "--tiny", "--only", "stage_two.train_student,torchrun",
                                "--json", str(out)])
    m = result["measurements"]
    cache, train = m["torchrun.cache_teacher"], m["torchrun.train_student"]
    assert cache["status"] == train["status"] == "ok", (cache, train)
    assert cache["processes"] == train["processes"] == 2
    assert set(cache["max_abs_logit_diff_vs_one_process"]) == {"train", "validation", "test"}
    assert cache["within_tolerance"]  # the same CPU, other shards: within the auto precision's tolerance
    assert train["test_accuracy"] is not None and train["test_accuracy_one_process"] is not None


def test_a_cuda_check_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(Exception, match="--device cuda: no CUDA device"):
        device_check.main(["--device", "cuda", "--tiny"])


def test_a_check_that_dies_leaves_what_it_measured(tmp_path, monkeypatch):
    """The JSON is rewritten after every measurement: a check killed at a device machine's time limit (or
    failing after its measurements) still leaves them, marked partial."""
    def broken(results):
        raise RuntimeError("killed")

    monkeypatch.setattr(device_check, "ratios", broken)
    out = tmp_path / "check.json"
    with pytest.raises(RuntimeError, match="killed"):
        device_check.main(["--device", "cpu", "--tiny", "--budget-s", "0", "--json", str(out)])
    partial = json.loads(out.read_text())
    assert partial["partial"] is True and list(partial["measurements"]) == _names()


def test_a_child_process_keeps_the_callers_pythonpath(monkeypatch):
    """`python -m kdpipe` children (resume after kill -9, torchrun) import kdpipe where the parent did: on a
    device machine that is a PYTHONPATH entry, which an earlier version replaced with the repository."""
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    path = device_check.subprocess_env()["PYTHONPATH"].split(":")
    assert path == [str(REPO), "/tmp/site"]
    monkeypatch.delenv("PYTHONPATH")
    assert device_check.subprocess_env()["PYTHONPATH"] == str(REPO)
