"""files.py: a target is replaced whole or left as it was, and no temporary outlives its writer."""

from __future__ import annotations

import json

import pytest

from kdpipe import files


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "run.json"
    files.write_json(target, {"epoch": 1})
    with pytest.raises(RuntimeError):
        with files.replacing(target) as tmp:
            tmp.write_text('{"epoch": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "model"
    for version in ("old", "new"):
        with files.replacing(target) as tmp:
            tmp.mkdir()
            (tmp / version).write_text(version)
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in target.iterdir()] == ["new"]


def test_json_is_strict_and_suffixes_are_kept(tmp_path):
    files.write_json(tmp_path / "m.json", {"kl": float("nan"), "a": [1.0, float("-inf")]})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=pytest.fail) == {"kl": None, "a": [1.0, None]}
    with files.replacing(tmp_path / "plot.png", suffix=".png") as tmp:
        assert tmp.suffix == ".png" and tmp.name.startswith(".plot.png.tmp-")
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_only_the_temporaries_of_writers_that_are_gone_are_removed(tmp_path):
    """Pixel stores are built by several processes side by side (sweep workers): a temporary is removed only
    when its writer has exited, and only for the targets named."""
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(gone.stdout), os.getpid()
    for name in (f".train.originals.u8.tmp-{dead}", f".train.originals.npy.tmp-{alive}", f".test.originals.u8.tmp-{dead}"):
        (tmp_path / name).write_bytes(b"partial")
    files.remove_dead_temporaries(tmp_path, "train.originals.*")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".test.originals.u8.tmp-{dead}",
                                                          f".train.originals.npy.tmp-{alive}"]
