"""Tiny generated data and tiny random models: every test runs on CPU in seconds, without network."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# One thread per test process: tiny models gain nothing from a second thread, and two processes (a test and the
# kdpipe it spawns, or a test run beside other work) each spinning two OpenMP threads on 2 cores made a 2-epoch
# test take 72 s instead of 2 s. Set before torch is imported; an explicit OMP_NUM_THREADS still wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup fails at once instead of retrying
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["COLUMNS"] = "160"  # rich wraps tables to the terminal; keep test output on one line each

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CLASSES = ["angular_leaf_spot", "bean_rust", "healthy"]
COLOURS = {"angular_leaf_spot": (200, 60, 60), "bean_rust": (60, 200, 60), "healthy": (60, 60, 200)}
SIZE = 32  # teacher processor and student resolution in tests


def one_line_error(code: int, out: str, *fragments: str) -> None:
    """A refused command: exit 1, no traceback, exactly one `error:` line, holding every fragment."""
    assert code == 1, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(f in out for f in fragments), out


def make_image_folder(root: Path, per_class: dict[str, int] | None = None, size: int = 40, seed: int = 0) -> Path:
    """split/class/*.png images whose class is visible in their colour (separable), with noise."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 12, "validation": 4, "test": 4}
    for split, n in per_class.items():
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array(COLOURS[cls], dtype=np.float64)
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{cls}_{i}.png")
    return root


def make_teacher(path: Path, label_names: list[str] | None = None, seed: int = 0) -> Path:
    """A tiny random ViT classifier plus its processor, saved with save_pretrained."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    names = label_names or CLASSES
    torch.manual_seed(seed)
    config = ViTConfig(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=len(names), id2label=dict(enumerate(names)),
                       label2id={n: i for i, n in enumerate(names)})
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=[0.5, 0.4, 0.3],
                         image_std=[0.2, 0.25, 0.3]).save_pretrained(path)
    return path


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


TINY_STUDENT = "image_size=32,depth_multiplier=0.35,classifier_dropout_prob=0"
REPO = Path(__file__).resolve().parents[1]


def spawn_kdpipe(*args, cwd: Path):
    """`kdpipe ARGS` in a separate process (to be killed for real, or to race another one)."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "kdpipe", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def tiny_train_config(**overrides):
    from kdpipe.config import TrainConfig

    base = dict(student_config={"image_size": SIZE, "depth_multiplier": 0.35, "classifier_dropout_prob": 0.0}, epochs=2, batch_size=8, lr=3e-3,
                precision="fp32", device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def read_cache_table(path: Path):
    """A cache file's table with its kdpipe metadata attached, so a test can alter and rewrite it whole."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path).metadata[b"kdpipe"]
    return pq.read_table(path).replace_schema_metadata({b"kdpipe": meta})


def student_and_teacher_views(cache, image_folder, teacher_dir, out, k, policy):
    """Both sides of a view cache's train split: the student's setup (32 px, the teacher's size), the
    stored split, the dataset split, and stage one's teacher inputs rebuilt (item i: (V, 3, H, W))."""
    from kdpipe import data, logit_store, teacher, teacher_inputs, train_student, views

    s = train_student.setup(tiny_train_config(cache=cache, views=True, out=out,
                                              student_config={"image_size": 32, "depth_multiplier": 0.35}))
    stored = logit_store.read_split(cache / "train.parquet")
    split = data.open_dataset(str(image_folder)).splits["train"]
    processor = teacher.load_teacher(str(teacher_dir), None, False).processor
    spec = teacher_inputs.ViewSpec(k, policy, views.processor_inputs(stored.meta["processor"], "test"))
    return s, stored, split, teacher_inputs.TeacherInputs(split, processor, np.arange(len(split)), spec)


def write_split(path: Path, ids: list[str], labels, logits, meta: dict, views=None, topk: int | None = None,
                topk_dtype: str = "float32") -> dict:
    """A whole cache split in one step (logit_store.SplitWriter), for tests that need a cache of given logits;
    returns the metadata written."""
    from kdpipe import logit_store

    logits = np.asarray(logits, dtype=np.float32)
    with logit_store.SplitWriter(path, logits.shape[1], topk, topk_dtype) as w:
        w.write(logit_store.Rows(ids, labels, logits, views))
        return w.close(meta)
