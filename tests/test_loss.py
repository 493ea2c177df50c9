"""The distillation loss against a hand computation."""

import math

import numpy as np
import pytest
import torch

from pipeline import metrics
from pipeline.loss import distillation_loss

S = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
TEACHER = torch.tensor([[3.0, 1.0, 0.0], [-1.0, 2.0, 0.5]])
Y = torch.tensor([0, 2])


def softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def hand_kd(t):
    """T^2 * mean over examples of sum_c p_c log(p_c / q_c), written out with plain floats."""
    total = 0.0
    for s_row, t_row in zip(S.tolist(), TEACHER.tolist()):
        p, q = softmax(t_row, t), softmax(s_row, t)
        total += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))
    return t * t * total / len(S)


def hand_ce():
    return -sum(math.log(softmax(row, 1)[y]) for row, y in zip(S.tolist(), Y.tolist())) / len(S)


@pytest.mark.parametrize("t", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_matches_the_formula(t, alpha):
    parts = distillation_loss(S, Y, TEACHER, temperature=t, alpha=alpha)
    assert parts["ce"].item() == pytest.approx(hand_ce(), rel=1e-5)
    expected_kd = 0.0 if alpha == 0 else hand_kd(t)
    assert parts["kd"].item() == pytest.approx(expected_kd, rel=1e-5, abs=1e-7)
    assert parts["loss"].item() == pytest.approx((1 - alpha) * hand_ce() + alpha * expected_kd, rel=1e-5)


def test_t_squared_scaling_is_applied():
    # For large T, KL(softmax(t/T) || softmax(s/T)) ~ sum of squared centred logit gaps / (2 C T^2),
    # so T^2 * KL approaches a constant: without the T^2 factor it would shrink like 1/T^2.
    kd = [distillation_loss(S, Y, TEACHER, temperature=t, alpha=1.0)["kd"].item() for t in (50.0, 100.0)]
    assert kd[0] == pytest.approx(kd[1], rel=0.01)


def test_alpha_zero_needs_no_teacher_and_one_ignores_labels():
    assert distillation_loss(S, Y, None, alpha=0.0)["loss"].item() == pytest.approx(hand_ce(), rel=1e-5)
    a = distillation_loss(S, Y, TEACHER, alpha=1.0)["loss"].item()
    b = distillation_loss(S, torch.tensor([1, 1]), TEACHER, alpha=1.0)["loss"].item()
    assert a == b
    with pytest.raises(ValueError):
        distillation_loss(S, Y, None, alpha=0.5)


def test_loss_gradient_flows_to_the_student_only():
    s = S.clone().requires_grad_(True)
    t = TEACHER.clone().requires_grad_(True)
    distillation_loss(s, Y, t, alpha=0.5)["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # the parts are reported detached
    assert not distillation_loss(s, Y, t)["kd"].requires_grad


def test_metrics_by_hand():
    logits = np.array([[2, 1, 0], [0, 2, 1], [0, 1, 2], [2, 0, 1]], dtype=float)
    labels = np.array([0, 1, 1, 2])
    assert metrics.accuracy(logits, labels) == 0.5
    cm = metrics.confusion_matrix(logits.argmax(1), labels, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    # F1 per class: c0 = 2/(2+1) , c1 = 2/(2+1), c2 = 0
    assert metrics.macro_f1(logits, labels) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert metrics.agreement(logits, logits[[1, 0, 2, 3]]) == 0.5
    assert metrics.kl_to_teacher(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert metrics.kl_to_teacher(S.numpy(), TEACHER.numpy()) == pytest.approx(hand_kd(1.0), rel=1e-6)
