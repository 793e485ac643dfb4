"""Attack losses against direct computations, and their invariances."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qrobust.attacks import LOSSES
from qrobust.attacks.losses import ce, dlr, margin
from qrobust.errors import ConfigError


def _batch(seed: int, k: int = 10, b: int = 16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, generator=g, dtype=torch.float64) * 3,
            torch.randint(0, k, (b,), generator=g),
            torch.randint(0, k, (b,), generator=g))


def test_ce_matches_per_sample_cross_entropy():
    z, y, t = _batch(0)
    for i in range(len(y)):
        expect = -torch.log_softmax(z[i], 0)[y[i]]
        torch.testing.assert_close(ce(z, y)[i], expect)
        torch.testing.assert_close(ce(z, y, t)[i], torch.log_softmax(z[i], 0)[t[i]])
    torch.testing.assert_close(ce(z, y).mean(), F.cross_entropy(z, y))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_margin_is_positive_exactly_on_success(seed):
    z, y, t = _batch(seed)
    t = torch.where(t == y, (t + 1) % 10, t)
    assert torch.equal(margin(z, y) > 0, z.argmax(1) != y)
    assert torch.equal(margin(z, y, t) > 0, z.argmax(1) == t)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10**6), shift=st.floats(-50, 50), scale=st.floats(0.01, 100))
def test_dlr_is_shift_and_scale_invariant(seed, shift, scale):
    z, y, t = _batch(seed)
    t = torch.where(t == y, (t + 1) % 10, t)
    torch.testing.assert_close(dlr(z * scale + shift, y), dlr(z, y), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(dlr(z * scale + shift, y, t), dlr(z, y, t), rtol=1e-6, atol=1e-8)


def test_dlr_matches_formula():
    z, y, t = _batch(1)
    for i in range(len(y)):
        s = sorted(z[i].tolist(), reverse=True)
        other = max(v for j, v in enumerate(z[i].tolist()) if j != y[i])
        expect = -(z[i, y[i]].item() - other) / (s[0] - s[2] + 1e-12)
        assert dlr(z, y)[i].item() == pytest.approx(expect, rel=1e-9)
        expect_t = -(z[i, y[i]].item() - z[i, t[i]].item()) / (s[0] - 0.5 * (s[2] + s[3]) + 1e-12)
        assert dlr(z, y, t)[i].item() == pytest.approx(expect_t, rel=1e-9, abs=1e-12)


def test_dlr_needs_enough_classes_and_registry_is_loud():
    with pytest.raises(ConfigError, match="at least 3"):
        dlr(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match="valid: ce, dlr, margin"):
        LOSSES.get("hinge")
