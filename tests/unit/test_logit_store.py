"""Stage one writes as rows stream in (logit_store.SplitWriter): many row groups, a checksum computed on
the fly that verify() checks a batch at a time, and the ranks' parts merged back in dataset order."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers import read_cache_table, write_split
from kdpipe import cache_teacher, logit_store
from kdpipe.errors import KdpipeError


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
