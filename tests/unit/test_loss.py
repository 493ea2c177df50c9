"""The distillation losses (kd, dkd, dist, logit standardisation) against hand computations and the papers'
formulas written out independently with plain floats; their limiting cases; autocast; the rules for top-K
caches and mixed targets; a tiny end-to-end run of each new loss through the CLI; and a toy loss registered as
one entry of loss.LOSSES that the config checks, the target checks, training and the model card all follow."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import TINY_STUDENT, tiny_train_config
from kdpipe import cache_teacher, loss, metrics, settings, student_data, train_student
from kdpipe.config import CacheConfig, SweepConfig, TrainConfig, applicable
from kdpipe.errors import KdpipeError
from kdpipe.loss import LOSSES, compute, distillation_loss, dist_loss, dkd_loss, pearson, topk_refusal, zscore
from kdpipe.logit_store import TopK
from kdpipe.views import ViewPolicy

S = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
TEACHER = torch.tensor([[3.0, 1.0, 0.0], [-1.0, 2.0, 0.5]])
Y = torch.tensor([0, 2])


BETA_GAMMA = {"dkd_beta": 8.0, "dist_gamma": 1.0}  # loss.compute takes every setting (TrainConfig holds the defaults)


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
    assert distillation_loss(S, Y, None, temperature=5.0, alpha=0.0)["loss"].item() == pytest.approx(hand_ce(), rel=1e-5)
    a = distillation_loss(S, Y, TEACHER, temperature=5.0, alpha=1.0)["loss"].item()
    b = distillation_loss(S, torch.tensor([1, 1]), TEACHER, temperature=5.0, alpha=1.0)["loss"].item()
    assert a == b
    with pytest.raises(ValueError):
        distillation_loss(S, Y, None, temperature=5.0, alpha=0.5)


def test_loss_gradient_flows_to_the_student_only():
    s = S.clone().requires_grad_(True)
    t = TEACHER.clone().requires_grad_(True)
    distillation_loss(s, Y, t, temperature=5.0, alpha=0.5)["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # the parts are reported detached
    assert not distillation_loss(s, Y, t, temperature=5.0, alpha=0.5)["kd"].requires_grad


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
    # NLL: log 3 for a uniform guess; by hand on the first two rows; torch's cross-entropy on S
    assert metrics.nll(np.zeros((4, 3)), labels) == pytest.approx(np.log(3))
    by_hand = [np.log(np.exp([2, 1, 0]).sum()) - 2, np.log(np.exp([0, 2, 1]).sum()) - 2]
    assert metrics.nll(logits[:2], labels[:2]) == pytest.approx(np.mean(by_hand))
    assert metrics.nll(S.numpy(), Y.numpy()) == pytest.approx(F.cross_entropy(S.double(), Y).item(), rel=1e-9)
    assert metrics.classification_report(logits, labels)["nll"] == pytest.approx(metrics.nll(logits, labels))
    assert metrics.kl_to_teacher(S.numpy(), TEACHER.numpy()) == pytest.approx(hand_kd(1.0), rel=1e-6)


# ------------------------------------------------------------------------------ kd: today's, bit for bit


def _hinton_as_of_today(s, labels, t, temperature, alpha):
    """distillation_loss as it stood before dkd/dist (commit cc1fe50), kept verbatim (less its batch-mixing
    branch, since removed with --mix) as the reference."""
    s = s.float()
    ce = F.cross_entropy(s, labels)
    if alpha == 0 or t is None:
        return {"loss": ce, "ce": ce.detach(), "kd": torch.zeros((), device=s.device)}
    log_p_student = F.log_softmax(s / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t.float() / temperature, dim=-1)
    kd = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
    return {"loss": (1 - alpha) * ce + alpha * kd, "ce": ce.detach(), "kd": kd.detach()}


DISTRIBUTIONS = torch.tensor([[0.8, 0.2, 0.0], [0.0, 0.5, 0.5]])


@pytest.mark.parametrize("labels", [Y, DISTRIBUTIONS])
@pytest.mark.parametrize("t, alpha", [(5.0, 0.5), (1.0, 0.3), (2.0, 1.0), (5.0, 0.0)])
def test_kd_is_unchanged_bit_for_bit(labels, t, alpha):
    want = _hinton_as_of_today(S, labels, TEACHER, t, alpha)
    for got in (distillation_loss(S, labels, TEACHER, t, alpha),
                compute("kd", S, labels, TEACHER, temperature=t, alpha=alpha, **BETA_GAMMA)):
        assert set(got) == set(LOSSES["kd"].parts)
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_kd_keeps_todays_values():
    # printed by the kd of commit cc1fe50 (float32), before dkd and dist existed
    parts = distillation_loss(S, Y, TEACHER, 5.0, 0.5)
    assert [parts[k].item() for k in ("loss", "ce", "kd")] == pytest.approx(
        [0.49120858311653137, 0.6216270923614502, 0.36079007387161255], rel=1e-6)
    parts = distillation_loss(S, Y, TEACHER, 1.0, 0.3)
    assert [parts[k].item() for k in ("loss", "kd")] == pytest.approx([0.5073052048683167, 0.2405541092157364],
                                                                      rel=1e-6)


# --------------------------------------------------------------------------------------------- dkd


def hand_dkd(s_rows, t_rows, labels, t, beta):
    """Zhao et al. (2022) eq. 2-5 with plain floats: b = [p_y, 1 - p_y], p^_c = p_c / (1 - p_y) for c != y,
    TCKD = T^2 KL(b_t || b_s), NCKD = T^2 KL(p^_t || p^_s), both averaged over examples."""
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(s_rows, t_rows, labels):
        ps, pt = softmax(s_row, t), softmax(t_row, t)
        bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
        tckd += sum(a * math.log(a / b) for a, b in zip(bt, bs))
        hs = [p / (1 - ps[y]) for c, p in enumerate(ps) if c != y]
        ht = [p / (1 - pt[y]) for c, p in enumerate(pt) if c != y]
        nckd += sum(a * math.log(a / b) for a, b in zip(ht, hs))
    n = len(labels)
    return t * t * tckd / n, t * t * nckd / n


@pytest.mark.parametrize("t", [1.0, 4.0])
@pytest.mark.parametrize("alpha, beta", [(0.5, 8.0), (0.3, 0.5), (1.0, 2.0)])
def test_dkd_matches_the_formula(t, alpha, beta):
    parts = dkd_loss(S, Y, TEACHER, t, alpha, beta)
    tckd, nckd = hand_dkd(S.tolist(), TEACHER.tolist(), Y.tolist(), t, beta)
    assert set(parts) == set(LOSSES["dkd"].parts)
    tol = 1e-6 * t * t  # float32 KL between close distributions: differences of logs of size ~1, times T^2
    assert parts["tckd"].item() == pytest.approx(tckd, rel=1e-5, abs=tol)
    assert parts["nckd"].item() == pytest.approx(nckd, rel=1e-5, abs=tol)
    assert parts["kd"].item() == pytest.approx(tckd + beta * nckd, rel=1e-5, abs=(1 + beta) * tol)
    assert parts["loss"].item() == pytest.approx((1 - alpha) * hand_ce() + alpha * (tckd + beta * nckd), rel=1e-5,
                                                 abs=(1 + beta) * tol)


def test_dkd_by_hand_on_two_classes():
    # C = 2: the non-target distribution is one class with probability 1, so NCKD = 0 and TCKD is Hinton's
    # KL. Student logits (0, 0): b_s = (1/2, 1/2); teacher (ln 3, 0): b_t = (3/4, 1/4); label 0, T = 1:
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812...
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    parts = dkd_loss(s, torch.tensor([0]), t, temperature=1.0, alpha=1.0, beta=8.0)
    assert parts["nckd"].item() == pytest.approx(0.0, abs=1e-7)
    assert parts["tckd"].item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)
    assert parts["loss"].item() == pytest.approx(0.1308120, rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_dkd_decomposes_hintons_kd(t):
    """Per example, KD = TCKD + (1 - p_y,teacher) * NCKD (Zhao et al., eq. 5): DKD reweights Hinton's terms."""
    for i in range(len(S)):
        s, teacher, y = S[i:i + 1], TEACHER[i:i + 1], Y[i:i + 1]
        parts = dkd_loss(s, y, teacher, t, alpha=1.0, beta=1.0)
        p_target = torch.softmax(teacher / t, -1)[0, y].item()
        kd = distillation_loss(s, y, teacher, t, alpha=1.0)["kd"].item()
        assert kd == pytest.approx(parts["tckd"].item() + (1 - p_target) * parts["nckd"].item(), rel=1e-5)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_dkd_with_beta_zero_is_the_alpha_weighted_target_term(alpha):
    parts = dkd_loss(S, Y, TEACHER, 4.0, alpha, beta=0.0)
    tckd, _ = hand_dkd(S.tolist(), TEACHER.tolist(), Y.tolist(), 4.0, 0.0)
    assert parts["kd"].item() == parts["tckd"].item() == pytest.approx(tckd, rel=1e-5, abs=16e-6)
    assert parts["loss"].item() == pytest.approx((1 - alpha) * hand_ce() + alpha * tckd, rel=1e-5, abs=16e-6)
    assert dkd_loss(S, Y, TEACHER, 4.0, alpha, beta=8.0)["loss"].item() > parts["loss"].item()  # NCKD > 0 here


