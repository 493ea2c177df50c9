"""Fixtures only (helpers are in tests/helpers.py): tiny generated data and tiny random models, so every test runs
on CPU in seconds, without network; and each test's working folder a fresh temporary one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per test process: tiny models gain nothing from a second thread, and two processes (a test and the
# kdpipe it spawns, or a test run beside other work) each spinning two OpenMP threads on 2 cores made a 2-epoch
# test take 72 s instead of 2 s. Set before torch is imported; an explicit OMP_NUM_THREADS still wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup fails at once instead of retrying
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["COLUMNS"] = "160"  # rich wraps tables to the terminal; keep test output on one line each

from tests.helpers import make_image_folder, make_teacher  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "beans-tiny")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "vit-tiny")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, image_folder, teacher_dir) -> Path:
    """A cache of the tiny teacher over the tiny folder, built once (fp32) for the stage-two tests."""
    from kdpipe import cache_teacher
    from kdpipe.config import CacheConfig

    out = tmp_path_factory.mktemp("cache") / "c"
    cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), out=out, precision="fp32",
                                  workers=0, batch_size=16))
    return out


@pytest.fixture(autouse=True)
def _isolated_data_root(tmp_path, monkeypatch):
    """Default artifact folders (data/...) go to a fresh temp dir, never the repository's data/."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def run_cli():
    """Invoke the kdpipe CLI in-process; returns (exit_code, combined output)."""
    from typer.testing import CliRunner

    from kdpipe import cli

    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(cli.app, [str(a) for a in args], catch_exceptions=True)
        crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
        if crashed:  # a bug, not a user error: show its traceback in the assertion message
            import traceback

            return result.exit_code, result.output + "".join(traceback.format_exception(result.exception))
        return result.exit_code, result.output

    return invoke


