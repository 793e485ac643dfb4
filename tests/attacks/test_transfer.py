"""Attacking the deployed model: twin -> IntegerModel transfer, square straight on the integer
model. Uses qrobust.quant (skipped with a reason if it cannot be imported)."""

from __future__ import annotations

import pytest
import torch

from qrobust.attacks import PGD, ThreatModel, attack_integer_model, transfer_to_integer
from qrobust.attacks.evaluate import predict
from qrobust.attacks.transfer import transfer_metrics

quant = pytest.importorskip("qrobust.quant", reason="qrobust.quant (issue: quantization) missing")


@pytest.fixture(scope="module")
def deployed(digits_cnn, digits_data):
    xtr, _, _, _ = digits_data
    twin = quant.quantize(digits_cnn.model.eval(), "w4a8", xtr[:256]).eval()
    from qrobust.integer import to_integer

    return twin, to_integer(twin)


def test_transfer_metrics(deployed, digits_data):
    twin, integer = deployed
    _, _, x, y = digits_data
    x, y = x[:150], y[:150]
    r = transfer_to_integer(twin, PGD(twin, ThreatModel("linf", 0.08), steps=10), x, y,
                            integer=integer, generator=torch.Generator().manual_seed(0))
    twin_clean, int_clean = predict(twin, x), predict(integer, x)
    assert r["twin_clean_acc"] == pytest.approx((twin_clean == y).float().mean().item())
    assert r["clean_disagreement"] == pytest.approx((twin_clean != int_clean).float().mean().item())
    assert r["twin_robust_acc"] < r["twin_clean_acc"]
    assert 0.0 <= r["transfer_rate"] <= 1.0 and r["n_transfer_eligible"] > 0
    # the contract: twin and integer model agree on >= 99.9% of clean points; adversarial
    # examples sit near decision boundaries, so we only require that most transfer
    assert r["transfer_rate"] > 0.8
    assert r["estimator"] == "autograd" and r["zero_grad_fraction"] < 0.05  # STE gradients flow


def test_square_runs_on_the_integer_model(deployed, digits_data):
    _, integer = deployed
    _, _, x, y = digits_data
    r = attack_integer_model(integer, ThreatModel("linf", 0.1), x[:30], y[:30], queries=40,
                             generator=torch.Generator().manual_seed(0))
    assert r["robust_acc"] <= r["clean_acc"] and r["grad_evals"] == 0
    assert r["model_randomized"] is False


def test_transfer_metrics_is_the_one_definition_studies_and_the_command_line_share():
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    twin_clean = torch.tensor([0, 1, 2, 3, 9, 9])  # 4 right: attacked
    int_clean = torch.tensor([0, 1, 2, 9, 4, 9])   # differs from the twin on points 3 and 4
    twin_adv = torch.tensor([7, 1, 7, 7, 9, 9])    # fools the twin on 0, 2, 3
    int_adv = torch.tensor([7, 1, 2, 7, 4, 8])
    attacked = twin_clean == y
    t = transfer_metrics(y, twin_clean, twin_adv, int_clean, int_adv, attacked)
    assert t["clean_disagreement"] == pytest.approx(2 / 6)
    assert t["adv_disagreement"] == pytest.approx(1 / 4)  # point 2, among the 4 attacked
    # eligible: twin right, twin fooled, integer right on x: points 0 and 2; 0 transfers
    assert t["n_transfer_eligible"] == 2 and t["transfer_rate"] == pytest.approx(1 / 2)
    assert t["integer_robust_acc"] == pytest.approx(3 / 6)
    none = transfer_metrics(y, twin_clean, twin_clean, int_clean, int_clean,
                            torch.zeros(6, dtype=torch.bool))
    assert none["adv_disagreement"] is None and none["transfer_rate"] is None
