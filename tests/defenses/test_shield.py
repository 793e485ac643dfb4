"""Stochastic-Shield: the composition filter -> MC-dropout model -> mean of T passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.defenses.base import DEFENSES, bpda_targets, is_differentiable, is_randomized
from qrobust.defenses.filters import BitDepth, median_filter
from qrobust.defenses.mc_dropout import MCDropout
from qrobust.defenses.shield import stochastic_shield
from qrobust.errors import ConfigError


def gen(s):
    return torch.Generator().manual_seed(s)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


X = torch.rand(5, 1, 6, 6, generator=gen(1))


def test_without_dropout_it_is_the_filtered_model():
    m = model()
    shield = stochastic_shield(m, filter="median", size=3, rate=0.0, passes=4)
    torch.testing.assert_close(shield(X), F.log_softmax(m(median_filter(X, 3)), -1),
                               rtol=1e-5, atol=1e-6)


def test_attributes_pick_eot_and_bpda_and_the_surrogate_is_the_identity():
    m = model()
    shield = stochastic_shield(m, filter="bit-depth", rate=0.2, passes=3, seed=0)
    assert is_randomized(shield) and not is_differentiable(shield)
    assert shield.randomized and not shield.differentiable
    targets = bpda_targets(shield)
    assert len(targets) == 1 and isinstance(targets[0], BitDepth)
    assert isinstance(targets[0].surrogate(), nn.Identity)
    for name in ("gaussian", "median"):  # differentiable filters: EOT over the true gradient
        smooth = stochastic_shield(m, filter=name, size=3, rate=0.2)
        assert smooth.randomized and smooth.differentiable and bpda_targets(smooth) == []
    assert any(isinstance(x, MCDropout) for x in shield.modules())
    assert not any(isinstance(x, MCDropout) for x in m.modules())  # the model is untouched


def test_bpda_gradient_through_the_shield_equals_the_gradient_at_the_filtered_input():
    """BPDA: forward through the filter, backward as if it were its surrogate (the identity);
    then d shield / dx = d(model part) / dz at z = filter(x)."""
    m = model()
    shield = stochastic_shield(m, filter="bit-depth", bits=3, rate=0.0, passes=2)
    filt, rest = shield[0], nn.Sequential(*list(shield)[1:])
    x = X.clone().requires_grad_(True)
    z = x + (filt(x) - filt.surrogate()(x)).detach()  # straight-through the surrogate
    (g_bpda,) = torch.autograd.grad(rest(z)[:, 0].sum(), x)
    zf = filt(X).requires_grad_(True)
    (g_direct,) = torch.autograd.grad(rest(zf)[:, 0].sum(), zf)
    torch.testing.assert_close(g_bpda, g_direct)
    (g_plain,) = torch.autograd.grad(shield(x)[:, 0].sum(), x)
    assert g_plain.abs().sum() == 0 and g_bpda.abs().sum() > 0  # why BPDA is needed


def test_seeded_dropout_is_reproducible_and_averaging_reduces_spread():
    m = model()
    a = stochastic_shield(m, rate=0.3, passes=5, seed=7)(X)
    b = stochastic_shield(m, rate=0.3, passes=5, seed=7)(X)
    torch.testing.assert_close(a, b)
    one = stochastic_shield(m, filter="none", rate=0.3, passes=1, seed=1)
    many = stochastic_shield(m, filter="none", rate=0.3, passes=50, seed=1)
    spread1 = torch.stack([one(X).exp() for _ in range(20)]).std(0).mean()
    spread50 = torch.stack([many(X).exp() for _ in range(20)]).std(0).mean()
    assert spread50 < spread1 / 3  # std of a mean of 50 ~ std / 7


def test_sequential_models_run_the_deterministic_prefix_once():
    m = model()
    shield = stochastic_shield(m, filter="mean", rate=0.3, passes=6, seed=3)
    assert len(shield) == 3  # filter, deterministic trunk, MC-dropout head (T passes)
    calls = []
    shield_hooked = stochastic_shield(m, filter="mean", rate=0.3, passes=6, seed=3)
    shield_hooked[1][0].register_forward_hook(lambda *a: calls.append(1))
    out = shield_hooked(X)
    assert len(calls) == 1  # the conv trunk ran once for T = 6 passes
    # the same function as the unsplit composition with the same dropout masks
    from qrobust.defenses.filters import mean_filter
    from qrobust.defenses.mc_dropout import MCDropoutModel, insert_dropout

    ref = MCDropoutModel(insert_dropout(m, 0.3, "classifier", gen(3)), 6)(mean_filter(X, 3))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(shield(X), ref)


def test_registry_and_errors():
    m = model()
    shield = DEFENSES.get("shield")(m, filter="bit-depth", bits=2, rate=0.1, placement="linear")
    assert isinstance(shield[0], BitDepth) and shield.randomized
    assert sum(isinstance(x, MCDropout) for x in shield.modules()) == 2
    assert shield(X).shape == (5, 3)
    with pytest.raises(ConfigError, match="unknown shield filter"):
        stochastic_shield(m, filter="wiener")


def test_quantized_twin_is_run_as_a_chain_with_the_same_function():
    from qrobust.defenses.shield import as_sequential
    from qrobust.models import Normalize
    from qrobust.quant import quantize

    torch.manual_seed(0)
    float_model = nn.Sequential(Normalize([0.5], [0.25]), *model())
    twin = quantize(float_model, "w4a4", X)
    seq = as_sequential(twin)
    assert isinstance(seq, nn.Sequential) and len(seq) > len(float_model)
    torch.testing.assert_close(seq(X), twin(X))
    from qrobust.models import ModelSpec, build_model

    zoo = build_model(ModelSpec("small-cnn", (1, 8, 8), 3, 0.0, (0.3,), (0.35,), {"width": 4}))
    zoo_twin = quantize(zoo, "w4a4", torch.rand(8, 1, 8, 8, generator=gen(2)))
    assert isinstance(as_sequential(zoo_twin), nn.Sequential)  # the zoo's twins are chains
    x8 = torch.rand(5, 1, 8, 8, generator=gen(3))
    torch.testing.assert_close(as_sequential(zoo_twin)(x8), zoo_twin(x8))
    shield = stochastic_shield(twin, filter="median", rate=0.0, passes=3)
    assert len(shield) == 3  # filter, prefix, MC head
    torch.testing.assert_close(shield(X), F.log_softmax(twin(median_filter(X, 3)), -1),
                               rtol=1e-5, atol=1e-6)
    assert as_sequential(m := model()) is m


def test_residual_twin_runs_its_body_once_and_computes_the_same_function():
    """A resnet twin is no chain: the shield splits its graph at the classifier's input, so
    the body runs once and only the head T (x EOT) times; the output equals the unsplit run."""
    from qrobust.defenses.base import split_at_randomness
    from qrobust.defenses.mc_dropout import MCDropoutModel, insert_dropout
    from qrobust.models import ModelSpec, build_model
    from qrobust.quant import quantize

    torch.manual_seed(0)
    net = build_model(ModelSpec("resnet20", (3, 8, 8), 4, 0.0, (0.5,) * 3, (0.25,) * 3)).eval()
    x = torch.rand(6, 3, 8, 8, generator=gen(4))
    twin = quantize(net, "w4a4", x)
    dropped = insert_dropout(twin, 0.3, "classifier", gen(5))
    prefix, rest = split_at_randomness(dropped)
    assert not is_randomized(prefix) and is_randomized(rest)
    assert sum(n.op == "call_module" for n in rest.graph.nodes) <= 4  # pool, fc, quantizers
    whole = MCDropoutModel(dropped, passes=4)
    whole._split = None  # the unsplit reference
    split = MCDropoutModel(insert_dropout(twin, 0.3, "classifier", gen(5)), passes=4)
    assert split._split is not None
    torch.testing.assert_close(split(x), whole(x), rtol=0, atol=1e-6)
    shield = stochastic_shield(twin, filter="median", rate=0.3, passes=4, seed=7)
    assert len(shield) == 3  # filter, the twin's body, the MC head