def test_dkd_stays_finite_when_the_target_is_certain():
    # the student's and the teacher's target probabilities round to 1 in float32: 1 - p_y would be 0
    s = torch.tensor([[60.0, -40.0, -45.0]], requires_grad=True)
    t = torch.tensor([[80.0, -30.0, -50.0]])
    parts = dkd_loss(s, torch.tensor([0]), t, temperature=1.0, alpha=1.0, beta=8.0)
    parts["loss"].backward()
    assert all(torch.isfinite(v).all() for v in parts.values()) and torch.isfinite(s.grad).all()
    # non-target distributions softmax(-40, -45) and softmax(-30, -50); float32 logits of size 40 carry
    # about 4e-6 of rounding, 6e-4 of this KL
    hs, ht = softmax([-40.0, -45.0], 1.0), softmax([-30.0, -50.0], 1.0)
    assert parts["nckd"].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(ht, hs)), rel=2e-3)


def test_dkd_refuses_mixed_targets():
    with pytest.raises(ValueError, match="one target class"):
        dkd_loss(S, DISTRIBUTIONS, TEACHER, 4.0, 0.5, beta=8.0)
    assert dkd_loss(S, DISTRIBUTIONS, None, 4.0, 0.0, beta=8.0)["kd"].item() == 0.0  # no KD term: plain (soft) CE


