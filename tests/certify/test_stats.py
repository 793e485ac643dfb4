"""Oracles for the smoothing statistics: scipy's binomial distribution and direct sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom, norm

from qrobust.certify import stats
from qrobust.errors import ConfigError


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 2000), frac=st.floats(0, 1), alpha=st.sampled_from([1e-3, 0.01, 0.05]))
def test_clopper_pearson_lower_solves_its_defining_equation(n, frac, alpha):
    # the one-sided CP lower bound L(k) is the p with P_{Bin(n, p)}[X >= k] = alpha
    k = int(round(frac * n))
    lower = stats.clopper_pearson_lower(k, n, alpha)
    if k == 0:
        assert lower == 0.0
    else:
        assert binom.sf(k - 1, n, lower) == pytest.approx(alpha, rel=1e-6)
        upper = stats.clopper_pearson_upper(k, n, alpha)
        assert lower < k / n <= upper or k == n


@pytest.mark.parametrize("n", [10, 100, 1000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_coverage_is_exact_at_least_one_minus_alpha(n, alpha):
    # exact coverage P_p[L(X) <= p] summed over the binomial pmf, for a grid of true p
    k = np.arange(n + 1)
    lower = stats.clopper_pearson_lower(k, np.full_like(k, n), alpha)
    for p in np.linspace(0.01, 0.99, 37):
        coverage = binom.pmf(k, n, p)[lower <= p].sum()
        assert coverage >= 1 - alpha - 1e-12


def test_clopper_pearson_upper_matches_defining_equation():
    for k, n in [(0, 5), (3, 10), (99, 100)]:
        up = stats.clopper_pearson_upper(k, n, 0.01)
        assert binom.cdf(k, n, up) == pytest.approx(0.01, rel=1e-6)
    assert stats.clopper_pearson_upper(7, 7, 0.01) == 1.0


@pytest.mark.parametrize("k,n", [(0, 1), (5, 10), (7, 10), (60, 100), (1, 30), (30, 30)])
def test_binomial_pvalue_matches_direct_two_sided_sum(k, n):
    # for p = 1/2 the two-sided p-value is min(1, 2 P[X >= max(k, n - k)])
    tail = sum(math.comb(n, j) for j in range(max(k, n - k), n + 1)) / 2**n
    assert stats.binomial_pvalue(k, n) == pytest.approx(min(1.0, 2 * tail), rel=1e-9)


def test_gaussian_radius_is_sigma_phi_inverse_and_never_larger():
    p = np.array([0.0, 0.3, 0.5, 0.5001, 0.9, 0.999])
    r = stats.gaussian_radius(p, 0.25)
    expect = np.where(p > 0.5, 0.25 * norm.ppf(p), 0.0)
    np.testing.assert_allclose(r, expect, rtol=1e-11)
    assert np.all(r <= expect)


def test_discrete_radius_reduces_to_cohen_and_shrinks_with_eta():
    p = np.linspace(0.4, 0.9999, 50)
    np.testing.assert_array_equal(stats.discrete_radius(p, 2.0, 0.0), stats.gaussian_radius(p, 2.0))
    prev = stats.discrete_radius(p, 2.0, 0.0)
    for eta in (1e-6, 1e-3, 0.05):
        r = stats.discrete_radius(p, 2.0, eta)
        assert np.all(r <= prev)
        # explicit formula where certified
        on = r > 0
        expect = 2.0 * (norm.ppf(p[on] - eta) - norm.ppf(0.5 + eta))
        np.testing.assert_allclose(r[on], expect, rtol=1e-10)
        assert np.all(p[~on] - eta <= 0.5 + eta + 1e-15)
        prev = r


def test_discrete_radius_does_not_lose_a_tiny_eta_to_rounding():
    # 1.0 - 1e-17 == 1.0 in float64: computing PhiInv(p - eta) directly gives an infinite
    # radius; the tail form gives sigma * PhiInv(1 - 1e-17) = sigma * 8.49...
    r = stats.discrete_radius(1.0, 1.0, 1e-17)
    assert math.isfinite(r)
    assert r == pytest.approx(norm.isf(1e-17) - norm.isf(0.5 - 1e-17), rel=1e-9)


def test_bad_arguments_raise_user_errors():
    with pytest.raises(ConfigError, match="alpha"):
        stats.clopper_pearson_lower(3, 10, 1.5)
    with pytest.raises(ConfigError, match="0 <= k <= n"):
        stats.clopper_pearson_lower(11, 10, 0.01)
    with pytest.raises(ConfigError, match="sigma"):
        stats.gaussian_radius(0.9, 0.0)
