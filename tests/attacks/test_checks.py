"""Gradient-masking checks: the pure functions, and deliberately masked models that must be
flagged and then broken by the temperature-scaled or the black-box attack."""

from __future__ import annotations

import pytest
import torch

from qrobust.attacks import PGD, Temperature, ThreatModel, checks, evaluate_robustness
from qrobust.attacks.evaluate import predict

from .conftest import Scaled


def test_vanishing_gradients():
    assert checks.vanishing_gradients(0.0, 0.0) == []
    assert checks.vanishing_gradients(None, None) == []
    assert "exactly zero" in checks.vanishing_gradients(0.5, 0.5)[0]
    assert "vanishing" in checks.vanishing_gradients(0.0, 0.5)[0]


def test_blackbox_beats_whitebox():
    assert checks.blackbox_beats_whitebox(0, 100) == []
    assert checks.blackbox_beats_whitebox(1, 100) == []
    assert checks.blackbox_beats_whitebox(0, 0) == []
    assert "black-box beats white-box" in checks.blackbox_beats_whitebox(10, 100)[0]


def test_accuracy_rises_with_eps():
    assert checks.accuracy_rises_with_eps([0.0, 0.1, 0.2], [0.9, 0.5, 0.1]) == []
    w = checks.accuracy_rises_with_eps([0.2, 0.0, 0.1], [0.6, 0.9, 0.5])
    assert len(w) == 1 and "eps=0.1" in w[0] and "eps=0.2" in w[0]


def test_randomness_and_temperature_checks():
    assert checks.randomness_under_deterministic_attack(True, "eot10+autograd") == []
    assert checks.randomness_under_deterministic_attack(False, "autograd") == []
    assert "deterministic" in checks.randomness_under_deterministic_attack(True, "autograd")[0]
    assert checks.temperature_much_stronger(0.5, 0.49) == []
    assert "temperature" in checks.temperature_much_stronger(0.9, 0.4)[0]


def test_output_is_random():
    x = torch.rand(4, 3)
    assert not checks.output_is_random(lambda t: t * 2, x)
    assert checks.output_is_random(lambda t: t + torch.rand_like(t), x)


@pytest.fixture(scope="module")
def test_points(digits_data):
    _, _, x, y = digits_data
    return x[:200], y[:200]


def test_plain_model_raises_no_masking_warning(mlp, test_points):
    x, y = test_points
    r = evaluate_robustness(mlp, PGD(mlp, ThreatModel("linf", 0.08), steps=10), x, y,
                            generator=torch.Generator().manual_seed(0))
    assert r["zero_grad_fraction"] == 0.0
    assert not [w for w in r["warnings"] if "gradient masking" in w or "temperature" in w]


def test_saturated_logits_are_flagged_and_broken_by_temperature(mlp, test_points):
    x, y = test_points
    masked = Scaled(mlp, 1000.0)
    threat = ThreatModel("linf", 0.1)
    gen = torch.Generator().manual_seed(0)
    r = evaluate_robustness(masked, PGD(masked, threat, steps=10), x, y, generator=gen,
                            checks=("gradients", "temperature"))
    assert r["zero_grad_fraction"] > 0.5
    assert any("gradient masking" in w for w in r["warnings"])
    assert any("temperature-scaled attack much stronger" in w for w in r["warnings"])
    # HNS gets close to what plain PGD gets on the unscaled model (it picks a different,
    # curvature-maximizing scale, so it is not the same attack: 0.1 tolerance); NJS divides by
    # the mean Jacobian singular value, which softens these logits much more (weaker here)
    reference = evaluate_robustness(mlp, PGD(mlp, threat, steps=10), x, y, generator=gen,
                                    checks=())["robust_acc"]
    for method in ("hessian", "jacobian"):
        t_attack = PGD(masked, threat, steps=10, estimator=Temperature(method))
        x_adv = t_attack(x, y, gen)
        acc = (predict(masked, x_adv) == y).float().mean().item()
        assert acc < r["robust_acc"] - 0.3
        if method == "hessian":
            assert acc <= reference + 0.1, (method, acc, reference)


def test_binary_input_net_is_flagged_and_broken_by_square(binary_mlp, test_points):
    x, y = test_points
    threat = ThreatModel("linf", 0.1)
    r = evaluate_robustness(binary_mlp, PGD(binary_mlp, threat, steps=10), x, y,
                            generator=torch.Generator().manual_seed(0),
                            checks=("gradients", "blackbox"), blackbox_queries=300)
    assert r["zero_grad_fraction"] == 1.0
    assert any("black-box beats white-box" in w for w in r["warnings"])
    assert r["robust_acc_worst"] < r["robust_acc"] - 0.1
