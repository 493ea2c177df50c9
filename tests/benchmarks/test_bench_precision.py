"""benchmarks/bench_precision.py runs tiny on CPU (so it cannot rot): both precisions of both jobs measured,
the ratio and what --precision auto takes here reported, the JSON written."""

from __future__ import annotations

import importlib.util
import json

import torch

from tests.helpers import REPO
from kdpipe import runtime

spec = importlib.util.spec_from_file_location("bench_precision", REPO / "benchmarks" / "bench_precision.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_fp32_and_bf16_are_timed_side_by_side_for_the_student_and_the_teacher(teacher_dir, tmp_path):
    out = bench.main(["--sizes", "32", "--batch-size", "2", "--rounds", "2", "--calls", "1", "--teacher",
                      str(teacher_dir), "--json", str(tmp_path / "p.json")])
    assert [r["job"] for r in out["rows"]] == ["student step, 32 px, batch 2",
                                               "teacher forward, 32 px, batch 2 (vit-tiny)"]
    for r in out["rows"]:
        assert r["fp32_images_per_s"] > 0 and r["bf16_images_per_s"] > 0 and r["bf16_speedup"] > 0
        assert r["rounds"] == 2
    assert out["auto_precision"] == runtime.resolve_precision("auto", torch.device("cpu"))
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(json.dumps(out))
