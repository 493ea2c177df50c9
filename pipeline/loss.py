"""Logit-only distillation losses: every term is a function of the student's logits, the cached teacher's
logits and the labels, so all of them train from one cache with no teacher and no new pass.

    kd    Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", arXiv:1503.02531
    dkd   Zhao, Cui, Song, Qiu & Liang (2022), "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679
    dist  Huang, You, Wang, Qian & Xu (2022), "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
          arXiv:2205.10536
    standardize (a switch on kd and dkd)  Sun, Ren, Li, Wang & Cao (2024), "Logit Standardization in Knowledge
          Distillation", CVPR 2024, arXiv:2403.01427

Every loss combines its hard and soft terms the same way, loss = (1 - alpha) * CE + alpha * KD, KD being the
loss's own soft term; `alpha` is the guide's lambda and alpha = 0 is plain cross-entropy for all of them. Each
returns its named parts (`loss` with its graph, the others detached), computed in fp32 whatever the autocast
dtype of the logits. How each paper's weights map onto alpha, T and the loss's own setting: docs/training.md.

LOSSES is the one list of losses (name -> Loss: its function, parts, settings, whether it takes standardize,
what a top-K cache or blended views allow, its title): TrainConfig's checks and --loss help, the sweep's
applicable settings, student_data.check_targets, train_student's step and the model card all read it, so a
new loss is one function, one entry and its settings' fields (docs/design.md, "Adding a loss").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossSetting:
    """A TrainConfig field only this loss reads: passed to its function as the keyword `arg`, shown on the model
    card's recipe table as `title`."""
    field: str
    arg: str
    title: str


@dataclass(frozen=True)
class Loss:
    """One entry of LOSSES: everything the rest of kdpipe knows about a loss. `function(student_logits, labels,
    teacher_logits, temperature, alpha, [standardize=], **{arg: value of each setting})` returns `parts`."""
    function: Callable[..., dict[str, torch.Tensor]]
    own_parts: tuple[str, ...]  # its parts beside loss, ce and kd, reported per epoch in metrics.jsonl
    title: str  # the model card's name for it
    about: str  # its words in --loss's help
    settings: tuple[LossSetting, ...] = ()
    standardizable: bool = False  # takes `standardize` (Sun et al. 2024)
    topk: str | None = None  # why a top-K cache (K < C) cannot serve it; None: it trains from one, approximately
    mixed: str | None = None  # why views blended from two images cannot serve it; None: they can

    @property
    def parts(self) -> tuple[str, ...]:
        return ("loss", "ce", "kd", *self.own_parts)


