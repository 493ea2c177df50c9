"""docs/your-data.md (issue 57, point 6): every `kdpipe` line of the walkthrough, and its Python export example,
run in order as a user would type them, on a slice of the embedded digits with a tiny teacher of the same labels
(`demo` pointed at them), with a few flags added so that each run takes seconds."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.helpers import REPO, make_teacher

WALKTHROUGH = REPO / "docs" / "your-data.md"
SLICE = {"train": 40, "validation": 20, "test": 20}  # rows of each split of the digits
FAST = {"cache-teacher": ["--workers", "0", "--precision", "fp32"],
        "train-student": ["--epochs", "1", "--batch-size", "16", "--precision", "fp32", "--device", "cpu"],
        "sweep": ["--epochs", "1", "--batch-size", "16", "--precision", "fp32", "--device", "cpu"]}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", WALKTHROUGH.read_text(), flags=re.S)


def kdpipe_lines() -> list[list[str]]:
    return [shlex.split(line.split(" #", 1)[0])[1:] for block in blocks("bash") for line in block.splitlines()
            if line.startswith("kdpipe ")]


@pytest.fixture
def digits_slice(tmp_path, monkeypatch):
    """`demo` names a slice of the embedded digits (same files, first rows) and a tiny ViT with their labels."""
    import pyarrow.parquet as pq

    from kdpipe import demo

    folder = tmp_path / "slice" / "digits"
    folder.mkdir(parents=True)
    for split, n in SLICE.items():
        pq.write_table(pq.read_table(demo.PATHS["dataset"] / f"{split}.parquet").slice(0, n), folder / f"{split}.parquet")
    teacher = make_teacher(tmp_path / "slice" / "digits-vit", [str(d) for d in range(10)])
    monkeypatch.setitem(demo.PATHS, "dataset", folder)
    monkeypatch.setitem(demo.PATHS, "teacher", teacher)
    return folder


def test_the_walkthrough_runs_from_teacher_pass_to_export(run_cli, digits_slice, tmp_path):
    lines = kdpipe_lines()
    assert [argv[0] for argv in lines] == ["cache-teacher", "inspect-cache", "train-student", "train-student", "sweep",
                                          "sweep-report", "evaluate"]
    for argv in lines:
        code, out = run_cli(*argv, *FAST.get(argv[0], []))
        assert code == 0, f"kdpipe {' '.join(argv)}\n{out}"
        if argv[0] == "train-student":
            assert "student resolution 32 x 32 px: the teacher's input size" in " ".join(out.split()), out
    from kdpipe.data import open_dataset

    open_dataset(str(digits_slice), splits=["test"]).splits["test"].image(0).save(tmp_path / "a-digit.png")
    (python,) = blocks("python")
    scope = {}
    exec(python.replace("classify(", "result = classify("), scope)  # run in the test's folder, as the doc's cwd
    assert {r["label"] for r in scope["result"]} <= {str(d) for d in range(10)} and len(scope["result"]) == 5
