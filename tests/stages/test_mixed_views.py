"""Mixed views (cache-teacher --views K --view-mixup a): views blended with another image's view before the
teacher sees them; the blend is stored, replayed exactly for the student and for the fidelity check, and the
student's CE target is the blend's label distribution."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import TINY_STUDENT, read_cache_table, student_and_teacher_views, student_batch
from kdpipe import cache_teacher, cache_verify, data, logit_store, pixels, run_folder, student_data, views
from kdpipe.config import CacheConfig, TrainConfig
from kdpipe.errors import KdpipeError
from kdpipe.loss import distillation_loss

K = 4
POLICY = views.ViewPolicy(mixup=1.0, mixup_p=0.5)


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory, image_folder, teacher_dir):
    out = tmp_path_factory.mktemp("mixed") / "c"
    cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), out=out, precision="fp32",
                                  workers=0, batch_size=16, views=K, augment=POLICY))
    return out


def test_mixes_are_a_pure_function_and_leave_the_crops_as_they_were():
    ids = [f"img{i}" for i in range(30)]
    size_of = lambda j: (40 + j, 40)  # noqa: E731
    a = views.sample_mixes(POLICY, ids, 3, 50, size_of)
    b = views.sample_mixes(POLICY, ids, 3, 50, size_of)
    for f in ("partners", "boxes", "flips", "weights"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    mixed = a.weights > 0
    assert a.weights[0] == 0 and a.partners[0] == -1  # view 0 is the image itself
    assert 10 < mixed.sum() < 40  # about half of 50 views (mixup_p 0.5)
    assert (a.partners[mixed] != 3).all() and (a.partners[mixed] >= 0).all() and len(set(a.partners[mixed])) > 5
    assert ((a.weights[mixed] > 0) & (a.weights[mixed] < 1)).all()
    assert (a.boxes[mixed, 2] <= 40 + a.partners[mixed]).all()  # within the partner's own width
    assert (views.sample_mixes(views.ViewPolicy(), ids, 3, 50, size_of).weights == 0).all()  # mixup 0: none
    # the crops of the image itself do not depend on mixing, and a cache without mixing keeps its reuse key
    np.testing.assert_array_equal(views.sample(POLICY, "img3", 40, 40, 9)[0],
                                  views.sample(views.ViewPolicy(), "img3", 40, 40, 9)[0])
    assert "mixup" not in views.ViewPolicy().to_dict() and POLICY.to_dict()["mixup"] == 1.0


def test_blend_rounds_the_weighted_mean():
    own, other = np.full((2, 2, 3), 10, np.uint8), np.full((2, 2, 3), 251, np.uint8)
    assert (views.blend(own, other, 0.25) == 70).all()  # 0.75 * 10 + 0.25 * 251 = 70.25
    assert (views.blend(own, other, 0.0) == 10).all()


def test_mixes_are_stored_with_their_logits(mixed_cache, image_folder):
    train = logit_store.read_split(mixed_cache / "train.parquet")
    split = data.open_dataset(str(image_folder)).splits["train"]
    assert train.meta["augment"]["policy"]["kind"] == "random-resized-crop+hflip+mixup"
    m = train.mixes
    assert m is not None and (m.weights[train.view == 0] == 0).all() and (m.weights > 0).any()
    for j in range(0, len(train.ids), 5):
        i = split.ids.index(train.ids[j])
        expected = views.sample_mixes(POLICY, split.ids, i, K, lambda r: split.image(r).size)
        v = train.view[j]
        assert m.partners[j] == (split.ids[expected.partners[v]] if expected.weights[v] else "")
        assert m.weights[j] == expected.weights[v] and m.flips[j] == expected.flips[v]
        np.testing.assert_array_equal(m.boxes[j], expected.boxes[v])
    for name in ("validation", "test"):
        assert logit_store.read_split(mixed_cache / f"{name}.parquet").mixes is None


def test_a_changed_partner_fails_the_checksum(mixed_cache, tmp_path):
    table = read_cache_table(mixed_cache / "train.parquet")
    partners = table.column("mix_id").to_pylist()
    j = next(r for r, p in enumerate(partners) if p)
    partners[j] = next(p for p in partners if p and p != partners[j])
    changed = table.set_column(table.schema.get_field_index("mix_id"), "mix_id", pa.array(partners, pa.string()))
    pq.write_table(changed.replace_schema_metadata(table.schema.metadata), tmp_path / "train.parquet")
    logit_store.read_split(mixed_cache / "train.parquet")  # the original reads
    with pytest.raises(KdpipeError, match="checksum"):
        logit_store.read_split(tmp_path / "train.parquet")


def test_the_student_sees_the_teachers_blend_and_learns_its_label_mixture(mixed_cache, image_folder, teacher_dir,
                                                                         tmp_path):
    s, stored, split, teacher_inputs = student_and_teacher_views(mixed_cache, image_folder, teacher_dir,
                                                                 tmp_path / "run", K, POLICY)
    train = s.splits["train"]
    checked = 0
    for i in range(len(split)):
        seen_by_teacher = teacher_inputs[i]["pixel_values"]  # (V, 3, H, W)
        for v in range(1, K + 1):
            j = next(r for r in range(len(stored.ids)) if stored.ids[r] == split.ids[i] and stored.view[r] == v)
            w = stored.mixes.weights[j]
            if not w:
                continue
            row = i * (K + 1) + v
            batch = student_batch(train, i, v)  # what a training step gets, rendered when used
            student_input = pixels.normalise(batch["pixels"], s.inputs["mean_t"], s.inputs["std_t"])[0]
            torch.testing.assert_close(student_input, seen_by_teacher[v], atol=0, rtol=0)  # the same blend
            np.testing.assert_array_equal(batch["teacher_logits"][0].numpy(), stored.logits[j])
            torch.testing.assert_close(batch["labels"][0], train.targets[row], atol=0, rtol=0)
            y, y_partner = split.labels[i], split.labels[split.ids.index(stored.mixes.partners[j])]
            target = np.zeros(3, np.float32)
            target[y] += 1 - w
            target[y_partner] += w
            np.testing.assert_allclose(train.targets[row].numpy(), target, atol=1e-6)
            checked += 1
    assert checked > 5
    unmixed = train.targets[torch.from_numpy(stored.mixes.weights == 0)]  # (rows are image by image, like the cache)
    assert ((unmixed == 0) | (unmixed == 1)).all()


def test_ce_on_a_label_mixture_is_the_mixture_of_ces():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    y, y2, w = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1, 1, 0, 2, 2, 0]), torch.rand(6, generator=g)
    probs = (1 - w)[:, None] * F.one_hot(y, 3) + w[:, None] * F.one_hot(y2, 3)
    parts = distillation_loss(s, probs.float(), t, temperature=5.0, alpha=0.5)
    expected = ((1 - w) * F.cross_entropy(s, y, reduction="none") + w * F.cross_entropy(s, y2, reduction="none")).mean()
    torch.testing.assert_close(parts["ce"], expected)


def test_verify_replays_mixed_views_exactly_and_catches_a_wrong_blend(mixed_cache, image_folder, teacher_dir,
                                                                      tmp_path, run_cli, monkeypatch):
    code, out = run_cli("inspect-cache", mixed_cache, "--verify", "40", "--device", "cpu")
    assert code == 0, out
    diff = float(re.search(r"max \|Δlogit\| (\S+),", out).group(1))
    mixed = int(re.search(r"(\d+) of them mixed", out).group(1))
    assert diff < 1e-4 and mixed > 0 and "agreement 100.00%" in out
    monkeypatch.setattr(views, "blend", lambda own, partner, weight: own)  # a cache whose blends were never made
    cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), out=tmp_path / "c",
                                  precision="fp32", workers=0, batch_size=16, views=K, augment=POLICY))
    monkeypatch.undo()
    r = cache_verify.replay(tmp_path / "c", 60, device="cpu")
    assert r["mixed_views"] > 0 and r["max_abs_diff"] > 1e-3


def test_students_train_on_mixed_views_with_and_without_the_teacher(mixed_cache, tmp_path, run_cli):
    common = ["--cache", mixed_cache, "--views", "--epochs", "1", "--student-config", TINY_STUDENT, "--precision",
              "fp32", "--device", "cpu"]
    for alpha in ("1", "0.9", "0"):  # function matching (pure distillation), the recipe's weight, the λ = 0 twin
        code, out = run_cli("train-student", *common, "--alpha", alpha, "--out", tmp_path / alpha)
        assert code == 0, out
        report = run_folder.load_report(tmp_path / alpha)
        assert report.run["consistency"]["stored_views"]["policy"]["mixup"] == 1.0
        train = report.history[0]["train"]
        assert np.isfinite(train["ce"]) and train["ce"] > 0  # CE is reported in every arm
        if alpha == "1":  # ... and not weighted: the loss is the KD term alone
            assert train["loss"] == pytest.approx(train["kd"], rel=1e-6) and train["loss"] != pytest.approx(train["ce"])
            assert "teacher_agreement" in report.validation and report.test["teacher_agreement"] is not None


def test_pure_distillation_is_the_kd_term_alone_whatever_the_labels():
    """alpha = 1 (function matching): the loss and its gradient are the KD term's, the labels change nothing;
    CE is still computed and reported."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 3, generator=g)
    s0 = torch.randn(6, 3, generator=g)
    hard, other = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 0, 1, 0, 1])
    mixture = F.one_hot(other, 3).float() * 0.3 + F.one_hot(hard, 3).float() * 0.7  # mixed views' targets
    grads = []
    for labels in (hard, other, mixture):
        s = s0.clone().requires_grad_()
        parts = distillation_loss(s, labels, t, temperature=2.0, alpha=1.0)
        assert parts["loss"].item() == parts["kd"].item()  # exactly: (1 - 1) * CE adds 0
        expected_ce = F.cross_entropy(s0, labels)
        torch.testing.assert_close(parts["ce"], expected_ce)  # reported, not weighted
        parts["loss"].backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)
    torch.testing.assert_close(grads[0], grads[2], atol=0, rtol=0)
    s = s0.clone().requires_grad_()
    distillation_loss(s, hard, t, temperature=2.0, alpha=0.9)["loss"].backward()
    assert not torch.equal(s.grad, grads[0])  # below 1 the labels do count