# -------------------------------------------------------------------------------------------- dist


def hand_pearson(u, v):
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v))
    return cov / math.sqrt(sum((a - mu) ** 2 for a in u) * sum((b - mv) ** 2 for b in v))


def hand_dist(s_rows, t_rows, t, gamma):
    """Huang et al. (2022) eq. 6-9 with plain floats (T^2 as in the authors' code)."""
    ys, yt = [softmax(r, t) for r in s_rows], [softmax(r, t) for r in t_rows]
    inter = sum(1 - hand_pearson(a, b) for a, b in zip(ys, yt)) / len(ys)
    cols = range(len(ys[0]))
    intra = sum(1 - hand_pearson([r[c] for r in ys], [r[c] for r in yt]) for c in cols) / len(cols)
    return t * t * inter, t * t * intra


S4 = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 1.5, 0.0], [0.3, -0.2, 2.2]])
T4 = torch.tensor([[3.0, 1.0, 0.0], [-1.0, 2.0, 0.5], [0.5, 2.5, -0.5], [1.0, 0.0, 3.0]])
Y4 = torch.tensor([0, 2, 1, 2])


@pytest.mark.parametrize("t", [1.0, 4.0])
@pytest.mark.parametrize("alpha, gamma", [(0.5, 1.0), (0.8, 2.0)])
def test_dist_matches_the_formula(t, alpha, gamma):
    parts = dist_loss(S4, Y4, T4, t, alpha, gamma)
    inter, intra = hand_dist(S4.tolist(), T4.tolist(), t, gamma)
    ce = F.cross_entropy(S4.double(), Y4).item()
    assert set(parts) == set(LOSSES["dist"].parts)
    assert parts["inter"].item() == pytest.approx(inter, rel=1e-5)
    assert parts["intra"].item() == pytest.approx(intra, rel=1e-5)
    assert parts["loss"].item() == pytest.approx((1 - alpha) * ce + alpha * (inter + gamma * intra), rel=1e-5)


