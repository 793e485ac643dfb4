"""Stochastic quantizer: unbiased in expectation, on the grid, STE gradient, seeded."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest
from torch import nn

from qrobust.defenses import reseed
from qrobust.defenses.sq import StochasticQuantizer, sq_model, stochastic_quantize, stochastic_round
from qrobust.errors import ConfigError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_unbiased_in_expectation(bits):
    lo, hi, n = 0.0, 6.0, 4000
    x = torch.empty(500, dtype=torch.float64).uniform_(-1.0, 7.0, generator=gen(0))
    g = gen(1)
    mean = torch.stack([stochastic_quantize(x, bits, lo, hi, g) for _ in range(n)]).mean(0)
    scale = (hi - lo) / (2**bits - 1)
    # one sample has std <= scale/2 (Bernoulli on one step): the mean of n has std <= scale/(2 sqrt n)
    sd = scale / (2 * n**0.5)
    target = x.clamp(lo, hi)
    assert (mean - target).abs().max().item() < 5.5 * sd  # 500 coords: 5.5 sd is a ~2e-5 event
    assert abs((mean - target).mean().item()) < 5.5 * sd / 500**0.5


def test_round_up_frequency_matches_fraction_binomial_test():
    u = torch.full((20000,), 3.3, dtype=torch.float64)
    r = stochastic_round(u, gen(2))
    assert set(r.unique().tolist()) == {3.0, 4.0}
    ups = int((r == 4.0).sum())
    assert binomtest(ups, len(u), 0.3).pvalue > 1e-3


def test_outputs_on_the_grid_and_grid_points_fixed():
    x = torch.empty(1000).uniform_(-2, 8, generator=gen(3))
    q = stochastic_quantize(x, 3, 0.0, 6.0, gen(4))
    scale = 6.0 / 7
    k = q / scale
    torch.testing.assert_close(k, k.round(), atol=1e-5, rtol=0)
    assert k.min() >= 0 and k.max() <= 7 + 1e-5
    grid = torch.arange(8, dtype=torch.float64) * scale
    torch.testing.assert_close(stochastic_quantize(grid, 3, 0.0, 6.0, gen(5)), grid)


def test_gradient_is_straight_through_inside_the_clip_range():
    x = torch.tensor([-1.0, 0.5, 2.7, 5.9, 6.5], requires_grad=True)
    (g,) = torch.autograd.grad(stochastic_quantize(x, 2, 0.0, 6.0, gen(0)).sum(), x)
    assert g.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_seeded_reproducible_and_random_in_eval_mode():
    x = torch.rand(64, 10, generator=gen(0)) * 6
    a = StochasticQuantizer(2, generator=gen(7)).eval()(x)
    b = StochasticQuantizer(2, generator=gen(7)).eval()(x)
    assert torch.equal(a, b)
    m = StochasticQuantizer(2).eval()  # a generator of its own, seeded 0
    state = torch.get_rng_state()
    assert reseed(m, 11) == 1
    c = m(x)
    assert not torch.equal(c, m(x))  # still random in eval mode
    reseed(m, 11)
    assert torch.equal(c, m(x))  # reseeding repeats the draws
    assert torch.equal(torch.get_rng_state(), state)  # torch's global RNG never drawn from


def test_sq_model_replaces_relus_and_marks_randomized():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.ReLU6()),
                          nn.Linear(8, 3))
    out = sq_model(model, bits=3)
    assert sum(isinstance(m, StochasticQuantizer) for m in out.modules()) == 2
    assert not any(isinstance(m, nn.ReLU | nn.ReLU6) for m in out.modules())
    assert out.randomized and out.differentiable
    assert any(isinstance(m, nn.ReLU) for m in model.modules())  # the input is not modified
    x = torch.rand(5, 4, requires_grad=True)
    out(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_invalid_configs_fail_loudly():
    with pytest.raises(ConfigError, match="bits"):
        StochasticQuantizer(0)
    with pytest.raises(ConfigError, match="hi > lo"):
        stochastic_quantize(torch.zeros(2), 2, 1.0, 1.0)
    with pytest.raises(ConfigError, match="no nn.ReLU"):
        sq_model(nn.Linear(2, 2))


def test_registry_factory_is_seeded_and_training_free():
    from qrobust.defenses.base import DEFENSES, is_randomized

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(6, 4, generator=gen(0))
    a = DEFENSES.get("sq")(model, bits=2, seed=3)
    b = DEFENSES.get("sq")(model, bits=2, seed=3)
    assert is_randomized(a) and torch.equal(a(x), b(x))
    assert torch.equal(a[1].weight, model[1].weight)  # same trained weights, no retraining


@settings(max_examples=50, deadline=None)
@given(x=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=20),
       bits=st.integers(1, 8), lo=st.floats(-3, 0), width=st.floats(0.5, 8), seed=st.integers(0, 99))
def test_property_output_is_a_neighbouring_grid_point(x, bits, lo, width, seed):
    t = torch.tensor(x, dtype=torch.float64)
    hi = lo + width
    q = stochastic_quantize(t, bits, lo, hi, gen(seed))
    step = (hi - lo) / (2**bits - 1)
    c = t.clamp(lo, hi)
    assert ((q - c).abs() <= step * (1 + 1e-9)).all()  # one of the two grid points around x
    k = (q - lo) / step
    torch.testing.assert_close(k, k.round(), atol=1e-6, rtol=0)
    assert (q >= lo - 1e-9).all() and (q <= hi + 1e-9).all()
