"""kdpipe.stats against scipy's figures (scipy is not a dependency; its values are written here)."""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest

from kdpipe import files, stats
from kdpipe.errors import KdpipeError


@pytest.mark.parametrize("dof, exact", [(1, 12.70620), (1.29, 7.59949), (2, 4.30265), (2.566, 3.50972),
                                        (7.4, 2.33896), (17.81, 2.10253), (45, 2.01410), (120, 1.97993)])
def test_the_t_quantile_matches_scipy_at_fractional_degrees_of_freedom(dof, exact):
    # exact: scipy.stats.t.ppf(0.975, dof); Welch's degrees of freedom are fractional, and below 3 when an
    # arm has 2-3 seeds, where a table interpolated in 1/dof was off by up to 0.06 (and by 5 at dof 1.29)
    assert stats.t975(dof) == pytest.approx(exact, abs=1e-4)


def test_welch_matches_scipy():
    a, b = [0.90, 0.92, 0.95, 0.91], [0.85, 0.90, 0.80]
    gap, half = stats.welch(a, b)
    # scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95): 0.07 ± 0.108186 (dof 2.566)
    assert gap == pytest.approx(0.07) and half == pytest.approx(0.108186, abs=1e-5)
    assert stats.welch([0.9], b) is None  # one seed: no interval


def test_mean_std_ci_of_one_value_has_no_interval():
    assert stats.mean_std_ci([0.9])[:2] == (0.9, 0.0) and math.isnan(stats.mean_std_ci([0.9])[2])
    m, s, half = stats.mean_std_ci([0.8, 0.9, 1.0])
    assert (m, s) == (pytest.approx(0.9), pytest.approx(0.1)) and half == pytest.approx(4.302653 * 0.1 / 3 ** 0.5)


def test_the_paired_gap_uses_only_the_seeds_both_arms_ran():
    gap, half, n = stats.paired({0: 0.90, 1: 0.92, 2: 0.95}, {0: 0.88, 1: 0.91, 3: 0.50})
    assert (n, gap) == (2, pytest.approx(0.015))  # seeds 0 and 1: differences 0.02 and 0.01
    assert half == pytest.approx(12.7062 * 0.01 / 2 ** 0.5 / 2 ** 0.5, rel=1e-5)  # t(1 dof) · sd / √n
    assert stats.paired({0: 0.90}, {0: 0.80, 1: 0.85}) is None  # one shared seed: no interval


def test_seeds_needed_follows_the_normal_approximation():
    a, b = [0.90, 0.92, 0.94], [0.88, 0.90, 0.92]  # gap 0.02, both sd 0.02
    assert stats.seeds_needed(a, b) == math.ceil(2 * (1.960 + 0.842) ** 2)  # 2 (z + z)² s² / gap², s = gap
    assert stats.seeds_needed(b, a) is None  # no positive gap to power


# ------------------------------------------------------------------ paired arms over seeds and images


@pytest.mark.parametrize("q", [0.9, 0.95, 0.975, 0.995, 0.9995])
def test_the_t_quantile_at_one_and_two_degrees_of_freedom_has_a_closed_form(q):
    # ν = 1 is Cauchy's: tan(π (q - ½)); ν = 2: (2q - 1) / √(2 q (1 - q))
    assert stats.t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-7)
    assert stats.t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-7)
    assert stats.t_quantile(q, math.inf) == pytest.approx(NormalDist().inv_cdf(q))
    # the quantile falls towards the normal's as ν grows (1e6: within (z³ + z) / 4ν of it)
    z = NormalDist().inv_cdf(q)
    assert stats.t_quantile(q, 1e6) == pytest.approx(z + (z ** 3 + z) / 4e6, abs=1e-5)


def test_paired_t_one_and_two_sided():
    diffs = [0.02, 0.01]  # mean 0.015, sd 0.01/√2, n 2: one degree of freedom, Cauchy's quantiles
    se = 0.01 / math.sqrt(2) / math.sqrt(2)
    two = stats.paired_t(diffs)
    assert (two.mean, two.level) == (pytest.approx(0.015), 0.95)
    assert (two.low, two.high) == (pytest.approx(0.015 - math.tan(0.475 * math.pi) * se),
                                   pytest.approx(0.015 + math.tan(0.475 * math.pi) * se))
    gap, half, _ = stats.paired({0: 0.90, 1: 0.92}, {0: 0.88, 1: 0.91})  # the 95 % paired interval agrees
    assert half == pytest.approx(two.high - two.mean)
    greater = stats.paired_t(diffs, alternative="greater")
    assert greater.low == pytest.approx(0.015 - math.tan(0.45 * math.pi) * se) and greater.high == math.inf
    less = stats.paired_t(diffs, level=0.9, alternative="less")
    assert less.low == -math.inf and less.high == pytest.approx(0.015 + math.tan(0.4 * math.pi) * se)
    assert greater.to_dict()["high"] == math.inf and files.json_text(greater.to_dict()).count("null") == 1
    one = stats.paired_t([0.03])
    assert (one.mean, one.low, one.high) == (0.03, -math.inf, math.inf)  # one pair: no spread, no interval