def test_dist_by_hand_on_two_classes():
    # C = 2: a probability row (p, 1 - p) centred is (p - 1/2)(1, -1), so two rows correlate +1 when both
    # put more than half on class 0 or both less, else -1. Rows 0 and 1 agree, row 2 disagrees:
    # inter = (0 + 0 + 2) / 3 at T = 1.
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    t = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert dist_loss(s, torch.tensor([0, 1, 1]), t, 1.0, 1.0, 1.0)["inter"].item() == pytest.approx(2 / 3, rel=1e-6)


# 1 - rho of equal vectors is 0 up to fp32 rounding, which differs between CPUs (AVX2 and AVX-512 kernels
# sum in other orders; one CI machine gave 1.3e-6 at T = 4, i.e. T^2 x ~0.7 ulp): allow 16 ulps, times T^2.
RHO_TOL = 16 * torch.finfo(torch.float32).eps


def test_dist_on_identical_logits_is_zero():
    t = 4.0
    parts = dist_loss(S4, Y4, S4.clone(), t, 1.0, 1.0)
    assert parts["inter"].item() == pytest.approx(0.0, abs=t**2 * RHO_TOL)
    assert parts["intra"].item() == pytest.approx(0.0, abs=t**2 * RHO_TOL)
    assert parts["loss"].item() == pytest.approx(0.0, abs=2 * t**2 * RHO_TOL)
    assert dist_loss(S4, Y4, T4, 4.0, 1.0, 1.0)["loss"].item() > 0.1  # and is not zero otherwise


def test_dist_is_blind_to_what_correlation_ignores_but_kd_is_not():
    # Pearson relations: a student whose probabilities are an affine image of the teacher's (per row) still
    # has inter = 0; KL is not zero. Student rows = softmax(t) mapped to 0.5 * p + 0.5 / C, as logits.
    p = torch.softmax(T4, -1)
    s = torch.log(0.5 * p + 0.5 / 3)
    assert dist_loss(s, Y4, T4, 1.0, 1.0, 1.0)["inter"].item() == pytest.approx(0.0, abs=RHO_TOL)
    assert distillation_loss(s, Y4, T4, 1.0, 1.0)["kd"].item() > 0.01


def test_dist_takes_label_distributions():
    soft = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8]])
    a, b = dist_loss(S4, soft, T4, 2.0, 0.5, 1.0), dist_loss(S4, Y4, T4, 2.0, 0.5, 1.0)
    assert a["kd"].item() == b["kd"].item()  # labels reach CE only
    assert a["ce"].item() == pytest.approx(-(soft * torch.log_softmax(S4, -1)).sum(1).mean().item(), rel=1e-6)


def test_a_constant_vector_has_no_correlation_and_a_finite_gradient():
    s = torch.zeros(1, 3, requires_grad=True)  # one example: every column of the batch is constant
    parts = dist_loss(s, torch.tensor([0]), torch.tensor([[2.0, 0.0, 1.0]]), 1.0, 1.0, 1.0)
    parts["loss"].backward()
    assert parts["intra"].item() == pytest.approx(1.0)  # rho = 0 for each class: d = 1
    assert torch.isfinite(s.grad).all()
    assert pearson(torch.ones(2, 3), torch.rand(2, 3), dim=1).abs().max().item() == 0.0


# ------------------------------------------------------------------------------ logit standardisation


def test_zscore_by_hand():
    # (1, 2, 3): mean 2, population sigma sqrt(2/3), so (-1, 0, 1) / sqrt(2/3) = (-sqrt(3/2), 0, sqrt(3/2))
    z = zscore(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert z[0].tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)], rel=1e-6)
    assert z[1].tolist() == [0.0, 0.0, 0.0]  # a constant row: zeros, not NaN


