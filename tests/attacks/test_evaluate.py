"""The evaluator: only correct points attacked, metrics consistent, estimator picked from the
Defense attributes and recorded, masking checks attached."""

from __future__ import annotations

import pytest
import torch

from qrobust.attacks import (
    EOT,
    PGD,
    Autograd,
    Square,
    ThreatModel,
    evaluate_robustness,
    robustness_curve,
)
from qrobust.attacks.evaluate import predict
from qrobust.defenses import DEFENSES, insert_dropout
from qrobust.errors import ConfigError


@pytest.fixture(scope="module")
def points(digits_data):
    _, _, x, y = digits_data
    return x[:120], y[:120]


def test_metrics_are_consistent(mlp, points):
    x, y = points
    r = evaluate_robustness(mlp, PGD(mlp, ThreatModel("linf", 0.08), steps=10), x, y,
                            generator=torch.Generator().manual_seed(0), return_adv=True)
    clean = (predict(mlp, x) == y)
    assert r["n"] == 120 and r["clean_acc"] == pytest.approx(clean.float().mean().item())
    assert r["robust_acc_worst"] <= r["robust_acc"] <= r["clean_acc"]
    assert r["attack_success_rate"] == pytest.approx(1 - r["robust_acc"] / r["clean_acc"])
    x_adv = r["x_adv"]
    # misclassified points are not attacked; robust accuracy is the model's verdict on x_adv
    assert torch.equal(x_adv[~clean], x[~clean])
    assert r["robust_acc"] == pytest.approx((predict(mlp, x_adv) == y).float().mean().item())
    assert r["estimator"] == "autograd" and r["eps"] == 0.08 and isinstance(r["warnings"], list)


def test_estimators_are_picked_from_defense_attributes_and_recorded(mlp, points):
    x, y = points
    threat = ThreatModel("linf", 0.1)
    noisy = insert_dropout(mlp, 0.2, "classifier", torch.Generator().manual_seed(0))
    r = evaluate_robustness(noisy, PGD(noisy, threat, steps=5), x, y, checks=("randomness",),
                            generator=torch.Generator().manual_seed(0))
    assert r["estimator"] == "eot10+autograd" and r["model_randomized"] is True
    assert r["warnings"] == []
    filtered = DEFENSES.get("bit-depth")(mlp, bits=3)
    r = evaluate_robustness(filtered, PGD(filtered, threat, steps=5), x, y, checks=("randomness",))
    assert r["estimator"] == "bpda" and r["model_randomized"] is False


def test_randomized_model_attacked_without_eot_is_flagged(mlp, points):
    x, y = points
    noisy = insert_dropout(mlp, 0.3, "relu")
    attack = PGD(noisy, ThreatModel("linf", 0.1), steps=3, estimator=Autograd())
    r = evaluate_robustness(noisy, attack, x, y, checks=("randomness",))
    assert any("randomness under a deterministic attack" in w for w in r["warnings"])


def test_eot_attack_is_stronger_than_single_draw_on_a_noisy_model(mlp, digits_data):
    _, _, x, y = digits_data
    noisy = insert_dropout(mlp, 0.5, "relu", torch.Generator().manual_seed(0))
    threat = ThreatModel("linf", 0.06)
    accs = {}
    for name, est in (("single", Autograd()), ("eot", EOT(16))):
        r = evaluate_robustness(noisy, PGD(noisy, threat, steps=10, estimator=est), x, y,
                                checks=(), generator=torch.Generator().manual_seed(1))
        accs[name] = r["robust_acc"]
    # the robust accuracy of a random model is itself random: seeded, margin of 2 points
    assert accs["eot"] <= accs["single"] + 0.02, accs


def test_square_as_main_attack_and_curve(mlp, points):
    x, y = points
    r = evaluate_robustness(mlp, Square(mlp, ThreatModel("linf", 0.1), steps=100), x, y,
                            generator=torch.Generator().manual_seed(0))
    assert r["grad_evals"] == 0 and r["zero_grad_fraction"] is None
    curve = robustness_curve(mlp, lambda e: PGD(mlp, ThreatModel("linf", e), steps=5),
                             [0.0, 0.05, 0.1], x, y, checks=())
    accs = [p["robust_acc"] for p in curve["points"]]
    assert accs[0] == curve["points"][0]["clean_acc"] and accs[0] >= accs[1] >= accs[2]
    assert not [w for w in curve["warnings"] if "rises with eps" in w]


def test_curve_flags_accuracy_rising_with_eps(mlp, points):
    x, y = points

    def broken(eps):  # a budget-dependent bug: the larger budget gets a useless step size
        alpha = 0.05 if eps < 0.15 else 1e-4
        return PGD(mlp, ThreatModel("linf", eps), steps=5, alpha=alpha, random_start=False)

    curve = robustness_curve(mlp, broken, [0.1, 0.2], x, y, checks=())
    accs = [p["robust_acc_worst"] for p in curve["points"]]
    assert accs[1] > accs[0] + 0.1
    assert any("accuracy rises with eps" in w for w in curve["warnings"])


def test_unknown_check_fails_loudly(mlp, points):
    x, y = points
    with pytest.raises(ConfigError, match="unknown checks"):
        evaluate_robustness(mlp, PGD(mlp, ThreatModel("linf", 0.1)), x, y, checks=("magic",))
