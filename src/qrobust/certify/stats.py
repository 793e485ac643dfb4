"""Statistics of randomized smoothing: confidence bounds, the abstention test and radii.

Pure functions over counts; every one is checked against an independent scipy computation
in tests/certify/test_stats.py. References: Cohen, Rosenfeld, Kolter 2019 (arXiv 1902.02918),
Clopper and Pearson 1934; the discrete-noise radius is derived in docs/intrs_radius.md.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import beta, binomtest, norm

from qrobust.errors import ConfigError

# Relative slack applied to radii so that float64 rounding in ppf/isf never rounds a radius
# *up* past the exact value (Voracek & Hein, ICLR 2023, on float rounding in smoothing).
RADIUS_SLACK = 1e-12


def _check_counts(k: np.ndarray, n: np.ndarray) -> None:
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ConfigError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}; e.g. 0.001")


def clopper_pearson_lower(k, n, alpha: float) -> np.ndarray | float:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound for a binomial proportion.

    ``k`` successes out of ``n`` (ints or integer arrays, broadcast). Returns values in [0, 1];
    0 where k == 0. Equals ``proportion_confint(k, n, 2*alpha, method="beta")[0]`` as used by
    Cohen et al.: P[p >= bound] >= 1 - alpha for every true p.
    """
    _check_alpha(alpha)
    k_arr, n_arr = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    _check_counts(k_arr, n_arr)
    with np.errstate(invalid="ignore"):
        lower = np.where(k_arr > 0, beta.ppf(alpha, k_arr, n_arr - k_arr + 1), 0.0)
    return float(lower) if np.ndim(lower) == 0 else lower


def clopper_pearson_upper(k, n, alpha: float) -> np.ndarray | float:
    """One-sided (1 - alpha) Clopper-Pearson upper confidence bound (1 where k == n)."""
    _check_alpha(alpha)
    k_arr, n_arr = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    _check_counts(k_arr, n_arr)
    with np.errstate(invalid="ignore"):
        upper = np.where(k_arr < n_arr, beta.isf(alpha, k_arr + 1, n_arr - k_arr), 1.0)
    return float(upper) if np.ndim(upper) == 0 else upper


def binomial_pvalue(k: int, n: int) -> float:
    """Two-sided p-value of ``k`` successes in ``n`` trials against p = 1/2 (scipy binomtest).

    Cohen et al.'s PREDICT: with the top-two counts nA, nB it tests nA ~ Bin(nA + nB, 1/2)
    and abstains when the p-value exceeds alpha.
    """
    if n < 1 or not 0 <= k <= n:
        raise ConfigError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    return float(binomtest(int(k), int(n), 0.5, alternative="two-sided").pvalue)


def gaussian_radius(p_lower, sigma: float) -> np.ndarray | float:
    """Cohen et al.'s certified L2 radius sigma * PhiInv(p_lower), 0 where p_lower <= 1/2.

    ``p_lower`` in [0, 1] (array or float), ``sigma`` > 0 the noise std in the input's units.
    The radius is shrunk by a relative 1e-12 so float64 rounding never enlarges it.
    """
    if sigma <= 0:
        raise ConfigError(f"sigma must be positive, got {sigma}")
    p = np.asarray(p_lower, dtype=np.float64)
    r = np.where(p > 0.5, sigma * norm.isf(1.0 - np.clip(p, 0.5, 1.0)), 0.0) * (1 - RADIUS_SLACK)
    r = np.maximum(r, 0.0)
    return float(r) if np.ndim(r) == 0 else r


def discrete_radius(p_lower, sigma: float, eta: float) -> np.ndarray | float:
    """Certified L2 radius for smoothing with noise within total variation ``eta`` of the
    rounded Gaussian round(N(0, sigma^2 I)) (docs/intrs_radius.md, Theorem 2):

        R = sigma * (PhiInv(p_lower - eta) - PhiInv(1/2 + eta)),   0 where that is <= 0.

    With ``eta = 0`` this is Cohen's radius. Units are those of ``sigma`` (pixel codes for
    integer-only smoothing). PhiInv(p - eta) is evaluated as -PhiInv((1 - p) + eta): 1 - p is
    exact in float64 for p >= 1/2 (Sterbenz), so a tiny eta is never lost to rounding
    (p - 1e-17 == 1.0 in float64 would give an infinite radius). Shrunk by a relative 1e-12.
    """
    if sigma <= 0 or not 0 <= eta < 0.5:
        raise ConfigError(f"need sigma > 0 and 0 <= eta < 1/2, got sigma={sigma}, eta={eta}")
    p = np.asarray(p_lower, dtype=np.float64)
    upper_tail = (1.0 - np.clip(p, 0.5, 1.0)) + eta  # P[miss] bound under the rounded Gaussian
    base = norm.isf(0.5 - eta) if eta > 0 else 0.0  # PhiInv(1/2 + eta)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where((p > 0.5) & (upper_tail < 0.5 - eta), norm.isf(upper_tail) - base, 0.0)
    r = np.maximum(sigma * z * (1 - RADIUS_SLACK), 0.0)
    return float(r) if np.ndim(r) == 0 else r


def smoothed_linear_probability(margin: float, weight_norm: float, sigma: float) -> float:
    """P[w.(x + e) + b > 0] for e ~ N(0, sigma^2 I): Phi(margin / (sigma * ||w||)).

    ``margin`` = w.x + b. The closed form used by the soundness tests; the true robust radius
    of the smoothed linear classifier at x is |margin| / ||w|| (its decision boundary).
    """
    return float(norm.cdf(margin / (sigma * weight_norm)))
