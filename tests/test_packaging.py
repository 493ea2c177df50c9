"""The installed names (issue 27, point 8): a wheel built from this tree installs the library as the package
`kdpipe` (cli.py as kdpipe.cli) and nothing called `pipeline` or `cli`; `import kdpipe`, `python -m kdpipe`
and the `kdpipe` console script work from it in a fresh virtual environment."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_a_built_wheel_installs_kdpipe_and_nothing_else(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info into the tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "cli.py"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "pipeline", src / "pipeline", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
         src, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("kdpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kdpipe"}, top
    assert {"kdpipe/cli.py", "kdpipe/__main__.py", "kdpipe/train_student.py"} <= set(names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kdpipe = kdpipe.cli:main" in entry

    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel,
         cwd=tmp_path)
    # the dependencies (torch, transformers, ...) come from this environment's site-packages, as a plain path:
    # its .pth files (among them the editable install's finder of this very tree) are not processed
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = _run(python, "-c", "import kdpipe, kdpipe.cli, kdpipe.train_student; print(kdpipe.__file__)", cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(site), where
    for gone in ("pipeline", "cli"):
        missing = subprocess.run([str(python), "-c", f"import {gone}"], cwd=tmp_path, capture_output=True, text=True)
        assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr, gone
    assert "cache-teacher" in _run(python, "-m", "kdpipe", "--help", cwd=tmp_path)
    assert "train-student" in _run(env / "bin" / "kdpipe", "--help", cwd=tmp_path)
