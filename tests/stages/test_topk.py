"""Top-K logit storage through the stages (`cache-teacher --topk K`): the cache written and inspected, a student
trained from it, verify replaying it (the format itself, TopK, is tested in tests/unit/test_logit_store.py)."""

from __future__ import annotations

from tests.helpers import tiny_train_config
from kdpipe import cache_verify, logit_store, train_student


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
