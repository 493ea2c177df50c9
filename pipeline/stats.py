"""Small-sample statistics for comparing students over seeds: mean ± std, Student-t intervals, and the
difference of two arms (Welch's interval; paired by seed, where a seed fixes everything but the arm); for two
arms paired by seed *and* by image (per-image predictions, run_folder.read_predictions): a bootstrap that
resamples both, an exact sign-flip p-value over seeds, and Holm's correction over several comparisons.

Pure Python on lists of floats (accuracies in [0, 1]), numpy for the per-image arrays; no scipy: the t
quantile is computed here.
"""

from __future__ import annotations

import functools
import math
import itertools
import statistics
from dataclasses import dataclass

import numpy as np

from .errors import KdpipeError


@functools.lru_cache(maxsize=None)
def t_quantile(q: float, dof: float) -> float:
    """Student t's quantile: the t with P(X < t) = q (0.5 <= q < 1) at `dof` degrees of freedom, fractional
    ones too (Welch's). Substituting x = √ν tan θ in the density

        p(x) = Γ((ν + 1) / 2) / (√(νπ) Γ(ν / 2)) · (1 + x² / ν)^(-(ν + 1) / 2)

    gives P(0 < X < √ν tan φ) = Γ((ν + 1) / 2) / (√π Γ(ν / 2)) · ∫₀^φ cos^(ν-1) θ dθ, a bounded integrand on
    [0, π/2) (Simpson's rule, 512 steps); φ is found by bisection between the normal's quantile and Cauchy's. Exact at ν = 1 (tan(π(q - ½))) up to the
    bisection's 1e-12; within 1e-5 of scipy's quantile from ν = 1 on. ν below 1 is taken as 1, the least a
    difference of two arms with two seeds each can have; ν = ∞ is the normal quantile."""
    if not 0.5 <= q < 1:
        raise ValueError(f"t_quantile: q must be in [0.5, 1) (got {q})")
    nu = max(float(dof), 1.0)
    if math.isinf(nu):
        return statistics.NormalDist().inv_cdf(q)
    mass = functools.partial(_t_mass, nu=nu)
    z = statistics.NormalDist().inv_cdf(q)  # the quantile lies between the normal's (ν = ∞) and Cauchy's (ν = 1)
    lo, hi = math.atan(z / math.sqrt(nu)), math.atan(math.tan(math.pi * (q - 0.5)) / math.sqrt(nu))
    while hi - lo > 1e-12:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) < q - 0.5 else (lo, mid)
    return math.sqrt(nu) * math.tan((lo + hi) / 2)


def _t_mass(phi: float, nu: float, n: int = 512) -> float:
    """P(0 < X < √ν tan φ) for Student t at ν degrees of freedom (t_quantile's integral; Simpson, n even)."""
    c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(math.pi)
    h = phi / n
    ys = [math.cos(k * h) ** (nu - 1) for k in range(n + 1)]
    return c * h / 3 * (ys[0] + ys[-1] + 4 * sum(ys[1:-1:2]) + 2 * sum(ys[2:-1:2]))


def t975(dof: float) -> float:
    """Student t's 97.5 % quantile (the half-width factor of a two-sided 95 % interval), see t_quantile."""
    return t_quantile(0.975, dof)


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


# ------------------------------------------------------------------- paired arms: seeds, images, several tests

ALTERNATIVES = ("two-sided", "greater", "less")
MAX_SIGN_FLIP_SEEDS = 20  # 2^20 sign assignments (about 1e6 rows of S signs): exact and still under a second


@dataclass(frozen=True)
class Interval:
    """An estimate and its interval at `level`; a one-sided interval has an infinite end (null in JSON)."""
    mean: float
    low: float
    high: float
    level: float
    method: str

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "level": self.level, "method": self.method}


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {', '.join(ALTERNATIVES)} (got {alternative!r})")


