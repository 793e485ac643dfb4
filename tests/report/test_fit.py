"""The accuracy(bits, eps) model: recovers known parameters; reports when it cannot fit."""

from __future__ import annotations

import numpy as np
import pytest

from qrobust.report.fit import PARAMS, Fit, accuracy_model, fit_accuracy


def grid_points():
    bits = np.repeat([2, 3, 4, 8, 32], 8).astype(float)
    eps = np.tile(np.linspace(0, 0.3, 8), 5)
    return bits, eps


def test_model_limits_and_shape():
    bits, eps = np.array([32.0, 32.0, 2.0]), np.array([0.0, 10.0, 0.0])
    acc = accuracy_model(np.vstack([bits, eps]), 0.98, 0.4, 0.1, 0.05, np.log(0.02), 0.0)
    # eps = 0: ceiling * sigmoid(mu/s) ~ ceiling when mu >> s
    assert acc[0] == pytest.approx(0.98 / (1 + np.exp(-0.1 / 0.02)))
    assert acc[1] == pytest.approx(0.0, abs=1e-12)
    assert acc[2] == pytest.approx((0.98 - 0.1) / (1 + np.exp(-(0.1 + 0.0125) / 0.02)))


def test_fit_recovers_parameters_of_noisy_synthetic_data():
    true = dict(a_inf=0.97, a_1=0.6, mu_inf=0.12, mu_1=0.2, l_inf=np.log(0.03), l_1=1.0)
    bits, eps = grid_points()
    rng = np.random.default_rng(0)
    clean = accuracy_model(np.vstack([bits, eps]), *true.values())
    acc = clean + rng.normal(0, 0.005, size=clean.shape)
    fit = fit_accuracy(bits, eps, acc)
    assert isinstance(fit, Fit) and fit.n == 40 and set(fit.params) == set(PARAMS)
    # noise sd 0.005: the residual RMSE is about the noise level and R^2 is near 1
    assert 0.002 < fit.rmse < 0.008 and fit.r2 > 0.995
    assert np.abs(fit.predict(bits, eps) - clean).max() < 0.02
    assert fit.params["mu_inf"] == pytest.approx(0.12, abs=0.01)
    assert fit.params["a_inf"] == pytest.approx(0.97, abs=0.02)
    # R^2 and RMSE are what they say, computed independently
    resid = acc - fit.predict(bits, eps)
    assert fit.rmse == pytest.approx(np.sqrt(np.mean(resid**2)))
    assert fit.r2 == pytest.approx(1 - np.sum(resid**2) / np.sum((acc - acc.mean()) ** 2))


def test_fit_refuses_too_little_data():
    assert "too few" in fit_accuracy(np.array([2, 4]), np.array([0, 0.1]), np.array([0.9, 0.5]))
    bits, eps = grid_points()
    msg = fit_accuracy(bits, np.where(eps > 0.1, 0.2, 0.0), np.full_like(eps, 0.5))
    assert "3 distinct eps" in msg
