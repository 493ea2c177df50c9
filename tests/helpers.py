"""What tests share besides fixtures: the tiny data and models they generate, the cache and run helpers, and
the repository's paths. Imported as `from tests.helpers import ...`; fixtures live in conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CLASSES = ["angular_leaf_spot", "bean_rust", "healthy"]
COLOURS = {"angular_leaf_spot": (200, 60, 60), "bean_rust": (60, 200, 60), "healthy": (60, 60, 200)}
SIZE = 32  # teacher processor and student resolution in tests
TINY_STUDENT = "image_size=32,depth_multiplier=0.35,classifier_dropout_prob=0"  # --student-config of a tiny student


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


def spawn_kdpipe(*args, cwd: Path):
    """`kdpipe ARGS` in a separate process (to be killed for real, or to race another one)."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "kdpipe", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def tiny_train_config(**overrides):
    """A TrainConfig for a tiny student on CPU (2 epochs, fp32), with `overrides`."""
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


def student_batch(train, i: int, v: int) -> dict:
    """What a training step of stage two gets for image i when this epoch's view of it is v."""
    import torch

    train.view_of = torch.zeros(len(train), dtype=torch.long)
    train.view_of[i] = v
    return train.batch(torch.tensor([i]), torch.device("cpu"))


def parquet_dataset(folder: Path, names: list[str], per_class: int = 1) -> Path:
    """train/validation/test Parquet files with a ClassLabel of `names`, one small image per class."""
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    folder.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in names for _ in range(per_class)]
        labels = [i for i in range(len(names)) for _ in range(per_class)]
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(folder / f"{split}.parquet"))
    return folder
