"""The installed names (issue 27, point 8): a wheel built from this tree installs the library as the package
`kdpipe` (cli.py as kdpipe.cli) and nothing called `pipeline` or `cli`; `import kdpipe`, `python -m kdpipe`
and the `kdpipe` console script work from it in a fresh virtual environment. The editable install (issue 60,
point 3) is a folder of links that type checkers, IDEs and code-map tools can read."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from tests.helpers import REPO


def _run(*args, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _source_copy(tmp_path: Path) -> Path:
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info into the tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "cli.py"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "pipeline", src / "pipeline", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _venv_with(wheel: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A fresh virtual environment with `wheel` installed: (its python, its site-packages)."""
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel,
         cwd=tmp_path)
    # the dependencies (torch, transformers, ...) come from this environment's site-packages, as a plain path:
    # its .pth files (among them the editable install of this very tree) are not processed
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def test_a_built_wheel_installs_kdpipe_and_nothing_else(tmp_path):
    src = _source_copy(tmp_path)
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
         src, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("kdpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kdpipe"}, top
    assert {"kdpipe/cli.py", "kdpipe/__main__.py", "kdpipe/train_student.py"} <= set(names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kdpipe = kdpipe.cli:main" in entry

    python, site = _venv_with(wheel, tmp_path)
    where = _run(python, "-c", "import kdpipe, kdpipe.cli, kdpipe.train_student; print(kdpipe.__file__)", cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(site), where
    for gone in ("pipeline", "cli"):
        missing = subprocess.run([str(python), "-c", f"import {gone}"], cwd=tmp_path, capture_output=True, text=True)
        assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr, gone
    assert "cache-teacher" in _run(python, "-m", "kdpipe", "--help", cwd=tmp_path)
    assert "train-student" in _run(python.parent / "kdpipe", "--help", cwd=tmp_path)


def test_an_editable_install_is_a_folder_of_links_that_tools_read(tmp_path):
    """`pip install -e .` (the README's and CI's install) puts a plain folder on sys.path whose kdpipe/ links to
    pipeline/*.py and cli.py, so that type checkers, IDEs and code-map tools resolve kdpipe.* in the source tree
    (setuptools' default editable install is an import hook, which only a running Python sees). The editable
    wheel is built by the call pip makes (PEP 660 build_editable), without pip's download of a build backend."""
    src = _source_copy(tmp_path)
    _run(sys.executable, "-c", "from setuptools import build_meta; build_meta.build_editable('dist')", cwd=src)
    (wheel,) = (src / "dist").glob("kdpipe-*.whl")
    python, site = _venv_with(wheel, tmp_path)

    (pth,) = site.glob("__editable__*kdpipe*.pth")
    lines = pth.read_text().splitlines()
    assert len(lines) == 1 and Path(lines[0]).is_dir(), f"{pth.name} is not a plain folder: {lines}"
    linked = Path(lines[0]) / "kdpipe"
    modules = sorted(f.name for f in (src / "pipeline").glob("*.py"))
    assert sorted(f.name for f in linked.glob("*.py")) == modules
    for name in modules:
        assert (linked / name).resolve() == (src / "pipeline" / name).resolve(), name
    assert (linked / "cli.py").resolve() == (src / "cli.py").resolve()

    where = _run(python, "-c", "import kdpipe.cli; print(kdpipe.cli.__file__)", cwd=tmp_path)
    assert Path(where.strip()).resolve() == (src / "cli.py").resolve(), where
    assert "cache-teacher" in _run(python, "-m", "kdpipe", "--help", cwd=tmp_path)
    assert "train-student" in _run(python.parent / "kdpipe", "--help", cwd=tmp_path)


def test_kdpipe_here_is_this_tree_with_every_module():
    """Each pipeline/*.py imports here as kdpipe.<name>, from this very file. The editable install links the
    files it found when it ran: one added or renamed since (a pull, a split module) is missing until the
    install line runs again, and a venv made from another checkout tests that checkout."""
    stale = []
    for file in sorted((REPO / "pipeline").glob("*.py")):
        spec = importlib.util.find_spec(f"kdpipe.{file.stem}")
        if spec is None or spec.origin is None or Path(spec.origin).resolve() != file.resolve():
            stale.append(f"pipeline/{file.name} ({spec.origin if spec else 'not installed'})")
    assert not stale, (f"kdpipe here is not this tree: {', '.join(stale)}; run the README's install line again "
                       "(pip install -e \".[test,export,postgres]\")")
