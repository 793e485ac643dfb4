"""A fitted model of robust accuracy as a function of bit width and attack strength.

Gorsline, Smith, Merkel (arXiv 2105.00227) model accuracy(bits, eps) but do not publish the
model; this one is ours. For b bits (b = 32 for float recipes) and attack strength eps,

    acc(b, eps) = A(b) * sigmoid(-(eps - mu(b)) / s(b))          (a logistic in eps)
    A(b)    = a_inf - a_1 * 2^-b       clean-accuracy ceiling, saturating in b
    mu(b)   = mu_inf + mu_1 * 2^-b     eps at which accuracy halves
    s(b)    = exp(l_inf + l_1 * 2^-b)  width of the drop (> 0)

Six parameters; every bit dependence goes through the quantization step 2^-b, so float
models are the b -> infinity limit, and ``mu_1 > 0`` means coarser quantization moves the
midpoint to larger eps (more robust), ``mu_1 < 0`` the opposite: the sign of the effect the
paper reports to depend on attack strength shows up as the interplay of A(b) and mu(b).
The accuracy floor is 0 (an unbounded untargeted attack fools every point). Fitted by least
squares (scipy.optimize.curve_fit) on the per-cell robust accuracies averaged over seeds;
goodness of fit: R^2 and RMSE on the same points, plus the number of points and parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit

PARAMS = ("a_inf", "a_1", "mu_inf", "mu_1", "l_inf", "l_1")
FORMULA = ("acc(b, eps) = A(b) / (1 + exp((eps - mu(b)) / s(b))), A(b) = a_inf - a_1*2^-b, "
           "mu(b) = mu_inf + mu_1*2^-b, s(b) = exp(l_inf + l_1*2^-b)")


def accuracy_model(X: np.ndarray, a_inf: float, a_1: float, mu_inf: float, mu_1: float,
                   l_inf: float, l_1: float) -> np.ndarray:
    """X = (bits, eps) stacked as shape (2, N); returns predicted accuracy, shape (N,)."""
    bits, eps = X
    q = np.exp2(-np.asarray(bits, dtype=float))
    ceiling = a_inf - a_1 * q
    mu = mu_inf + mu_1 * q
    s = np.exp(l_inf + l_1 * q)
    z = np.clip((eps - mu) / s, -60, 60)
    return ceiling / (1.0 + np.exp(z))


@dataclass(frozen=True)
class Fit:
    params: dict[str, float]
    r2: float
    rmse: float
    n: int

    def predict(self, bits: np.ndarray, eps: np.ndarray) -> np.ndarray:
        return accuracy_model(np.vstack([np.asarray(bits, float), np.asarray(eps, float)]),
                              *(self.params[k] for k in PARAMS))

    def midpoint(self, bits: float) -> float:
        return self.params["mu_inf"] + self.params["mu_1"] * 2.0 ** -bits


def fit_accuracy(bits: np.ndarray, eps: np.ndarray, acc: np.ndarray) -> Fit | str:
    """Least-squares fit of :func:`accuracy_model`; returns a reason string when it cannot
    (too few points, fewer than 2 bit widths or 3 eps values, or no convergence)."""
    bits, eps, acc = (np.asarray(v, dtype=float) for v in (bits, eps, acc))
    if len(acc) < len(PARAMS) + 2:
        return f"{len(acc)} points for {len(PARAMS)} parameters: too few to fit"
    if len(np.unique(eps)) < 3:
        return "fewer than 3 distinct eps values: too few to fit a logistic in eps"
    scale = max(float(eps.max()), 1e-6)
    mid = float(np.median(eps[eps > 0])) if (eps > 0).any() else scale / 2
    p0 = [float(acc.max()), 0.0, mid, 0.0, math.log(scale / 8), 0.0]
    lower = [0.0, -2.0, -scale, -100 * scale, math.log(scale) - 12, -50.0]
    upper = [1.5, 2.0, 10 * scale, 100 * scale, math.log(scale) + 3, 50.0]
    try:
        popt, _ = curve_fit(accuracy_model, np.vstack([bits, eps]), acc, p0=p0,
                            bounds=(lower, upper), maxfev=20000)
    except (RuntimeError, ValueError) as err:
        return f"the fit did not converge ({err})"
    pred = accuracy_model(np.vstack([bits, eps]), *popt)
    resid = acc - pred
    ss_tot = float(((acc - acc.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    rmse = float(np.sqrt((resid**2).mean()))
    return Fit(dict(zip(PARAMS, (float(p) for p in popt), strict=True)), r2, rmse, len(acc))
