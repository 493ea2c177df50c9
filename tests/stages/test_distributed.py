"""Stage one on 2 processes (torchrun, gloo on CPU): the same cache as one process; the ranks' parts merged back
in dataset order (in-process, from hand-made parts)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO
from kdpipe import cache_teacher, logit_store
from kdpipe.config import CacheConfig
from kdpipe.errors import KdpipeError
from kdpipe.views import ViewPolicy


@pytest.mark.slow
@pytest.mark.parametrize("mixed", [False, True], ids=["plain", "mixed-views"])
def test_two_processes_cache_the_same_logits_as_one(image_folder, teacher_dir, tmp_path, mixed):
    single = tmp_path / "single"
    views = {"views": 2, "augment": ViewPolicy(mixup=1.0)} if mixed else {}
    flags = ["--views", "2", "--view-mixup", "1"] if mixed else []
    cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), out=single, precision="fp32",
                                  workers=0, batch_size=4, **views))
    sharded = tmp_path / "sharded"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "kdpipe", "cache-teacher", "--teacher", str(teacher_dir), "--dataset", str(image_folder),
                           "--out", str(sharded), "--precision", "fp32", "--device", "cpu", "--workers", "0",
                           "--batch-size", "4", *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("train", "validation", "test"):
        a = logit_store.read_split(logit_store.split_path(single, name))
        b = logit_store.read_split(logit_store.split_path(sharded, name))
        assert a.ids == b.ids and np.array_equal(a.labels, b.labels) and np.array_equal(a.view, b.view)
        if mixed and name == "train":  # the view parameters travel through the parts unchanged
            np.testing.assert_array_equal(b.boxes, a.boxes)
            for f in ("partners", "boxes", "flips", "weights"):
                np.testing.assert_array_equal(getattr(b.mixes, f), getattr(a.mixes, f))
            assert (a.mixes.weights > 0).any()
        np.testing.assert_allclose(b.logits, a.logits, rtol=1e-5, atol=1e-5)
        assert b.meta["processes"] == 2 and b.meta["teacher_accuracy"] == a.meta["teacher_accuracy"]
    assert not list((sharded / ".parts").glob("*"))  # the parts were joined and removed
    assert done.stdout.count("teacher logits in") == 1  # one report, from rank 0


@pytest.mark.slow
def test_two_processes_train_like_one_and_write_once(cache_dir, teacher_dir, tmp_path):
    """A student without BatchNorm (a tiny ViT: batch statistics would differ per process) trained on
    2 processes x 4 examples follows the 1 process x 8 examples run; outputs are written once."""
    from kdpipe import run_folder, train_student
    from kdpipe.config import TrainConfig

    common = dict(cache=cache_dir, student=str(teacher_dir), epochs=2, batch_size=8, lr=1e-3, precision="fp32",
                  device="cpu")
    single = train_student.run(TrainConfig(**common, out=tmp_path / "single"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "kdpipe", "train-student", "--cache", str(cache_dir), "--student", str(teacher_dir),
                           "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--precision", "fp32", "--device",
                           "cpu", "--out", str(tmp_path / "ddp")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ddp = run_folder.load_report(tmp_path / "ddp")
    assert ddp.run["processes"] == 2 and done.stdout.count("best epoch") == 1
    assert [r["train"]["loss"] for r in ddp.history] == pytest.approx([r["train"]["loss"] for r in single.history],
                                                                      rel=1e-4)
    assert ddp.validation["accuracy"] == single.validation["accuracy"] and ddp.test == pytest.approx(single.test)
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2
    kept = run_folder.read_predictions(tmp_path / "ddp", "test")  # written once, by the first process
    assert kept.epoch == ddp.best_epoch and kept.correct.mean() == ddp.test["accuracy"]


# ------------------------------------------------------------------- the ranks' parts merged back


def _rows(n: int, c: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"img/{i:05d} ü.jpg" for i in range(n)]
    return ids, rng.integers(0, c, n), rng.normal(0, 3, (n, c)).astype(np.float32)


@pytest.mark.parametrize("n,world,batch,per_image", [(103, 2, 8, 1), (103, 3, 5, 1), (5, 4, 2, 1), (64, 2, 64, 1),
                                                     (103, 2, 8, 3), (11, 3, 4, 3)])
def test_parts_merge_back_in_dataset_order(tmp_path, n, world, batch, per_image):
    ids, labels, logits = _rows(n * per_image)  # row i * per_image + v: image i, view v
    image_ids = ids[::per_image]
    boxes = np.arange(4 * n * per_image, dtype=np.float32).reshape(-1, 4)
    for r in range(world):
        rows = np.array([i * per_image + v for i in range(r, n, world) for v in range(per_image)], dtype=int)
        with logit_store.SplitWriter(cache_teacher.part_path(tmp_path, "train", r, world), 7, rows_per_group=16,
                                     with_views=per_image > 1) as w:
            w.write(logit_store.Rows([image_ids[i // per_image] for i in rows], labels[rows], logits[rows],
                                     rows % per_image, boxes[rows] if per_image > 1 else None,
                                     (rows % 2 == 0) if per_image > 1 else None))
            w.close({"part": r})
    merged = list(cache_teacher.merge_parts(_Split(image_ids), tmp_path, world, batch, per_image))
    np.testing.assert_array_equal(np.concatenate([b.rows for b in merged]), np.repeat(np.arange(n), per_image))
    np.testing.assert_array_equal(np.concatenate([b.view for b in merged]), np.tile(np.arange(per_image), n))
    np.testing.assert_array_equal(np.concatenate([b.logits for b in merged]), logits)
    if per_image > 1:
        np.testing.assert_array_equal(np.concatenate([b.boxes for b in merged]), boxes)
    assert not list((tmp_path / ".parts").glob("*.parquet"))


def test_a_part_from_another_dataset_is_refused(tmp_path):
    ids, labels, logits = _rows(10)
    for r in range(2):
        with logit_store.SplitWriter(cache_teacher.part_path(tmp_path, "train", r, 2), 7) as w:
            w.write(logit_store.Rows(ids[r::2], labels[r::2], logits[r::2]))
            w.close({})
    with pytest.raises(KdpipeError, match="other rows"):
        list(cache_teacher.merge_parts(_Split([i + "x" for i in ids]), tmp_path, 2, 4, 1))


class _Split:
    name = "train"

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)
