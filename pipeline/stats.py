"""Small-sample statistics for comparing students over seeds: mean ± std, Student-t intervals, and the
difference of two arms (Welch's interval; paired by seed, where a seed fixes everything but the arm).

Pure Python on lists of floats (accuracies in [0, 1]); no scipy: the t quantile is computed here.
"""

from __future__ import annotations

import functools
import math


@functools.lru_cache(maxsize=None)
def t975(dof: float) -> float:
    """Student t's 97.5 % quantile at `dof` degrees of freedom, fractional ones too (Welch's): the t with
    P(0 < X < t) = 0.475, found by bisection, the probability integrated from the density

        p(x) = Γ((ν + 1) / 2) / (√(νπ) Γ(ν / 2)) · (1 + x² / ν)^(-(ν + 1) / 2)

    with Simpson's rule (within 1e-5 of scipy's quantile from ν = 1 on). ν below 1 is taken as 1, the
    least a difference of two arms with two seeds each can have."""
    nu = max(float(dof), 1.0)
    if math.isinf(nu):
        return 1.959964
    c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)

    def mass(t: float, n: int = 512) -> float:  # P(0 < X < t), n even
        h = t / n
        ys = [c * (1 + (k * h) ** 2 / nu) ** (-(nu + 1) / 2) for k in range(n + 1)]
        return h / 3 * (ys[0] + ys[-1] + 4 * sum(ys[1:-1:2]) + 2 * sum(ys[2:-1:2]))

    lo, hi = 1.959, 12.71  # the quantiles at ν = ∞ and ν = 1
    while hi - lo > 1e-7:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) < 0.475 else (lo, mid)
    return (lo + hi) / 2


def mean_std_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and the half-width of a 95% t-interval
    of the mean (nan for one value: one seed says nothing about the spread)."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, t975(n - 1) * std / math.sqrt(n)


def welch(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """Difference of means a - b and the half-width of its 95 % Welch interval (None below 2 values each).

        half = t(0.975, dof) * sqrt(va + vb),  va = s_a² / n_a,  dof = (va + vb)² / (va² / (n_a - 1) + vb² / (n_b - 1))
    """
    if min(len(a), len(b)) < 2:
        return None
    (ma, sa, _), (mb, sb, _) = mean_std_ci(a), mean_std_ci(b)
    va, vb = sa ** 2 / len(a), sb ** 2 / len(b)
    dof = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1)) + (vb ** 2 / (len(b) - 1))) if va + vb > 0 else 10
    return ma - mb, t975(dof) * math.sqrt(va + vb)


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int] | None:
    """Mean of the per-seed differences a[seed] - b[seed] over the seeds both have, the half-width of its
    95 % t interval, and the number of pairs (None below 2). A seed fixes a run's initial weights, batch
    order, views and dropout draws whatever its loss (test_train_student), so the two arms of a seed
    differ only in the teacher's term."""
    seeds = sorted(a.keys() & b.keys())
    if len(seeds) < 2:
        return None
    m, _, half = mean_std_ci([a[k] - b[k] for k in seeds])
    return m, half, len(seeds)


def seeds_needed(a: list[float], b: list[float]) -> int | None:
    """Seeds per arm for a 95 % interval of the difference to exclude zero with 80 % power, if the true
    gap and spreads were the measured ones (normal approximation, n = 2 (z.975 + z.8)² s² / gap²,
    s² = the mean of the two variances); None when the measured gap is not positive."""
    if min(len(a), len(b)) < 2:
        return None
    (ma, sa, _), (mb, sb, _) = mean_std_ci(a), mean_std_ci(b)
    if ma - mb <= 0:
        return None
    return math.ceil(2 * (1.960 + 0.842) ** 2 * (sa ** 2 + sb ** 2) / 2 / (ma - mb) ** 2)
