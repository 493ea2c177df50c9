"""kdpipe.stats against scipy's figures (scipy is not a dependency; its values are written here)."""

from __future__ import annotations

import math

import pytest

from kdpipe import stats


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