def hand_standardised_kd(t):
    def z(row):
        m = sum(row) / len(row)
        sd = math.sqrt(sum((v - m) ** 2 for v in row) / len(row))
        return [(v - m) / sd for v in row]

    total = 0.0
    for s_row, t_row in zip(S.tolist(), TEACHER.tolist()):
        p, q = softmax(z(t_row), t), softmax(z(s_row), t)
        total += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))
    return t * t * total / len(S)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_standardised_kd_matches_the_formula(t):
    parts = distillation_loss(S, Y, TEACHER, t, 0.9, standardize=True)
    assert parts["kd"].item() == pytest.approx(hand_standardised_kd(t), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(hand_ce(), rel=1e-6)  # CE sees the raw logits


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_standardisation_is_invariant_to_shift_and_scale_of_the_teachers_logits(name):
    kw = dict(temperature=2.0, alpha=0.7, **BETA_GAMMA)
    base = compute(name, S4, Y4, T4, standardize=True, **kw)
    for moved in (T4 + 7.0, 3.0 * T4, 0.25 * T4 - 2.0, T4 * torch.tensor([[2.0], [0.5], [4.0], [1.0]])):
        other = compute(name, S4, Y4, moved, standardize=True, **kw)
        for k in base:
            assert other[k].item() == pytest.approx(base[k].item(), rel=1e-5, abs=1e-7), (k, moved)
    # ... which the raw losses are not (shift is harmless to softmax; scale is not)
    raw = compute(name, S4, Y4, T4, **kw)["kd"].item()
    assert compute(name, S4, Y4, 3.0 * T4, **kw)["kd"].item() != pytest.approx(raw, rel=1e-3)


def test_standardised_dkd_is_dkd_of_the_zscores():
    a = dkd_loss(S4, Y4, T4, 2.0, 0.5, 8.0, standardize=True)
    b = dkd_loss(zscore(S4), Y4, zscore(T4), 2.0, 0.5, 8.0)
    assert a["kd"].item() == pytest.approx(b["kd"].item(), rel=1e-6)


# ----------------------------------------------------------------------- all losses: parts, gradients


CASES = [("kd", False), ("kd", True), ("dkd", False), ("dkd", True), ("dist", False)]


@pytest.mark.parametrize("name, standardize", CASES)
def test_parts_are_named_detached_and_zero_without_a_kd_term(name, standardize):
    s = S4.clone().requires_grad_(True)
    parts = compute(name, s, Y4, T4, temperature=4.0, alpha=0.5, standardize=standardize, **BETA_GAMMA)
    assert tuple(parts) == LOSSES[name].parts
    assert parts["loss"].requires_grad and not any(parts[k].requires_grad for k in LOSSES[name].parts[1:])
    parts["loss"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    plain = compute(name, S4, Y4, None, temperature=4.0, alpha=0.0, standardize=standardize, **BETA_GAMMA)
    assert tuple(plain) == LOSSES[name].parts and plain["loss"].item() == pytest.approx(F.cross_entropy(S4, Y4).item())
    assert all(plain[k].item() == 0.0 for k in LOSSES[name].parts[2:])
    with pytest.raises(ValueError, match="teacher_logits"):
        compute(name, S4, Y4, None, temperature=4.0, alpha=0.5, standardize=standardize, **BETA_GAMMA)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, standardize", CASES)
def test_gradients_are_finite_under_cpu_autocast(dtype, name, standardize):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 3)
    x = 4 * torch.randn(8, 16)
    labels = torch.arange(8) % 3
    teacher = 6 * torch.randn(8, 3)
    try:
        with torch.autocast("cpu", dtype=dtype):
            logits = layer(x)
    except RuntimeError as e:  # an older torch without this autocast dtype on CPU
        pytest.skip(f"CPU autocast in {dtype}: {e}")
    if logits.dtype != dtype:
        pytest.skip(f"CPU autocast does not run Linear in {dtype} in this torch")
    parts = compute(name, logits, labels, teacher.to(dtype), temperature=2.0, alpha=0.5, standardize=standardize,
                    **BETA_GAMMA)
    parts["loss"].backward()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in parts.values())  # computed in fp32
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


def test_compute_refuses_unknown_losses_and_standardised_dist():
    with pytest.raises(ValueError, match="unknown loss"):
        compute("ckd", S, Y, TEACHER, temperature=1.0, alpha=0.5, **BETA_GAMMA)
    with pytest.raises(ValueError, match="standardize applies to kd and dkd"):
        compute("dist", S, Y, TEACHER, temperature=1.0, alpha=0.5, standardize=True, **BETA_GAMMA)