def compute(name: str, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
            *, temperature: float, alpha: float, standardize: bool = False, **settings: float) -> dict[str, torch.Tensor]:
    """The loss `name` (a key of LOSSES) with its parts LOSSES[name].parts; `settings` holds (at least) its own
    settings' values by TrainConfig field name, e.g. dkd_beta=8.0 (the others' are ignored)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; one of {', '.join(LOSSES)}")
    entry = LOSSES[name]
    if standardize and not entry.standardizable:
        raise ValueError(f"standardize applies to {' and '.join(standardizable())}, not {name}")
    missing = [s.field for s in entry.settings if s.field not in settings]
    if missing:
        raise ValueError(f"loss {name} needs {', '.join(missing)}")
    own = {s.arg: settings[s.field] for s in entry.settings}
    if entry.standardizable:
        own["standardize"] = standardize
    return entry.function(student_logits, labels, teacher_logits, temperature, alpha, **own)


def standardizable() -> tuple[str, ...]:
    """The losses that take --standardize."""
    return tuple(name for name, entry in LOSSES.items() if entry.standardizable)


def own_settings() -> dict[str, tuple[str, ...]]:
    """Each setting of some losses only, with the losses it applies to: standardize and every entry's settings
    (a config of another loss leaves them out: config.applicable)."""
    out = {"standardize": standardizable()}
    for name, entry in LOSSES.items():
        for s in entry.settings:
            out[s.field] = (*out.get(s.field, ()), name)
    return out


def distillation_loss(
    student_logits: torch.Tensor,  # (B, C)
    labels: torch.Tensor,  # (B,) int, or (B, C) label distributions (mixed views)
    teacher_logits: torch.Tensor | None,  # (B, C) raw, cached; None with alpha = 0
    temperature: float,  # defaults: TrainConfig's, the one place they live
    alpha: float,
    standardize: bool = False,
) -> dict[str, torch.Tensor]:
    """Knowledge-distillation loss (`kd`), returned with its parts.

        loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

    KL is summed over classes and averaged over the batch ("batchmean"); the T^2 factor keeps the soft
    term's gradients on the scale of the hard term's as T changes (Hinton et al., 2015, section 2).
    `alpha` is the guide's lambda. With alpha = 0 the teacher is not needed and `kd` is reported as 0.
    Computed in fp32 whatever the autocast dtype of the logits. `labels` may be label distributions
    (B, C), mixup's targets for views blended before the teacher saw them (views.Mixes): CE is then
    -sum_c y_c log softmax(s)_c, and the teacher's logits are its own answer on the blend.

    With `standardize` (Sun et al., 2024) both logit vectors are z-scored per example before the
    temperature, s -> zscore(s), t -> zscore(t), so T acts as their base temperature; CE keeps the raw s.
    """
    s = student_logits.float()
    ce = _hard_term(s, labels)
    if alpha == 0 or teacher_logits is None:
        return _hard_only(ce, alpha)
    s_soft, t_soft = (zscore(s), zscore(teacher_logits.float())) if standardize else (s, teacher_logits.float())
    log_p_student = F.log_softmax(s_soft / temperature, dim=-1)  # (B, C)
    log_p_teacher = F.log_softmax(t_soft / temperature, dim=-1)  # (B, C)
    kd = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
    loss = (1 - alpha) * ce + alpha * kd
    return {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}


def dkd_loss(
    student_logits: torch.Tensor,  # (B, C)
    labels: torch.Tensor,  # (B,) int: DKD needs one target class per example
    teacher_logits: torch.Tensor | None,  # (B, C) raw, cached; None with alpha = 0
    temperature: float,  # defaults: TrainConfig's, the one place they live
    alpha: float,
    beta: float,
    standardize: bool = False,
) -> dict[str, torch.Tensor]:
    """Decoupled KD (Zhao et al., 2022), returned with its parts.

    With p = softmax(z / T) and y the label, the binary distribution b = [p_y, 1 - p_y] (target, all
    the others) and the distribution among the non-target classes p^_c = p_c / (1 - p_y), c != y:

        TCKD = T^2 * KL(b_teacher || b_student)        (target-class knowledge)
        NCKD = T^2 * KL(p^_teacher || p^_student)      (non-target-class knowledge)
        KD   = TCKD + beta * NCKD
        loss = (1 - alpha) * CE(student, labels) + alpha * KD

    each KL averaged over the batch. Hinton's term is TCKD + (1 - p_y,teacher) * NCKD per example
    (the paper's eq. 1-5): DKD drops the weight (1 - p_y,teacher) and sets NCKD's own weight, beta. The
    paper writes DKD = a * TCKD + b * NCKD next to a CE of weight 1; here a is 1 and the CE weight is
    (1 - alpha) / alpha, so its (a, b) are alpha = a / (1 + a), beta = b / a (docs/training.md).
    Probabilities are formed as logsumexp differences, so a confident target (p_y -> 1) stays finite.

    Mixed targets are refused (ValueError): the decomposition needs the example's one target class, and a
    blended image ((B, C) label distributions of mixed views) has two. With `standardize`, both
    logit vectors are z-scored per example first (Sun et al., 2024; the paper's DKD + ours).
    """
    s = student_logits.float()
    ce = _hard_term(s, labels)
    if alpha == 0 or teacher_logits is None:
        return _hard_only(ce, alpha, "tckd", "nckd")
    if labels.ndim != 1:
        raise ValueError("dkd needs one target class per example: label distributions of mixed views have two")
    t = teacher_logits.float()
    if standardize:
        s, t = zscore(s), zscore(t)
    target = F.one_hot(labels, s.shape[-1]).bool()  # (B, C)
    log_b_s, log_hat_s = _decoupled(s / temperature, target)
    log_b_t, log_hat_t = _decoupled(t / temperature, target)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(-1).mean() * temperature**2
    nckd = (log_hat_t.exp() * (log_hat_t - log_hat_s)).sum(-1).mean() * temperature**2  # 0 at the target
    kd = tckd + beta * nckd
    loss = (1 - alpha) * ce + alpha * kd
    return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(), "tckd": tckd.detach(), "nckd": nckd.detach()}


def _decoupled(z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits z (B, C) already divided by T: log b (B, 2) = log [p_y, 1 - p_y], and log p^ (B, C), the
    log-distribution over the non-target classes, set to 0 at the target so that its term p^ (log p^_t -
    log p^_s) is exactly 0 there (z_y - lse_other itself can exceed 88: exp of it overflows float32)."""
    lse = torch.logsumexp(z, dim=-1)  # (B,) log sum_c exp z_c
    lse_other = torch.logsumexp(z.masked_fill(target, -math.inf), dim=-1)  # (B,) log sum_{c != y} exp z_c
    z_target = (z * target).sum(-1)  # (B,)
    log_b = torch.stack([z_target - lse, lse_other - lse], dim=-1)  # (B, 2)
    return log_b, (z - lse_other[:, None]).masked_fill(target, 0.0)


def dist_loss(
    student_logits: torch.Tensor,  # (B, C)
    labels: torch.Tensor,  # (B,) int, or (B, C) label distributions (used by CE only)
    teacher_logits: torch.Tensor | None,  # (B, C) raw, cached; None with alpha = 0
    temperature: float,  # defaults: TrainConfig's, the one place they live
    alpha: float,
    gamma: float,
) -> dict[str, torch.Tensor]:
    """DIST (Huang et al., 2022), returned with its parts. With Y = softmax(z / T) row-wise (B, C) and
    rho the Pearson correlation, d(u, v) = 1 - rho(u, v):

        inter = T^2 * mean_i d(Y_s[i, :], Y_t[i, :])    (inter-class relation: per example, over classes)
        intra = T^2 * mean_c d(Y_s[:, c], Y_t[:, c])    (intra-class relation: per class, over the batch)
        KD    = inter + gamma * intra
        loss  = (1 - alpha) * CE(student, labels) + alpha * KD

    The paper's total is a * CE + b * inter + g * intra with a = b = g = 1; here b is 1 and the CE weight
    is (1 - alpha) / alpha, so alpha = b / (a + b), gamma = g / b (0.5 and 1 for the paper's weights). The
    T^2 factor is that of implementations that give DIST a temperature (e.g. huawei-noah's VanillaKD), as
    in kd; the authors' ImageNet code has none, i.e. T = 1, where the factor is 1.
    A constant vector has no correlation; it counts as rho = 0, with no gradient (in the intra term,
    a batch of one example: every column is constant).

    The teacher's probabilities enter only through relations, so `labels` may be label distributions
    (they reach CE alone).
    """
    s = student_logits.float()
    ce = _hard_term(s, labels)
    if alpha == 0 or teacher_logits is None:
        return _hard_only(ce, alpha, "inter", "intra")
    y_s = F.softmax(s / temperature, dim=-1)  # (B, C)
    y_t = F.softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
    inter = (1 - pearson(y_s, y_t, dim=1)).mean() * temperature**2
    intra = (1 - pearson(y_s, y_t, dim=0)).mean() * temperature**2
    kd = inter + gamma * intra
    loss = (1 - alpha) * ce + alpha * kd
    return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(), "inter": inter.detach(), "intra": intra.detach()}


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of a and b along `dim`: sum(a' b') / (|a'| |b'|), a' = a - mean(a). A vector whose
    centred norm is below eps (constant) gives 0; the norm is clamped before its square root, so the
    gradient stays finite there."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    a = a / (a * a).sum(dim, keepdim=True).clamp_min(eps * eps).sqrt()
    b = b / (b * b).sum(dim, keepdim=True).clamp_min(eps * eps).sqrt()
    return (a * b).sum(dim)


def zscore(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Logit standardisation (Sun et al., 2024, Algorithm 1 without its 1/tau, which is the caller's T):
    (z - mean(z)) / sigma(z) per row, sigma the population standard deviation sqrt(mean((z - mean)^2)) as
    the paper writes it. (The authors' code divides by torch.std, the 1/(C-1) estimate: the same as a base
    temperature sqrt(C / (C - 1)) times larger, 1.22x for C = 3.) Invariant to a shift and a positive
    scale of z; a constant row (sigma below eps) maps to zeros with a finite gradient."""
    centred = z - z.mean(-1, keepdim=True)
    return centred / (centred * centred).mean(-1, keepdim=True).clamp_min(eps * eps).sqrt()


# The one list of losses: the config checks, the sweep, the target checks, training and the model card read it.
# standardizable: Sun et al. (2024) evaluate the z-score on KD, CTKD, DKD and MLKD, not on DIST.
LOSSES: dict[str, Loss] = {
    "kd": Loss(distillation_loss, own_parts=(), title="Hinton et al. (2015) KD", about="Hinton", standardizable=True),
    "dkd": Loss(dkd_loss, own_parts=("tckd", "nckd"), title="decoupled KD (Zhao et al., CVPR 2022)",
                about="decoupled, Zhao 2022", settings=(LossSetting("dkd_beta", "beta", "DKD β (non-target weight)"),),
                standardizable=True, mixed="needs one target class per example"),
    "dist": Loss(dist_loss, own_parts=("inter", "intra"), title="DIST (Huang et al., NeurIPS 2022)",
                 about="correlations, Huang 2022",
                 settings=(LossSetting("dist_gamma", "gamma", "DIST γ (intra-class weight)"),),
                 topk="DIST's intra-class relation correlates every class over the batch, and outside each row's top K "
                      "the cache holds only an even share of the tail"),
}


def topk_refusal(name: str, standardize: bool) -> str | None:
    """Why loss `name` cannot train from a top-K cache with K < C (None: it can, approximately).

    A top-K cache densifies each row with the exact top-K logits and the exact tail mass spread evenly
    (logit_store.TopK.dense). kd and dkd then see the true target and top-K probabilities at T = 1 and a
    uniform tail: an approximation whose error is bounded by the tail mass. DIST's intra-class relation
    correlates each class's probabilities over the batch, and Pearson correlation ignores scale: a class
    outside most rows' top K would be correlated on the filled-in tail values alone, however small the
    tail. Standardisation needs the mean and standard deviation of all C logits, which the cache does not
    store; from the reconstruction both are wrong, and the error rescales the whole row, not the tail."""
    if LOSSES[name].topk:
        return LOSSES[name].topk
    if standardize:
        return "standardize needs the mean and standard deviation of all C teacher logits, which top-K does not store"
    return None


def _hard_only(ce: torch.Tensor, alpha: float, *parts: str) -> dict[str, torch.Tensor]:
    """The loss without a teacher (alpha = 0): CE alone, the KD term and the loss's own `parts` reported as 0."""
    if alpha != 0:
        raise ValueError("alpha > 0 needs teacher_logits")
    zero = torch.zeros((), device=ce.device)
    return {"loss": ce, "ce": ce.detach(), "kd": zero, **{name: zero for name in parts}}


def _hard_term(s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(s, labels); with label distributions (B, C), -sum_c y_c log softmax(s)_c."""
    return F.cross_entropy(s, labels)