def _exact_bootstrap_quantiles(d: np.ndarray, qs, seeds=True, images=True) -> list[float]:
    """Every equally likely replicate of a two-level bootstrap enumerated (S^S seed draws x N^N image draws),
    and the distribution's q-quantiles (the smallest value whose CDF reaches q)."""
    s, n = d.shape
    seed_draws = list(itertools.product(range(s), repeat=s)) if seeds else [tuple(range(s))]
    image_draws = list(itertools.product(range(n), repeat=n)) if images else [tuple(range(n))]
    values = np.sort([d[np.ix_(si, ii)].mean() for si in seed_draws for ii in image_draws])
    return [float(values[math.ceil(q * len(values)) - 1]) for q in qs]


def test_the_paired_bootstrap_matches_the_enumerated_two_level_bootstrap():
    # 3 seeds x 4 images: 27 x 256 = 6912 equally likely replicates, enumerated. Here the 2.5 % and 97.5 %
    # quantiles sit inside atoms of the distribution (their CDF passes q with a margin of 0.016, ~10 standard
    # errors of 20,000 draws), so the sampled interval must land on them exactly.
    a = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]], bool)
    b = np.array([[1, 0, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]], bool)
    d = a.astype(float) - b
    exact = _exact_bootstrap_quantiles(d, (0.025, 0.975))
    got = stats.paired_bootstrap(a, b, n_boot=20_000, seed=0)
    assert got.mean == pytest.approx(2 / 12) and (got.low, got.high) == (pytest.approx(exact[0]), pytest.approx(exact[1]))
    assert got.level == 0.95 and "3 seeds x 4 images" in got.method
    # resampling only one level would answer otherwise: images alone (0, 1/3), seeds alone (0, 1/4), vs (0, 1/2)
    assert exact[1] > _exact_bootstrap_quantiles(d, (0.975,), seeds=False)[0]
    assert exact[1] > _exact_bootstrap_quantiles(d, (0.975,), images=False)[0]
    # the same draws for both arms: an arm against itself, or arms that differ by a constant, have no spread
    same = stats.paired_bootstrap(a, a, n_boot=500)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    ones, zeros = np.ones((3, 5), bool), np.zeros((3, 5), bool)
    assert (stats.paired_bootstrap(ones, zeros, n_boot=500).low, stats.paired_bootstrap(ones, zeros).high) == (1.0, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        stats.paired_bootstrap(a, b[:, :3])


def _as_extreme(t: float, observed: float, alternative: str) -> bool:
    if alternative == "two-sided":
        t, observed = abs(t), abs(observed)
    elif alternative == "less":
        t, observed = -t, -observed
    return t > observed or math.isclose(t, observed, abs_tol=1e-12)


def test_the_sign_flip_p_value_by_hand_and_by_brute_force():
    # by hand: 1 + 2 + 3 = 6 is reached by one of the 8 assignments; ±1 ±2 ±3 >= 0 by five (6, 4, 2, 0, 0)
    assert stats.sign_flip_p([1, 2, 3]) == 1 / 8
    assert stats.sign_flip_p([1, 2, -3]) == 5 / 8
    assert stats.sign_flip_p([1, 2, 3], "two-sided") == 2 / 8 and stats.sign_flip_p([1, 2, 3], "less") == 1.0
    assert stats.sign_flip_p([0.1, 0.2, -0.3]) == 5 / 8  # the sum 0 in another order is still a tie
    assert stats.sign_flip_p([0.01] * 6) == 1 / 64  # six seeds can say no more than 1/64
    rng = np.random.default_rng(3)
    for alternative in stats.ALTERNATIVES:
        diffs = np.round(rng.normal(0.01, 0.02, size=9), 3)
        # every assignment of signs, from the bits of an integer
        assignments = [[-x if bits >> k & 1 else x for k, x in enumerate(diffs)] for bits in range(2 ** len(diffs))]
        count = sum(_as_extreme(sum(flipped), diffs.sum(), alternative) for flipped in assignments)
        assert stats.sign_flip_p(diffs, alternative) == pytest.approx(count / 2 ** len(diffs))
    with pytest.raises(KdpipeError, match="at most 20"):
        stats.sign_flip_p([0.01] * 21)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04: x3, x2, x1 = 0.03, 0.06, 0.04 -> kept non-decreasing: 0.03, 0.06, 0.06
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == {"a": pytest.approx(0.03), "b": pytest.approx(0.06),
                                                             "c": pytest.approx(0.06)}
    assert stats.holm({"x": 0.6, "y": 0.5}) == {"x": 1.0, "y": 1.0}  # capped at 1
    assert stats.holm({"only": 0.02}) == {"only": 0.02} and stats.holm({}) == {}


@pytest.mark.parametrize("diffs, alternative, expected", [
    ([1.0, 3.0], "greater", 0.5 - math.atan(2.0) / math.pi),  # t = 2 at 1 degree of freedom: Cauchy
    ([1.0, 3.0], "two-sided", 1 - 2 * math.atan(2.0) / math.pi),
    ([1.0, 3.0], "less", 0.5 + math.atan(2.0) / math.pi),
    ([1.0, 2.0, 3.0], "greater", 0.5 - math.sqrt(12) / (2 * math.sqrt(14))),  # t = √12 at 2: t / (2 √(2 + t²))
    ([-1.0, -2.0, -3.0], "less", 0.5 - math.sqrt(12) / (2 * math.sqrt(14))),
])
def test_the_paired_t_p_value_matches_the_closed_form_t_distributions(diffs, alternative, expected):
    assert stats.paired_t_p(diffs, alternative) == pytest.approx(expected, abs=1e-6)
