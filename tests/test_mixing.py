"""train-student --mix mixup|cutmix: the mixed inputs, the mixed targets against a hand computation, a run
that records the approximation, and runs or sweeps started before a setting existed still resuming."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY_STUDENT
from kdpipe import mixing, run_folder
from kdpipe.config import TrainConfig, without_new_defaults
from kdpipe.errors import KdpipeError
from kdpipe.loss import distillation_loss

S = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, -1.0, 0.0]])  # (B, C) student
T = torch.tensor([[3.0, 1.0, 0.0], [-1.0, 2.0, 0.5], [0.0, 0.0, 4.0]])  # (B, C) teacher
Y = torch.tensor([0, 2, 1])
PERM = torch.tensor([2, 0, 1])


def _batch(b=4, h=10, w=12):
    return torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, 3, h, w).clone() + 1  # image i = i + 1


def test_mixup_is_the_convex_combination_with_a_permutation():
    x = _batch()
    mix = mixing.sample("mixup", 0.4, x.shape, torch.Generator().manual_seed(0))
    assert 0 < mix.lam < 1 and sorted(mix.perm.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(mixing.apply(x, mix), mix.lam * x + (1 - mix.lam) * x[mix.perm])
    assert x[:, 0, 0, 0].tolist() == [1, 2, 3, 4]  # the input is left as it was


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_lam_is_the_area_kept(seed):
    x = _batch()
    mix = mixing.sample("cutmix", 1.0, x.shape, torch.Generator().manual_seed(seed))
    out = mixing.apply(x, mix)
    kept = (out == x).all(dim=1).float().mean(dim=(1, 2))  # (B,) fraction of pixels still the image's own
    moved = [i for i in range(4) if mix.perm[i] != i]
    assert moved and kept[moved].tolist() == pytest.approx([mix.lam] * len(moved))
    top, left, bottom, right = mix.box
    assert (out[:, :, top:bottom, left:right] == x[mix.perm][:, :, top:bottom, left:right]).all()


def test_the_same_generator_state_gives_the_same_mix():
    a, b = (mixing.sample("cutmix", 1.0, (4, 3, 10, 12), torch.Generator().manual_seed(7)) for _ in range(2))
    assert a.lam == b.lam and a.box == b.box and torch.equal(a.perm, b.perm)


def _softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_mixed_targets_match_a_hand_computation(lam):
    t = 4.0
    parts = distillation_loss(S, Y, T, temperature=t, alpha=0.5, mix=mixing.Mix(lam, PERM))
    ce = kd = 0.0
    for i, (s_row, y) in enumerate(zip(S.tolist(), Y.tolist())):
        q1 = _softmax(s_row, 1)
        ce += -(lam * math.log(q1[y]) + (1 - lam) * math.log(q1[Y[PERM[i]]]))
        p = [lam * a + (1 - lam) * b for a, b in zip(_softmax(T[i].tolist(), t), _softmax(T[PERM[i]].tolist(), t))]
        kd += sum(pc * math.log(pc / qc) for pc, qc in zip(p, _softmax(s_row, t)))
    ce, kd = ce / len(S), t * t * kd / len(S)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(0.5 * ce + 0.5 * kd, rel=1e-5)


def test_lam_one_is_the_unmixed_loss():
    plain = distillation_loss(S, Y, T, temperature=5.0, alpha=0.7)
    mixed = distillation_loss(S, Y, T, temperature=5.0, alpha=0.7, mix=mixing.Mix(1.0, PERM))
    assert {k: round(v.item(), 6) for k, v in plain.items()} == {k: round(v.item(), 6) for k, v in mixed.items()}


def test_a_student_trains_with_cutmix_and_records_the_approximation(cache_dir, tmp_path, run_cli):
    code, out = run_cli("train-student", "--cache", cache_dir, "--mix", "cutmix", "--epochs", "1", "--student-config",
                        TINY_STUDENT, "--precision", "fp32", "--device", "cpu", "--out", tmp_path / "r")
    assert code == 0, out
    mix = run_folder.load_report(tmp_path / "r").run["consistency"]["mix"]
    assert mix["kind"] == "cutmix" and "approximation" in mix["note"]
    code, out = run_cli("train-student", "--cache", cache_dir, "--mix", "blend", "--out", tmp_path / "x")
    assert code == 1 and "--mix must be one of" in out and "Traceback" not in out
    with pytest.raises(KdpipeError, match="--mix-alpha"):
        TrainConfig(cache=cache_dir, mix="mixup", mix_alpha=0)


def test_settings_added_later_at_their_default_do_not_block_a_resume():
    now = TrainConfig(cache=".", seed=3).to_dict()
    older = {k: v for k, v in now.items() if k not in ("mix", "mix_alpha")}  # written before --mix existed
    assert without_new_defaults(now, older) == older
    changed = TrainConfig(cache=".", seed=3, mix="mixup").to_dict()
    assert without_new_defaults(changed, older)["mix"] == "mixup"  # a setting really changed still differs
