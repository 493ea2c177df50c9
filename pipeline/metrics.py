"""Classification and distillation metrics on numpy arrays, and the rules that pick the epoch to keep from the
validation metrics; pure functions."""

from __future__ import annotations

import math

import numpy as np

BEST_EPOCH_RULES = ("nll", "first")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts; rows are true labels, columns predictions."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, predictions), 1)
    return cm


def macro_f1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN); a class never seen nor predicted scores 0."""
    cm = confusion_matrix(logits.argmax(1), labels, logits.shape[1])
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # (TP + FP) + (TP + FN)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over examples of -log softmax(logits)[label], in nats: the cross-entropy of the true labels, a proper
    score that still separates checkpoints whose accuracy ties (a saturated validation set)."""
    return float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())


def agreement(student_logits: np.ndarray, teacher_logits: np.ndarray) -> float:
    """Fraction of examples where student and teacher predict the same class."""
    return float((student_logits.argmax(1) == teacher_logits.argmax(1)).mean())


def kl_to_teacher(student_logits: np.ndarray, teacher_logits: np.ndarray, temperature: float = 1.0) -> float:
    """Mean over examples of KL(softmax(t/T) || softmax(s/T)), in nats."""
    lt = log_softmax(teacher_logits / temperature)
    ls = log_softmax(student_logits / temperature)
    return float((np.exp(lt) * (lt - ls)).sum(1).mean())


def classification_report(logits: np.ndarray, labels: np.ndarray, teacher_logits: np.ndarray | None = None) -> dict:
    out = {"accuracy": accuracy(logits, labels), "macro_f1": macro_f1(logits, labels), "nll": nll(logits, labels),
           "n": int(len(labels))}
    if teacher_logits is not None:
        out["teacher_agreement"] = agreement(logits, teacher_logits)
        out["kl_to_teacher"] = kl_to_teacher(logits, teacher_logits)
    return out


def best_epoch(validation: list[dict], rule: str) -> int:
    """The epoch (1-based) to keep, from each epoch's validation report in order, by `rule`; both take the
    highest accuracy. nll: among epochs tied on it, the lowest NLL, then the later epoch (a saturated
    validation split ties many epochs, and the first of them can be early, at a high learning rate); first:
    the first tied epoch (kdpipe's rule before the nll one). An NLL missing or not finite ranks last."""
    top = max(r["accuracy"] for r in validation)
    tied = [epoch for epoch, r in enumerate(validation, 1) if r["accuracy"] == top]
    if rule == "first":
        return tied[0]
    return min(tied, key=lambda epoch: (_finite_or_inf(validation[epoch - 1].get("nll")), -epoch))


def tied_epochs(validation: list[dict]) -> int:
    """How many epochs share the highest validation accuracy (the choice the rules differ on)."""
    top = max(r["accuracy"] for r in validation)
    return sum(r["accuracy"] == top for r in validation)


def _finite_or_inf(value) -> float:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf
