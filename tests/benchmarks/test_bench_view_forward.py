"""benchmarks/bench_view_forward.py runs tiny on CPU (so it cannot rot): both ways of feeding an image's views
to the teacher timed on the same inputs, the ratio reported, the JSON written."""

from __future__ import annotations

import importlib.util
import json

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("bench_view_forward", REPO / "benchmarks" / "bench_view_forward.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_one_forward_per_image_and_batch_size_forwards_are_timed_side_by_side(teacher_dir, tmp_path):
    out = bench.main(["--teacher", str(teacher_dir), "--views", "5", "--batch-sizes", "2,4", "--rounds", "2",
                      "--precision", "fp32", "--json", str(tmp_path / "v.json")])
    assert out["views_per_image"] == 6 and list(out["inputs_per_s"]) == ["one forward per image", "forwards of 2",
                                                                  "forwards of 4"]
    assert all(len(s) == 2 for s in out["seconds"].values()) and out["speedup"]["one forward per image"] == 1
    assert json.loads((tmp_path / "v.json").read_text()) == json.loads(json.dumps(out))