def test_sweeps_treat_pure_distillation_as_a_distilled_config_with_a_twin(tmp_path):
    from tests.helpers import tiny_train_config
    from kdpipe import sweep, sweep_report
    from kdpipe.config import SweepConfig

    cfg = SweepConfig(train=tiny_train_config(cache=tmp_path), space={"alpha": "0,0.9,1", "temperature": "1,5"},
                      seeds=[0, 1])
    keys = sorted({p.config_key for p in sweep.grid_points(cfg)})
    assert keys == ["T1-a0.9", "T1-a1", "T5-a0.9", "T5-a1", "a0"]  # T matters at alpha 1; alpha 0 runs once
    assert TrainConfig(cache=tmp_path, alpha=1.0).run_name().startswith("kd-T5-a1-")
    val = {"T1-a1": [0.95, 0.97], "a0": [0.90, 0.93], "T5-a0.9": [0.91, 0.92]}
    params = {"T1-a1": {"temperature": 1.0, "alpha": 1.0}, "a0": {"alpha": 0.0},
              "T5-a0.9": {"temperature": 5.0, "alpha": 0.9}}
    rows = sorted((sweep_report.ConfigRow(k, params[k], [0, 1], v, 0) for k, v in val.items()),
                  key=lambda r: -r.val_mean)
    runs = {k: [{"seed": s, "validation": v[s], "test": v[s]} for s in range(2)] for k, v in val.items()}
    gain = sweep_report.teacher_gain(rows, runs)
    assert (gain["distilled"], gain["twin"]) == ("T1-a1", "a0")
    assert gain["test"]["gap"] == pytest.approx(0.045) and gain["test"]["paired"]["seeds"] == 2