def test_top_k_rule():
    assert topk_refusal("kd", False) is None and topk_refusal("dkd", False) is None  # approximated
    assert "intra-class" in topk_refusal("dist", False)
    assert "mean and standard deviation" in topk_refusal("kd", True)
    assert "mean and standard deviation" in topk_refusal("dkd", True)


# ------------------------------------------------------------------------------ settings and refusals


@pytest.mark.parametrize("overrides, message", [
    ({"loss": "ckd"}, "--loss must be one of kd, dkd, dist"),
    ({"loss": "dist", "standardize": True}, "--standardize applies to --loss kd or dkd"),
    ({"dkd_beta": -1.0}, "--dkd-beta must be a finite number >= 0"),
    ({"dkd_beta": math.inf}, "--dkd-beta must be a finite number"),
    ({"dist_gamma": math.nan}, "--dist-gamma must be a finite number"),
])
def test_settings_are_checked_and_name_the_flag(overrides, message):
    with pytest.raises(KdpipeError, match=message):
        TrainConfig(cache=".", **overrides)
    TrainConfig(cache=".", loss="dkd", dkd_beta=0.0, standardize=True)  # beta = 0 is allowed: TCKD alone


def test_a_sweep_searches_the_loss_and_leaves_out_what_does_not_apply():
    from kdpipe.sweep import grid_points

    cfg = SweepConfig(train=TrainConfig(cache="."), space={"loss": "kd,dkd,dist", "alpha": "0,0.5",
                                                           "standardize": "true,false", "dkd_beta": "0.5,8"})
    keys = sorted({p.config_key for p in grid_points(cfg)})
    # alpha = 0 once; kd x 2 standardize; dkd x 2 standardize x 2 beta; dist once (no standardize, no beta)
    assert keys == sorted(["a0", "a0.5-kd-ls0", "a0.5-kd-ls1", "a0.5-dist", "a0.5-dkd-ls0-b0.5", "a0.5-dkd-ls1-b0.5",
                           "a0.5-dkd-ls0-b8", "a0.5-dkd-ls1-b8"])
    with pytest.raises(KdpipeError, match="--standardize true does not apply to --loss dist"):
        SweepConfig(train=TrainConfig(cache=".", standardize=True), space={"loss": "kd,dist"})
    with pytest.raises(KdpipeError, match="--standardize: cannot read"):
        SweepConfig(train=TrainConfig(cache="."), space={"standardize": "yes,no"})


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, image_folder, teacher_dir):
    out = tmp_path_factory.mktemp("topk") / "c"
    cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), out=out, precision="fp32",
                                  workers=0, batch_size=16, topk=2))
    return out


@pytest.mark.parametrize("overrides, refused", [({"loss": "dist"}, "DIST's intra-class relation"),
                                                ({"loss": "kd", "standardize": True}, "mean and standard deviation"),
                                                ({"loss": "dkd", "standardize": True}, "mean and standard deviation")])
def test_a_top_k_cache_refuses_what_it_cannot_serve(topk_cache, tmp_path, overrides, refused):
    with pytest.raises(KdpipeError, match=f"--loss {overrides['loss']}.*{refused}.*keeps 2 of 3"):
        train_student.setup(tiny_train_config(cache=topk_cache, out=tmp_path / "r", **overrides))


def test_a_top_k_cache_trains_dkd(topk_cache, tmp_path):
    report = train_student.run(tiny_train_config(cache=topk_cache, loss="dkd", epochs=1, out=tmp_path / "r"))
    assert set(report.history[0]["train"]) == set(LOSSES["dkd"].parts)


def test_dkd_refuses_views_blended_from_two_images(image_folder, teacher_dir, tmp_path):
    out = tmp_path / "mixed"
    cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), out=out, precision="fp32",
                                  workers=0, batch_size=16, views=1, augment=ViewPolicy(mixup=1.0, mixup_p=1.0)))
    with pytest.raises(KdpipeError, match="--loss dkd needs one target class per example.*--view-mixup"):
        train_student.setup(tiny_train_config(cache=out, views=True, loss="dkd", out=tmp_path / "r"))
    train_student.setup(tiny_train_config(cache=out, views=True, loss="dkd", alpha=0.0, out=tmp_path / "r0"))