def paired_t(diffs, level: float = 0.95, alternative: str = "two-sided") -> Interval:
    """Student t interval of the mean of paired differences (one per seed: arm minus twin):

        two-sided: mean ± t((1 + level) / 2, n - 1) · sd / √n
        greater:   [mean - t(level, n - 1) · sd / √n, ∞)      less: (-∞, mean + t(level, n - 1) · sd / √n]

    With one difference the interval is (-∞, ∞): one seed says nothing about the spread."""
    _check_alternative(alternative)
    values = [float(d) for d in diffs]
    mean, sd, _ = mean_std_ci(values)
    n = len(values)
    method = f"paired t ({alternative}, {n} pairs)"
    if n < 2:
        return Interval(mean, -math.inf, math.inf, level, method)
    q = (1 + level) / 2 if alternative == "two-sided" else level
    half = t_quantile(q, n - 1) * sd / math.sqrt(n)
    low = mean - half if alternative != "less" else -math.inf
    high = mean + half if alternative != "greater" else math.inf
    return Interval(mean, low, high, level, method)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> Interval:
    """The difference of accuracy of two arms, a - b, and its percentile bootstrap interval over seeds *and*
    images. a, b: (S, N) bool, whether run s of each arm got image i right, rows paired by seed (same seed in
    both arms), columns by image id (the same test images). Each replicate draws S seeds with replacement
    and, independently, N images with replacement, the same draws for both arms, and takes the mean of
    a - b over the drawn (seed, image) cells (a two-level bootstrap for crossed factors: the seeds' spread
    and the test images' own sampling error both enter). The interval is the (1 - level) / 2 and
    (1 + level) / 2 quantiles of the `n_boot` replicates; `mean` is the observed difference."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired_bootstrap: a and b must be (seeds, images) arrays of one shape (got {a.shape} "
                         f"and {b.shape})")
    d = a.astype(np.float64) - b.astype(np.float64)  # (S, N), each -1, 0 or 1
    seeds, images = d.shape
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot)
    chunk = max(1, 4_000_000 // (seeds + images))  # replicates per block: bounded memory for large N
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        w_seed = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=m)  # (m, S): times each seed is drawn
        w_image = rng.multinomial(images, np.full(images, 1 / images), size=m)  # (m, N)
        replicates[start:start + m] = ((w_seed @ d) * w_image).sum(1) / (seeds * images)
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(d.mean()), float(low), float(high), level,
                    f"paired bootstrap over {seeds} seeds x {images} images ({n_boot} replicates)")


def sign_flip_p(diffs, alternative: str = "greater") -> float:
    """Exact sign-flip (paired permutation) p-value of paired differences d_1..d_S (one per seed): under the
    null hypothesis each d_s is as likely to have come out -d_s, so T = Σ ε_s d_s over all 2^S sign
    assignments ε is T's null distribution, and

        greater: P(T >= T_obs)     less: P(T <= T_obs)     two-sided: P(|T| >= |T_obs|)

    counting T_obs's own assignment (so p >= 2^-S: six seeds can give no less than 1/64). Ties are
    compared within 1e-9 of the scale of the sums (float round-off of the same sum in another order)."""
    _check_alternative(alternative)
    d = np.asarray([float(x) for x in diffs])
    if len(d) == 0:
        raise ValueError("sign_flip_p: no differences")
    if len(d) > MAX_SIGN_FLIP_SEEDS:
        raise KdpipeError(f"an exact sign-flip test over {len(d)} seeds would enumerate 2^{len(d)} sign assignments; "
                          f"it is exact up to {MAX_SIGN_FLIP_SEEDS} seeds: compare at most {MAX_SIGN_FLIP_SEEDS}")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))  # (2^S, S)
    sums = signs @ d  # (2^S,)
    observed = d.sum()
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))
    if alternative == "greater":
        hits = sums >= observed - tol
    elif alternative == "less":
        hits = sums <= observed + tol
    else:
        hits = np.abs(sums) >= abs(observed) - tol
    return float(hits.mean())


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of m p-values (family-wise error at most α when each adjusted p is
    compared with α): sorted ascending, p_(i) becomes max over j <= i of min(1, (m - j + 1) · p_(j)). Keys
    are kept; equal p-values keep their given order (which does not change the adjusted values)."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        out[key] = running
    return {k: out[k] for k in pvalues}


def paired_t_p(diffs, alternative: str = "greater") -> float:
    """The paired t test's p-value of differences d_1..d_S (one per seed): t = mean / (sd / √S) at S - 1
    degrees of freedom, P(X >= t) (greater), P(X <= t) (less) or P(|X| >= |t|) (two-sided), from the same
    integral as t_quantile. At least two differences; a zero spread gives p = 0 or 1 by the sign of the mean."""
    _check_alternative(alternative)
    values = [float(d) for d in diffs]
    if len(values) < 2:
        raise ValueError("paired_t_p: at least two differences")
    mean, sd, _ = mean_std_ci(values)
    if sd == 0:
        t = math.copysign(math.inf, mean) if mean else 0.0
    else:
        t = mean / (sd / math.sqrt(len(values)))
    nu = len(values) - 1
    upper = 0.5 - (_t_mass(math.atan(abs(t) / math.sqrt(nu)), nu) if math.isfinite(t) else 0.5)  # P(X >= |t|)
    if alternative == "two-sided":
        return min(1.0, 2 * upper)
    greater = upper if t >= 0 else 1 - upper
    return greater if alternative == "greater" else 1 - greater
