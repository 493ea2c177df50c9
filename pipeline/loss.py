"""Hinton et al. (2015), "Distilling the Knowledge in a Neural Network", arXiv:1503.02531."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .mixing import Mix


def distillation_loss(
    student_logits: torch.Tensor,  # (B, C)
    labels: torch.Tensor,  # (B,) int, or (B, C) label distributions (mixed views)
    teacher_logits: torch.Tensor | None = None,  # (B, C) raw, cached
    temperature: float = 5.0,
    alpha: float = 0.5,
    mix: Mix | None = None,
) -> dict[str, torch.Tensor]:
    """Knowledge-distillation loss, returned with its parts.

        loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

    KL is summed over classes and averaged over the batch ("batchmean"); the T^2 factor keeps the soft
    term's gradients on the scale of the hard term's as T changes (Hinton et al., 2015, section 2).
    `alpha` is the guide's lambda. With alpha = 0 the teacher is not needed and `kd` is reported as 0.
    Computed in fp32 whatever the autocast dtype of the logits. `labels` may be label distributions
    (B, C), mixup's targets for views blended before the teacher saw them (views.Mixes): CE is then
    -sum_c y_c log softmax(s)_c, and the teacher's logits are its own answer on the blend.

    With `mix` (the inputs were mixed with a permutation of the batch, weight lam; pipeline.mixing) both
    targets are mixed alike: CE = lam * CE(s, y) + (1 - lam) * CE(s, y[perm]), and the teacher's distribution
    is lam * softmax(t / T) + (1 - lam) * softmax(t[perm] / T), an approximation of its answer on the
    mixed image.
    """
    s = student_logits.float()
    ce = F.cross_entropy(s, labels)
    if mix is not None:
        perm = mix.perm.to(labels.device)
        ce = mix.lam * ce + (1 - mix.lam) * F.cross_entropy(s, labels[perm])
    if alpha == 0 or teacher_logits is None:
        if alpha != 0:
            raise ValueError("alpha > 0 needs teacher_logits")
        return {"loss": ce, "ce": ce.detach(), "kd": torch.zeros((), device=s.device)}
    log_p_student = F.log_softmax(s / temperature, dim=-1)  # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
    if mix is not None:  # log(lam * p + (1 - lam) * p[perm]); log(0) = -inf is exact at lam = 0 or 1
        log_p_teacher = torch.logaddexp(log_p_teacher + _log(mix.lam), log_p_teacher[perm] + _log(1 - mix.lam))
    kd = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
    loss = (1 - alpha) * ce + alpha * kd
    return {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf
