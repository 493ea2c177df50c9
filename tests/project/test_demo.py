"""The embedded demo (issue 63): the README's first runnable lines work on a fresh clone with no network and no
files beside it. The demo's data and teacher are committed, small and described; `demo` names them on every
command; the README shows exactly the commands `kdpipe demo` runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

README = REPO / "README.md"


def demo_block() -> list[str]:
    """The kdpipe lines of the README's demo block (the first bash block after the '## Try it' heading)."""
    section = README.read_text().split("\n## Try it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.split(" #", 1)[0].strip() for line in block.splitlines() if line.startswith("kdpipe")]


def test_the_readme_shows_exactly_what_kdpipe_demo_runs():
    import shlex

    from kdpipe import demo

    lines = demo_block()
    assert lines[0] == "kdpipe demo"
    assert [shlex.split(line)[1:] for line in lines[1:]] == demo.STEPS


def test_the_embedded_files_are_small_and_described():
    from kdpipe import demo

    sizes = {what: sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) for what, path in demo.PATHS.items()}
    assert sizes["dataset"] <= 2 * 2**20 and sizes["teacher"] <= 5 * 2**20, sizes
    record = json.loads((demo.PATHS["teacher"] / "TEACHER.json").read_text())
    assert record["test_accuracy"] >= 0.97 and record["n_test"] == 270
    card = (demo.PATHS["teacher"] / "README.md").read_text()
    assert "not a Beans teacher" in card and f"{record['test_accuracy']:.1%}" in card
    assert (demo.ROOT / "make_digits.py").is_file() and (demo.ROOT / "train_teacher.py").is_file()


def test_demo_names_the_embedded_dataset_and_teacher(tmp_path, monkeypatch):
    from kdpipe import data, demo, teacher
    from kdpipe.config import CacheConfig

    monkeypatch.chdir(tmp_path)
    ds = data.open_dataset("demo")
    assert {n: len(s) for n, s in ds.splits.items()} == {"train": 1257, "validation": 270, "test": 270}
    assert ds.label_names == [str(d) for d in range(10)] and ds.root == str(demo.PATHS["dataset"])
    assert ds.splits["test"].ids[0].startswith("digit-")  # the rows' names, not content hashes
    t = teacher.load_teacher("demo")
    assert t.label_names == ds.label_names and t.weights_sha256
    assert CacheConfig(teacher="demo", dataset="demo").out_dir() == Path(demo.CACHE)
    (tmp_path / "demo").mkdir()  # a local folder of that name wins, as a local path wins over a Hub id
    assert demo.resolve("demo", "dataset") == "demo"


def test_a_missing_demo_is_one_line_naming_the_fix(monkeypatch, tmp_path):
    from kdpipe import demo
    from kdpipe.errors import KdpipeError

    monkeypatch.setitem(demo.PATHS, "teacher", tmp_path / "gone")
    with pytest.raises(KdpipeError, match=r"--teacher demo: .*source tree.*pip install -e"):
        demo.resolve("demo", "teacher")


def bare_copy(dest: Path) -> Path:
    """The files git would give a fresh clone (tracked, or new and not ignored), links kept as links."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        src, dst = REPO / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


@pytest.mark.slow
def test_the_readme_demo_runs_in_a_bare_copy_with_no_network(tmp_path):
    """`kdpipe demo` as the README gives it, in a copy of the project with nothing beside it (no ../shared), no
    Hugging Face cache and a Hub that does not answer; then again, reusing what is done."""
    copy = bare_copy(tmp_path / "clone")
    shim = tmp_path / "shim"  # `import kdpipe` resolves to the copy, ahead of this tree's editable install
    shim.mkdir()
    (shim / "kdpipe").symlink_to(copy / "pipeline")
    env = {**os.environ, "PYTHONPATH": str(shim), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "OMP_NUM_THREADS": "2", "COLUMNS": "200"}
    kdpipe = Path(sys.executable).with_name("kdpipe")
    (line,) = demo_block()[:1]
    first = subprocess.run([str(kdpipe), *line.split()[1:]], cwd=copy, env=env, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    where = [sys.executable, "-c", "import kdpipe, pathlib; print(pathlib.Path(kdpipe.__file__).resolve())"]
    assert str(copy / "pipeline") in subprocess.run(where, env=env, capture_output=True, text=True).stdout
    for row in ("teacher", "distilled", "twin"):
        assert re.search(rf"│ {row} .*│\s+\d+\.\d% │\s+\d+\.\d% │", out), out
    assert "distilled − twin on test" in out
    for run in ("data/runs/demo-kd", "data/runs/demo-twin"):
        assert (copy / run / "model" / "model.safetensors").is_file()
    again = subprocess.run([str(kdpipe), "demo"], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