# ----------------------------------------------------------------------------------- end to end (CLI)


@pytest.mark.parametrize("loss, own", [("dkd", ("tckd", "nckd")), ("dist", ("inter", "intra"))])
def test_train_student_with_each_new_loss_through_the_cli(run_cli, cache_dir, tmp_path, loss, own):
    out = tmp_path / loss
    code, text = run_cli("train-student", "--cache", cache_dir, "--loss", loss, "--temperature", "4", "--epochs", "1",
                         "--batch-size", "8", "--lr", "3e-3", "--student-config", TINY_STUDENT, "--precision", "fp32",
                         "--device", "cpu", "--out", out)
    assert code == 0, text
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["loss"] == loss and run["config"]["temperature"] == 4.0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record["train"]) == {"loss", "ce", "kd", *own}
    assert all(math.isfinite(v) for v in record["train"].values())
    assert (out / "model" / "README.md").exists()
    code, text = run_cli("train-student", "--cache", cache_dir, "--loss", loss, "--dkd-beta", "-1",
                         "--out", tmp_path / "x")
    assert code == 1 and "--dkd-beta must be a finite number >= 0" in text and "Traceback" not in text


def test_a_loss_sweep_reports_each_loss_against_its_twin():
    from kdpipe import sweep_report

    val = {"a0.5-kd": [0.90, 0.92], "a0.5-dkd-b8": [0.93, 0.95], "a0.5-dkd-b2": [0.80, 0.82], "a0": [0.88, 0.89]}
    params = {"a0.5-kd": {"alpha": 0.5, "loss": "kd"}, "a0.5-dkd-b8": {"alpha": 0.5, "loss": "dkd", "dkd_beta": 8.0},
              "a0.5-dkd-b2": {"alpha": 0.5, "loss": "dkd", "dkd_beta": 2.0}, "a0": {"alpha": 0.0}}
    rows = sorted((sweep_report.ConfigRow(k, params[k], [0, 1], v, 0) for k, v in val.items()), key=lambda r: -r.val_mean)
    runs = {k: [{"seed": s, "validation": v[s], "test": v[s] - 0.01} for s in range(2)] for k, v in val.items()}
    gains = sweep_report.loss_gains(rows, runs, "kd")
    assert set(gains) == {"kd", "dkd"} and gains["dkd"]["distilled"] == "a0.5-dkd-b8"  # chosen within dkd
    assert gains["kd"]["twin"] == gains["dkd"]["twin"] == "a0"
    assert gains["dkd"]["test"]["gap"] == pytest.approx(0.055) and gains["kd"]["test"]["gap"] == pytest.approx(0.025)
    assert gains["kd"]["validation"]["paired"]["seeds"] == 2
    one_loss = [r for r in rows if r.params.get("loss") != "dkd"]
    assert sweep_report.loss_gains(one_loss, runs, "kd") is None  # teacher_gain says it all


# ------------------------------------------------------------------- a new loss is one entry (issue 60, point 1)


def toy_loss(student_logits, labels, teacher_logits, temperature, alpha, weight, standardize=False):
    """A loss that does not exist: KD = weight * sq, sq = T^2 * mean_i sum_c (p_s,c - p_t,c)^2 with p = softmax(z / T)
    (z z-scored first with `standardize`); loss = (1 - alpha) * CE + alpha * KD."""
    s = student_logits.float()
    ce = F.cross_entropy(s, labels)
    if alpha == 0 or teacher_logits is None:
        zero = torch.zeros(())
        return {"loss": ce, "ce": ce.detach(), "kd": zero, "sq": zero}
    t = teacher_logits.float()
    if standardize:
        s, t = zscore(s), zscore(t)
    sq = ((F.softmax(s / temperature, -1) - F.softmax(t / temperature, -1)) ** 2).sum(-1).mean() * temperature**2
    kd = weight * sq
    return {"loss": (1 - alpha) * ce + alpha * kd, "ce": ce.detach(), "kd": kd.detach(), "sq": sq.detach()}


