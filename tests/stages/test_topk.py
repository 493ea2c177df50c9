"""Top-K logit storage (`cache-teacher --topk K`): exact top-K probabilities and tail mass at T = 1,
smaller files, checksummed like full logits, and a student trains from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import read_cache_table, tiny_train_config, write_split
from kdpipe import cache_verify, logit_store, train_student
from kdpipe.errors import KdpipeError
from kdpipe.logit_store import TopK


def _softmax(x: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = x.astype(np.float64) / t
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@pytest.fixture
def logits() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(0, 3, (64, 1000)) + 8 * (rng.random((64, 1000)) < 0.003)).astype(np.float32)  # (N, C)


def test_the_reconstruction_keeps_top_k_probabilities_and_tail_mass_exactly(logits):
    sparse = TopK.from_logits(logits, 10)
    full_p, dense_p = _softmax(logits), _softmax(sparse.dense())
    rows = np.arange(len(logits))[:, None]
    np.testing.assert_allclose(dense_p[rows, sparse.indices], full_p[rows, sparse.indices], rtol=1e-5, atol=1e-9)
    tail_full = 1 - np.take_along_axis(full_p, sparse.indices, 1).sum(1)
    tail_dense = 1 - np.take_along_axis(dense_p, sparse.indices, 1).sum(1)
    np.testing.assert_allclose(tail_dense, tail_full, rtol=1e-4, atol=1e-9)
    assert (np.argsort(-sparse.values, 1) == np.arange(10)).all()  # largest first
    np.testing.assert_array_equal(sparse.dense().argmax(1), logits.argmax(1))


def test_with_every_class_kept_the_reconstruction_is_the_logits(logits):
    np.testing.assert_allclose(TopK.from_logits(logits[:, :20], 20).dense(), logits[:, :20], rtol=1e-6)


def test_the_kd_loss_from_top_k_approaches_the_full_one_as_k_grows(logits):
    from kdpipe.loss import distillation_loss

    student = torch.from_numpy(np.random.default_rng(1).normal(0, 1, logits.shape).astype(np.float32))
    labels = torch.zeros(len(logits), dtype=torch.long)
    full = distillation_loss(student, labels, torch.from_numpy(logits), 5.0, 1.0)["kd"].item()
    gaps = [abs(distillation_loss(student, labels, torch.from_numpy(TopK.from_logits(logits, k).dense()), 5.0,
                                  1.0)["kd"].item() - full) for k in (5, 50, 500, 999)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.05 * gaps[0]


@pytest.mark.parametrize("dtype, tolerance", [("float32", 0.0), ("float16", 2e-3)])
def test_top_k_files_are_smaller_checksummed_and_read_back(logits, tmp_path, dtype, tolerance):
    ids = [f"img{i}.jpg" for i in range(len(logits))]
    labels = logits.argmax(1)
    full, sparse = tmp_path / "full.parquet", tmp_path / "topk.parquet"
    write_split(full, ids, labels, logits, {})
    write_split(sparse, ids, labels, logits, {}, topk=10, topk_dtype=dtype)
    assert sparse.stat().st_size < 0.1 * full.stat().st_size
    back = logit_store.read_split(sparse)
    assert back.logits is None and back.meta["logits_storage"] == {"kind": "topk", "k": 10, "dtype": dtype}
    expected = TopK.from_logits(logits, 10)
    np.testing.assert_array_equal(back.topk.indices, expected.indices)
    np.testing.assert_allclose(back.topk.values, expected.values, rtol=tolerance, atol=0)
    assert back.aligned_to(ids[::-1], labels[::-1], "test").shape == (64, 1000)
    table = read_cache_table(sparse)
    lse = table.column("logsumexp").to_numpy().copy()
    lse[3] += 0.5
    logit_store.pq.write_table(table.set_column(5, "logsumexp", logit_store.pa.array(lse)).replace_schema_metadata(
        table.schema.metadata), sparse)
    with pytest.raises(KdpipeError, match="checksum"):
        logit_store.read_split(sparse)


def test_cache_teacher_with_topk_and_a_student_trained_from_it(run_cli, image_folder, teacher_dir, tmp_path):
    code, out = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--out", tmp_path / "c",
                        "--topk", "2", "--precision", "fp32", "--workers", "0")
    assert code == 0, out
    split = logit_store.read_split(tmp_path / "c" / "train.parquet")
    assert split.topk.values.shape == (36, 2) and "logits" not in logit_store.pq.read_schema(tmp_path / "c" / "train.parquet").names
    code, out = run_cli("inspect-cache", tmp_path / "c")
    assert code == 0 and "top-2 raw logits (float32) + logsumexp" in out and "checksum ok" in out, out
    report = train_student.run(tiny_train_config(cache=tmp_path / "c", epochs=1, out=tmp_path / "run"))
    assert report.run["cache"]["splits"]["train"]["content_sha256"] == split.meta["content_sha256"]
    code, out = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--out", tmp_path / "c",
                        "--precision", "fp32", "--workers", "0")
    assert code == 0 and "written" in out  # full logits asked: the top-K cache is not reused
    code, out = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--out", tmp_path / "d",
                        "--topk", "3")
    assert code == 1 and "--topk 3 must be below the number of classes (3)" in out


def test_verify_compares_a_top_k_cache_on_its_stored_entries(run_cli, image_folder, teacher_dir, tmp_path):
    """Top-1 of 3 classes: the dense reconstruction spreads the tail over two classes, so it differs from the live
    logits (KL > 0) while the stored entry itself matches them exactly."""
    code, out = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--out", tmp_path / "c",
                        "--topk", "1", "--precision", "fp32", "--workers", "0")
    assert code == 0, out
    replayed = cache_verify.replay(tmp_path / "c", 20, device="cpu")
    assert replayed["max_abs_diff"] < 1e-4 and replayed["agreement"] == 1.0, replayed
    assert replayed["mean_kl"] > 1e-4, replayed  # KL is on the reconstruction, which loses the tail's shape
