"""logit_store, the cache format: a split written as rows stream in (SplitWriter: many row groups, a checksum
computed on the fly that verify() checks a batch at a time, nothing under the final name until complete); read
back joined by id, streamed, refused with one line when unreadable; reused only for the same inputs; top-K
storage (TopK) with exact top-K probabilities and tail mass at T = 1, smaller files, checksummed like full logits."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import torch

from tests.helpers import read_cache_table, write_split
from kdpipe import logit_store
from kdpipe.errors import KdpipeError
from kdpipe.logit_store import TopK


def _rows(n: int, c: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"img/{i:05d} ü.jpg" for i in range(n)]
    return ids, rng.integers(0, c, n), rng.normal(0, 3, (n, c)).astype(np.float32)


@pytest.mark.parametrize("topk", [None, 3])
def test_a_file_written_in_pieces_equals_one_written_at_once(tmp_path, topk):
    ids, labels, logits = _rows(1000)
    whole = tmp_path / "whole.parquet"
    write_split(whole, ids, labels, logits, {"split": "train"}, topk=topk)
    pieces = tmp_path / "pieces.parquet"
    with logit_store.SplitWriter(pieces, 7, topk=topk, rows_per_group=128) as w:
        for start in range(0, 1000, 37):  # batches that do not line up with row groups
            w.write(logit_store.Rows(ids[start:start + 37], labels[start:start + 37], logits[start:start + 37]))
        w.close({"split": "train"})
    assert pq.ParquetFile(pieces).metadata.num_row_groups == 8  # ceil(1000 / 128): flushed as it went
    a, b = logit_store.read_split(whole), logit_store.read_split(pieces)
    assert a.meta["content_sha256"] == b.meta["content_sha256"] and b.ids == ids
    np.testing.assert_array_equal(a.teacher_logits(), b.teacher_logits())
    assert logit_store.verify(pieces)["rows"] == 1000


def test_verify_streams_and_still_catches_one_changed_value(tmp_path):
    ids, labels, logits = _rows(300)
    path = tmp_path / "s.parquet"
    with logit_store.SplitWriter(path, 7, rows_per_group=64) as w:
        w.write(logit_store.Rows(ids, labels, logits))
        w.close({})
    table = read_cache_table(path)
    flipped = table.column("logits").combine_chunks().flatten().to_numpy().copy()
    flipped[-1] += 1e-3
    import pyarrow as pa

    pq.write_table(table.set_column(3, "logits", pa.FixedSizeListArray.from_arrays(pa.array(flipped), 7)), path,
                   row_group_size=64)
    with pytest.raises(KdpipeError, match="checksum"):
        logit_store.verify(path)


def test_an_exception_mid_write_leaves_nothing_under_the_final_name(tmp_path):
    ids, labels, logits = _rows(50)
    path = tmp_path / "s.parquet"
    with pytest.raises(RuntimeError):
        with logit_store.SplitWriter(path, 7, rows_per_group=8) as w:
            w.write(logit_store.Rows(ids[:20], labels[:20], logits[:20]))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- reading: joins, streams, refusals


def test_aligned_to_joins_by_id_and_refuses_other_examples_or_labels(tmp_path):
    ids, labels, logits = _rows(5)
    write_split(tmp_path / "s.parquet", ids, labels, logits, {})
    stored = logit_store.read_split(tmp_path / "s.parquet")
    order = [3, 0, 4, 1, 2]
    np.testing.assert_array_equal(stored.aligned_to([ids[i] for i in order], labels[order], "here"), logits[order])
    with pytest.raises(KdpipeError, match=r"here: cache and dataset hold different examples \(1 ids missing"):
        stored.aligned_to(ids[:4] + ["new.jpg"], labels, "here")
    with pytest.raises(KdpipeError, match=r"1 extra ids in the cache"):
        stored.aligned_to(ids[:4], labels[:4], "here")
    relabelled = labels.copy()
    relabelled[2] += 1
    with pytest.raises(KdpipeError, match=f"here: 1 examples have other labels .*e.g. {ids[2]}"):
        stored.aligned_to(ids, relabelled, "here")


def test_changed_images_names_the_rows_whose_bytes_differ_in_the_order_asked(tmp_path):
    ids, labels, logits = _rows(4)
    digests = np.arange(4 * 32, dtype=np.uint8).reshape(4, 32)
    with logit_store.SplitWriter(tmp_path / "s.parquet", 7, with_digests=True) as w:
        w.write(logit_store.Rows(ids, labels, logits, digests=digests))
        w.close({})
    stored = logit_store.read_split(tmp_path / "s.parquet")
    now = digests.copy()
    now[1, 0] ^= 1
    now[3, 31] ^= 1
    assert stored.changed_images(ids[::-1], now[::-1]) == [ids[3], ids[1]]
    assert stored.changed_images(ids, digests) == []
    write_split(tmp_path / "old.parquet", ids, labels, logits, {})  # no digests stored
    assert logit_store.read_split(tmp_path / "old.parquet").changed_images(ids, now) is None


@pytest.mark.parametrize("take", [1, 5, 64, 100, 1000])
def test_a_row_stream_gives_every_row_once_in_order_whatever_the_row_groups(tmp_path, take):
    ids, labels, logits = _rows(300)
    with logit_store.SplitWriter(tmp_path / "s.parquet", 7, rows_per_group=64) as w:
        w.write(logit_store.Rows(ids, labels, logits))
        w.close({})
    stream, got = logit_store.RowStream(tmp_path / "s.parquet", columns=["id", "label"]), []
    while (table := stream.take(take)).num_rows:
        assert table.num_rows == min(take, 300 - len(got)) and table.column_names == ["id", "label"]
        got += table.column("id").to_pylist()
    assert got == ids


def test_unreadable_files_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(KdpipeError, match="no such file; build the cache"):
        logit_store.read_meta(tmp_path / "gone.parquet")
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(KdpipeError, match=r"text.parquet: not a readable Parquet file"):
        logit_store.read_meta(tmp_path / "text.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(KdpipeError, match=r"other.parquet: not a kdpipe logit cache \(no 'kdpipe' metadata\)"):
        logit_store.read_meta(tmp_path / "other.parquet")
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({b"kdpipe": b"{not json"}), tmp_path / "bad.parquet")
    with pytest.raises(KdpipeError, match=r"bad.parquet: its metadata is damaged"):
        logit_store.read_meta(tmp_path / "bad.parquet")


def test_a_cache_folder_is_its_parquet_files_by_split_name(tmp_path):
    with pytest.raises(KdpipeError, match="no such folder"):
        logit_store.cache_splits(tmp_path / "c")
    (tmp_path / "c").mkdir()
    with pytest.raises(KdpipeError, match="holds no .parquet split files"):
        logit_store.cache_splits(tmp_path / "c")
    for name in ("train", "test"):
        (tmp_path / "c" / f"{name}.parquet").touch()
    assert logit_store.cache_splits(tmp_path / "c") == {"test": tmp_path / "c" / "test.parquet",
                                                       "train": tmp_path / "c" / "train.parquet"}
    with pytest.raises(KdpipeError, match="--cache .*train.parquet: a file; pass the folder"):
        logit_store.cache_splits(tmp_path / "c" / "train.parquet")


# ------------------------------------------------------------------------------------ reuse and provenance


KEY = {"teacher": {"spec": "t"}, "processor": {"size": 32}, "dataset_fingerprint": "f", "label_names": ["a", "b"],
       "precision": "fp32", "logits_storage": logit_store.FULL, "augment": None}


def test_a_file_is_reused_only_when_every_key_field_matches():
    assert logit_store.matches({**KEY, "format_version": 3}, KEY)
    assert logit_store.matches({**KEY, "format_version": 2}, KEY)  # format 3 only added a column
    assert not logit_store.matches({**KEY, "format_version": 1}, KEY)
    for field in ("teacher", "processor", "dataset_fingerprint", "label_names", "precision", "logits_storage",
                  "augment"):  # what determines the logits
        assert not logit_store.matches({**KEY, "format_version": 3, field: "other"}, KEY), field
    old = {k: v for k, v in KEY.items() if k not in ("logits_storage", "augment")}  # written before those existed
    assert logit_store.matches({**old, "format_version": 2}, KEY)


def meta(teacher="t", dataset="/data/beans", labels=("a", "b")) -> dict:
    return {"teacher": {"spec": teacher}, "processor": {"size": 32}, "label_names": list(labels),
            "dataset": {"kind": "local", "spec": dataset, "root": dataset}}


def test_splits_from_another_source_are_named_against_the_majority():
    logit_store.check_one_source({"train": meta(), "test": meta()}, "here")  # one source: fine
    with pytest.raises(KdpipeError, match=r"here: split 'validation' comes from another teacher \(u\) than 'train', "
                                          r"'test' \(t\)"):
        logit_store.check_one_source({"train": meta(), "validation": meta(teacher="u"), "test": meta()}, "here")
    with pytest.raises(KdpipeError, match=r"split 'test' has other labels"):
        logit_store.check_one_source({"test": meta(labels=("b", "a")), "train": meta()}, "here")  # tie: train wins
    with pytest.raises(KdpipeError, match=r"split 'test' comes from another dataset \(/data/other\)"):
        logit_store.check_one_source({"train": meta(), "test": meta(dataset="/data/other")}, "here")


# ------------------------------------------------------------------------------- top-K storage (TopK)


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