def test_bad_mixup_flags_are_one_line_errors(image_folder, teacher_dir, tmp_path, run_cli):
    common = ["--dataset", image_folder, "--teacher", teacher_dir, "--out", tmp_path / "c", "--device", "cpu"]
    code, out = run_cli("cache-teacher", *common, "--view-mixup", "1")
    assert code == 1 and "--views K" in out and "Traceback" not in out
    code, out = run_cli("cache-teacher", *common, "--views", "2", "--view-mixup", "-1")
    assert code == 1 and "--view-mixup must be >= 0" in out
    code, out = run_cli("cache-teacher", *common, "--views", "2", "--view-mixup", "1", "--view-mixup-p", "2")
    assert code == 1 and "--view-mixup-p" in out
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").glob("*.parquet"))


def test_a_partner_missing_from_the_dataset_is_a_clear_error(mixed_cache, image_folder):
    split = data.open_dataset(str(image_folder)).splits["train"]
    stored = logit_store.read_split(mixed_cache / "train.parquet").aligned_views(split.ids, split.labels, "t")
    mixes, targets = student_data.mixed_views(stored, split, "t")
    assert targets.shape == (len(split) * (K + 1), 3) and (mixes.partners[mixes.weights > 0] >= 0).all()
    stored.mixes.partners[np.flatnonzero(stored.mixes.weights > 0)[0]] = "elsewhere/gone.png"
    with pytest.raises(KdpipeError, match="missing from the dataset.*gone.png"):
        student_data.mixed_views(stored, split, "t")


def test_verify_against_a_dataset_missing_an_image_is_a_clear_error(mixed_cache, image_folder, tmp_path, run_cli):
    import shutil
    partial = shutil.copytree(image_folder, tmp_path / "partial")
    gone = sorted((partial / "train").rglob("*.png"))[0]
    gone.unlink()  # a cached id of its own rows, and the partner of some mixed views
    code, out = run_cli("inspect-cache", mixed_cache, "--verify", "100000", "--dataset", partial, "--device", "cpu")
    assert code == 1 and "Traceback" not in out, out
    assert re.search(rf"(cached id|mixed-view partner) '[^']*{gone.stem}[^']*' is not in the dataset's 'train' split; "
                     r"pass the dataset it was built from with --dataset", out), out