# its setting is a field of its own, as TrainConfig would hold it (docs/design.md, "Adding a loss")
ToyConfig = dataclasses.make_dataclass("ToyConfig", [("toy_weight", float, settings.setting(1.0, "toy: its weight."))],
                                       bases=(TrainConfig,))


@pytest.fixture
def toy(monkeypatch):
    """The toy loss registered as one entry of loss.LOSSES, for this test only."""
    entry = loss.Loss(toy_loss, ("sq",), "a toy squared distance", "toy", standardizable=True,
                      settings=(loss.LossSetting("toy_weight", "weight", "toy weight"),),
                      topk="the toy needs every class's probability", mixed="refuses blended views (a toy rule)")
    monkeypatch.setitem(loss.LOSSES, "toy", entry)
    return entry


def test_a_new_loss_is_one_entry_the_checks_derive_from(toy):
    TrainConfig(cache=".", loss="toy", standardize=True)  # a --loss, and a standardizable one
    with pytest.raises(KdpipeError, match="--standardize applies to --loss kd or dkd or toy .*not --loss dist"):
        TrainConfig(cache=".", loss="dist", standardize=True)
    base = TrainConfig(cache=".")
    searched = {"alpha": 0.5, "toy_weight": 2.0, "dkd_beta": 1.0, "standardize": True}
    assert applicable({**searched, "loss": "toy"}, base) == {"alpha": 0.5, "toy_weight": 2.0, "standardize": True,
                                                            "loss": "toy"}
    assert applicable({**searched, "loss": "dist"}, base) == {"alpha": 0.5, "loss": "dist"}  # not the toy's weight
    parts = compute("toy", S, Y, TEACHER, temperature=2.0, alpha=0.5, toy_weight=3.0)
    assert tuple(parts) == toy.parts == ("loss", "ce", "kd", "sq") and parts["kd"] == pytest.approx(3 * parts["sq"])
    with pytest.raises(ValueError, match="loss toy needs toy_weight"):
        compute("toy", S, Y, TEACHER, temperature=2.0, alpha=0.5)
    cfg = ToyConfig(cache=".", loss="toy")
    topk = TopK.from_logits(np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]), 2)
    with pytest.raises(KdpipeError, match="--loss toy: the toy needs every class's probability .*keeps 2 of 3.*"
                                          "use --loss kd or dkd without --standardize"):
        student_data.check_targets(cfg, topk, mixed=False)
    with pytest.raises(KdpipeError, match="--loss toy refuses blended views .*--view-mixup.*use --loss kd or dist,"):
        student_data.check_targets(cfg, TEACHER, mixed=True)
    student_data.check_targets(dataclasses.replace(cfg, loss="kd"), topk, mixed=True)  # the others' rules stand


def test_a_new_loss_that_a_top_k_cache_serves_is_offered_instead(toy, monkeypatch):
    monkeypatch.setitem(loss.LOSSES, "toy", dataclasses.replace(toy, topk=None))
    topk = TopK.from_logits(np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]), 2)
    student_data.check_targets(ToyConfig(cache=".", loss="toy"), topk, mixed=False)
    with pytest.raises(KdpipeError, match="--loss dist: .*use --loss kd or dkd or toy without --standardize"):
        student_data.check_targets(ToyConfig(cache=".", loss="dist"), topk, mixed=False)


def test_a_new_loss_trains_and_is_named_on_the_card(toy, cache_dir, tmp_path):
    tiny = dataclasses.asdict(tiny_train_config(cache=cache_dir, epochs=1, out=tmp_path / "toy"))
    report = train_student.run(ToyConfig(**{**tiny, "loss": "toy", "toy_weight": 2.5, "standardize": True}))
    train = report.history[0]["train"]
    assert set(train) == set(toy.parts) and all(math.isfinite(v) for v in train.values())
    assert train["kd"] == pytest.approx(2.5 * train["sq"]) and train["sq"] > 0  # its setting reached its function
    assert report.run["config"]["loss"] == "toy" and report.validation["accuracy"] >= 0
    card = (tmp_path / "toy" / "model" / "README.md").read_text()
    assert "| loss | a toy squared distance with logit standardisation" in card and "| toy weight | 2.5 |" in card
    assert "loss-toy" in card
