"""benchmarks/bench_threads.py runs tiny on CPU (so it cannot rot): the student step timed at each thread count
in alternating rounds, the speed-up against the first count, the JSON written, the thread count restored."""

from __future__ import annotations

import importlib.util
import json

import torch

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("bench_threads", REPO / "benchmarks" / "bench_threads.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_each_thread_count_is_timed_side_by_side_and_the_ratio_is_against_the_first(tmp_path):
    before = torch.get_num_threads()
    out = bench.main(["--threads", "1,2", "--sizes", "32", "--batch-size", "2", "--rounds", "2", "--calls", "1",
                      "--precision", "fp32", "--json", str(tmp_path / "t.json")])
    (row,) = out["rows"]
    assert row["job"] == "student step, 32 px, batch 2, fp32" and set(row["images_per_s"]) == {"1", "2"}
    assert row["speedup"]["1"] == 1 and row["speedup"]["2"] > 0 and all(v > 0 for v in row["images_per_s"].values())
    assert json.loads((tmp_path / "t.json").read_text()) == json.loads(json.dumps(out))
    assert torch.get_num_threads() == before
