"""student_data: the cache and the dataset checked against each other (label issues, changed images), and a
split held as the student sees it (SplitData: the rows of this epoch's views, the teacher's logits of the same
row, label distributions of mixed views). Built from hand-made splits, so each rule is seen on its own."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kdpipe import student_data, views
from kdpipe.errors import KdpipeError
from kdpipe.logit_store import LogitSplit, TopK
from kdpipe.student_data import SharedData, SplitData


@dataclass
class FakeSplit:
    """What student_data reads of a data.Split: ids, labels, per-image digests and the content fingerprint."""
    name: str
    ids: list[str]
    labels: np.ndarray
    contents: list[bytes]  # each image's bytes

    def __len__(self):
        return len(self.ids)

    def digests(self) -> np.ndarray:
        return np.array([np.frombuffer(hashlib.sha256(c).digest(), np.uint8) for c in self.contents])

    def fingerprint(self) -> str:
        return hashlib.sha256(repr((self.ids, self.labels.tolist(), self.contents)).encode()).hexdigest()


@dataclass
class FakeDataset:
    label_names: list[str]
    splits: dict


def split(name: str, ids: list[str], labels: list[int], contents: list[bytes] | None = None) -> FakeSplit:
    return FakeSplit(name, ids, np.array(labels, dtype=np.int64), contents or [i.encode() for i in ids])


# ------------------------------------------------------------------------------------------ label issues


def test_clean_labels_have_no_issues():
    ds = FakeDataset(["a", "b"], {"train": split("train", ["x", "y"], [0, 1]),
                                  "test": split("test", ["z"], [1])})
    assert student_data.label_issues(ds, "train") == {}
    assert student_data.describe_label_issues({}, "train") == ""


def test_label_issues_name_a_class_never_trained_on_and_one_image_under_two_labels():
    ds = FakeDataset(["a", "b", "c"], {
        "train": split("train", ["a/1.png", "b/1.png", "a/2.png"], [0, 1, 0], [b"one", b"one", b"two"]),
        "test": split("test", ["c/1.png"], [2], [b"three"])})
    issues = student_data.label_issues(ds, "train")
    assert issues["classes_without_training_images"] == ["c"]
    assert issues["images_with_two_labels"] == {"pairs": 1, "example": "a/1.png (train, a) = b/1.png (train, b)"}
    text = student_data.describe_label_issues(issues, "train")
    assert "1 class(es) with no image in --train-split train (c)" in text and "1 identical image(s)" in text


def test_an_image_in_train_and_test_is_listed_apart_and_not_refused():
    ds = FakeDataset(["a", "b"], {"train": split("train", ["a/1.png", "b/1.png"], [0, 1], [b"one", b"two"]),
                                  "test": split("test", ["a/9.png"], [0], [b"one"])})
    issues = student_data.label_issues(ds, "train")
    assert issues == {"images_in_train_and_another_split": {"pairs": 1,
                                                            "example": "a/1.png (train, a) = a/9.png (test, a)"}}
    assert student_data.describe_label_issues(issues, "train") == ""  # a warning, recorded, not a refusal


def test_identical_images_outside_the_train_split_are_not_an_overlap():
    ds = FakeDataset(["a", "b"], {"train": split("train", ["a/1.png", "b/1.png"], [0, 1]),
                                  "validation": split("validation", ["a/5.png"], [0], [b"same"]),
                                  "test": split("test", ["a/9.png"], [0], [b"same"])})
    assert student_data.label_issues(ds, "train") == {}


# --------------------------------------------------------------------------------------- changed images


def cached(s: FakeSplit, fingerprint: str, digests: np.ndarray | None) -> LogitSplit:
    n = len(s)
    return LogitSplit(list(s.ids), s.labels, np.zeros((n, 2), np.float32), view=np.zeros(n, np.int16),
                      digests=digests, meta={"dataset_fingerprint": fingerprint})


def test_changed_images_are_counted_and_named_per_split():
    before = split("train", ["p", "q", "r"], [0, 1, 0])
    after = split("train", ["p", "q", "r"], [0, 1, 0], [b"p", b"Q!", b"R!"])
    cache = {"train": cached(before, before.fingerprint(), before.digests())}
    changed = student_data.changed_images(cache, FakeDataset(["a", "b"], {"train": after}))
    assert changed == {"train": {"examples": 2, "of": 3, "example": "q"}}
    assert student_data.describe_changed(changed) == "2 examples changed since the cache was built (split 'train': 2 of 3; e.g. q)"


def test_the_same_contents_in_another_order_are_unchanged():
    before = split("train", ["p", "q", "r"], [0, 1, 0])
    reordered = split("train", ["r", "p", "q"], [0, 0, 1])  # another fingerprint, the same images
    cache = {"train": cached(before, before.fingerprint(), before.digests())}
    assert reordered.fingerprint() != before.fingerprint()
    assert student_data.changed_images(cache, FakeDataset(["a", "b"], {"train": reordered})) == {}


def test_a_cache_without_digests_says_which_split_but_not_which_images():
    before = split("train", ["p", "q"], [0, 1])
    after = split("train", ["p", "q"], [0, 1], [b"P!", b"q"])
    changed = student_data.changed_images({"train": cached(before, before.fingerprint(), None)},
                                          FakeDataset(["a", "b"], {"train": after}))
    assert changed == {"train": {"examples": None, "of": 2, "example": None}}
    assert "split 'train' differ" in student_data.describe_changed(changed)


def test_splits_the_cache_does_not_hold_are_not_compared():
    s = split("test", ["p"], [0])
    assert student_data.changed_images({}, FakeDataset(["a"], {"test": s})) == {}
    assert student_data.changed_images(None, FakeDataset(["a"], {"test": s})) == {}


# ----------------------------------------------------------------------------------- a split as trained


def views_split(targets: bool = False, topk: bool = False) -> SplitData:
    """3 images x 2 views: pixel row r filled with r, teacher row r = [r, -r, 0]."""
    rows = 6
    u8 = torch.arange(rows, dtype=torch.uint8)[:, None, None, None].expand(rows, 2, 2, 3).clone()
    r = torch.arange(rows, dtype=torch.float32)
    logits = torch.stack([r, -r, torch.zeros(rows)], 1)  # (6, 3)
    teacher = TopK.from_logits(logits.numpy(), 3) if topk else logits
    dist = torch.eye(3)[torch.tensor([0, 1, 2, 2, 1, 0])] if targets else None
    data = SplitData("train", ["i0", "i1", "i2"], u8, torch.tensor([0, 1, 2]), teacher, per_image=2, targets=dist)
    data.view_of = torch.tensor([1, 0, 1])  # this epoch: image 0 view 1, image 1 view 0, image 2 view 1
    return data


@pytest.mark.parametrize("topk", [False, True])
def test_a_batch_takes_each_images_view_of_this_epoch_with_its_teacher_row(topk):
    batch = views_split(topk=topk).batch(torch.tensor([2, 0, 1]), torch.device("cpu"))
    rows = [5, 1, 2]  # image i, view v: row 2 * i + v
    assert batch["pixels"][:, 0, 0, 0].tolist() == rows
    torch.testing.assert_close(batch["teacher_logits"],
                               torch.tensor([[r, -r, 0.0] for r in rows]), atol=1e-5, rtol=0)
    assert batch["labels"].tolist() == [2, 0, 1]  # an image's label, whichever its view


def test_mixed_views_give_the_label_distribution_of_the_view_taken():
    batch = views_split(targets=True).batch(torch.tensor([2, 0]), torch.device("cpu"))
    torch.testing.assert_close(batch["labels"], torch.eye(3)[torch.tensor([0, 1])])  # rows 5 and 1


def test_the_label_distribution_of_a_mixed_view_is_the_weighted_pair_of_one_hots():
    s = split("train", ["i0", "i1"], [0, 2])
    mixes = views.Mixes(np.array(["", "i1", "", "i0"], dtype=object), np.zeros((4, 4), np.float32),
                        np.zeros(4, bool), np.array([0, 0.25, 0, 0.5], np.float32))
    stored = LogitSplit(["i0", "i0", "i1", "i1"], np.array([0, 0, 2, 2]), np.zeros((4, 3), np.float32),
                        view=np.array([0, 1, 0, 1], np.int16), mixes=mixes, meta={"views": 2, "num_classes": 3})
    mixed, targets = student_data.mixed_views(stored, s, "here")
    assert mixed.partners.tolist() == [-1, 1, -1, 0]  # partners as split indices
    torch.testing.assert_close(targets, torch.tensor([[1, 0, 0], [0.75, 0, 0.25], [0, 0, 1], [0.5, 0, 0.5]]))


def test_shared_data_builds_each_key_once():
    built = []
    shared = SharedData()
    for key in [("cache", 1), ("cache", 1), ("cache", 2)]:
        shared.get(key, lambda: built.append(key) or len(built))
    assert built == [("cache", 1), ("cache", 2)] and shared.get(("cache", 1), lambda: 0) == 1


@pytest.mark.parametrize("processor, expected", [
    ({"do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}}, 224),
    ({"do_center_crop": False, "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}}, 256),
    ({"size": {"height": 32, "width": 48}}, 32),
    ({"size": 384}, 384),
    ({}, None),
])
def test_the_teachers_input_size_is_its_crop_if_it_crops_else_its_resize(processor, expected):
    assert student_data.teacher_input_size({"train": LogitSplit([], np.zeros(0), None,
                                                                meta={"processor": processor})}) == expected
    assert student_data.teacher_input_size(None) is None


def test_distilling_needs_the_train_split_in_the_cache():
    from types import SimpleNamespace

    cfg = SimpleNamespace(alpha=0.5, train_split="train", cache="c")
    with pytest.raises(KdpipeError, match="--cache c has no 'train' split; cache it or use --alpha 0"):
        student_data.require_train_split(cfg, {"test": None})
    student_data.require_train_split(SimpleNamespace(alpha=0.0, train_split="train", cache=None), None)
