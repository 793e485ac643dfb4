"""ThreatModel: projections stay in the ball and the box and are idempotent (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qrobust.attacks import ThreatModel
from qrobust.errors import ConfigError

norms = st.sampled_from(["linf", "l2"])
epsilons = st.floats(0.0, 2.0, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)


def _points(seed: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(5, 2, 4, 4, generator=g)
    x_adv = x + spread * torch.randn(5, 2, 4, 4, generator=g)
    return x, x_adv


@settings(max_examples=60, deadline=None)
@given(norm=norms, eps=epsilons, seed=seeds, spread=st.floats(0.0, 5.0))
def test_projection_in_ball_and_box_and_idempotent(norm, eps, seed, spread):
    threat = ThreatModel(norm, eps)
    x, x_adv = _points(seed, spread)
    p = threat.project(x_adv, x)
    assert p.min() >= 0 and p.max() <= 1
    assert (threat.distance(p, x) <= eps * (1 + 1e-5) + 1e-6).all()
    again = threat.project(p, x)
    if norm == "linf":
        assert torch.equal(again, p)
    else:
        torch.testing.assert_close(again, p, atol=1e-6, rtol=0)


@settings(max_examples=40, deadline=None)
@given(eps=epsilons, seed=seeds, spread=st.floats(0.0, 3.0))
def test_linf_projection_is_the_nearest_point(eps, seed, spread):
    # for linf ball x box the projection is coordinate-wise clipping to the intersection
    threat = ThreatModel("linf", eps)
    x, x_adv = _points(seed, spread)
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    expected = torch.minimum(torch.maximum(x_adv, lo), hi)
    torch.testing.assert_close(threat.project(x_adv, x), expected, atol=1e-7, rtol=0)


@settings(max_examples=40, deadline=None)
@given(eps=st.floats(0.0, 0.5), seed=seeds)
def test_l2_projection_of_inside_point_is_identity(eps, seed):
    threat = ThreatModel("l2", 10.0)  # big ball: only the box can bind
    x, x_adv = _points(seed, 0.0)
    inner = x + eps * (torch.rand_like(x) - 0.5) * 0.01
    inner = inner.clamp(0, 1)
    torch.testing.assert_close(threat.project(inner, x), inner, atol=0, rtol=0)


@settings(max_examples=40, deadline=None)
@given(norm=norms, eps=epsilons, seed=seeds)
def test_random_start_in_ball_and_box(norm, eps, seed):
    threat = ThreatModel(norm, eps)
    x, _ = _points(seed, 0.0)
    x0 = threat.random_start(x, torch.Generator().manual_seed(seed))
    assert x0.min() >= 0 and x0.max() <= 1
    assert (threat.distance(x0, x) <= eps * (1 + 1e-5) + 1e-6).all()


def test_random_start_is_seeded():
    threat, x = ThreatModel("linf", 0.3), torch.rand(4, 1, 8, 8)
    a = threat.random_start(x, torch.Generator().manual_seed(3))
    b = threat.random_start(x, torch.Generator().manual_seed(3))
    c = threat.random_start(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ascent_directions():
    x = torch.zeros(2, 1, 2, 2)
    g = torch.tensor([[3.0, -4.0, 0.0, 0.0], [0, 0, 1, 0]]).view(2, 1, 2, 2)
    linf = ThreatModel("linf", 1.0).ascent(x, g, 0.5)
    assert torch.equal(linf.flatten(1), torch.tensor([[0.5, -0.5, 0, 0], [0, 0, 0.5, 0]]))
    l2 = ThreatModel("l2", 1.0).ascent(x, g, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(l2.flatten(1), torch.tensor([[0.6, -0.8, 0, 0], [0, 0, 2.0, 0]]))


@pytest.mark.parametrize("kwargs", [dict(norm="l3", eps=0.1), dict(norm="linf", eps=-1.0),
                                    dict(norm="linf", eps=float("nan")),
                                    dict(norm="l2", eps=1.0, lower=1.0, upper=0.0)])
def test_invalid_threat_models_fail_loudly(kwargs):
    with pytest.raises(ConfigError):
        ThreatModel(**kwargs)
