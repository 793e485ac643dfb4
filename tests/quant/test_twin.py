"""Twins by recipe name (quant.make_twin), the mid-rise Gorsline weight grid, the integer
model or the reason there is none, and config-holdable attack parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks import ThreatModel, make_attack
from qrobust.errors import ConfigError
from qrobust.integer import integer_or_reason
from qrobust.quant import MidriseWeights, make_twin, recipe_bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_midrise_grid_levels_and_straight_through_gradient(bits):
    layer = MidLinear = MidriseWeights(nn.Linear(3, 2), bits)
    w = torch.linspace(-1.5, 1.5, 4001, requires_grad=True)
    q = MidLinear.q(w)
    levels = torch.unique(q.detach())
    expected = -1 + torch.arange(2**bits) * (2 / (2**bits - 1))
    assert torch.allclose(levels, expected, atol=1e-6)
    # nearest level: |q - clamp(w)| <= half a step
    assert (q - w.clamp(-1, 1)).abs().max() <= 1 / (2**bits - 1) + 1e-6
    (g,) = torch.autograd.grad(q.sum(), w)
    inside = (w.detach() > -1) & (w.detach() < 1)
    assert torch.equal(g[inside], torch.ones_like(g[inside]))
    assert torch.equal(g[w.detach().abs() > 1], torch.zeros_like(g[w.detach().abs() > 1]))
    x = torch.randn(5, 3)
    ref = F.linear(x, layer.q(layer.layer.weight), layer.q(layer.layer.bias))
    assert torch.equal(layer(x), ref)


def test_make_twin_gorsline_grids(digits_cnn):
    model = digits_cnn.model
    mid = make_twin(model, "gorsline2", None, "midrise")
    wrapped = [m for m in mid.modules() if isinstance(m, MidriseWeights)]
    assert len(wrapped) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    sym = make_twin(model, "gorsline2", None)  # qrobust.quant's symmetric grid
    assert not any(isinstance(m, MidriseWeights) for m in sym.modules())
    fp = make_twin(model, "fp32", None)
    x = torch.rand(4, 1, 8, 8)
    assert fp is not model and torch.equal(fp(x), model(x))


def test_recipe_bits_and_integer_notes(digits_cnn):
    assert recipe_bits("fp32") == (None, None)
    assert recipe_bits("w4a8") == (4, 8)
    assert recipe_bits("w3") == (3, None)
    with pytest.raises(ConfigError):
        recipe_bits("w0a0")
    integer, note = integer_or_reason(digits_cnn.model, "w3", "reference")
    assert integer is None and "activations float" in note


def test_eot_samples_param_sets_the_estimator(digits_cnn):
    from qrobust.defenses import DEFENSES

    defended = DEFENSES.get("mc-dropout")(digits_cnn.model, rate=0.2, passes=2)
    attack = make_attack("pgd", defended, ThreatModel("linf", 0.1), {"steps": 2, "eot_samples": 3})
    assert attack.describe()["estimator"] == "eot3+autograd"
    plain = make_attack("pgd", defended, ThreatModel("linf", 0.1), {"estimator": "autograd"})
    assert plain.describe()["estimator"] == "autograd"
    with pytest.raises(ConfigError, match="has no parameter 'stepz'"):
        make_attack("pgd", defended, ThreatModel("linf", 0.1), {"stepz": 2})
