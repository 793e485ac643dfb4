"""The functional core: exact grid properties, STE gradients, stochastic rounding statistics."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qrobust.quant import QuantSpec, fake_quantize, round_ste, stochastic_round
from qrobust.quant.functional import qparams_from_range, quantize_codes

floats = st.floats(-50, 50, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(floats, min_size=1, max_size=64), st.integers(2, 16), st.booleans(),
       st.booleans(), st.floats(0.01, 10))
def test_fake_quantize_grid_and_error(values, bits, signed, symmetric, scale):
    spec = QuantSpec(bits, signed=signed, symmetric=symmetric)
    x = torch.tensor(values)
    s, z = qparams_from_range(torch.tensor(-scale), torch.tensor(scale), spec)
    codes = quantize_codes(x, spec, s, z)
    assert torch.equal(codes, codes.round())  # integers
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    xq = fake_quantize(x, spec, s, z)
    assert torch.allclose(fake_quantize(xq, spec, s, z), xq, atol=1e-5)  # idempotent
    lo, hi = (spec.qmin - z) * s, (spec.qmax - z) * s
    inside = (x >= lo) & (x <= hi)
    assert torch.all((xq - x)[inside].abs() <= s / 2 * (1 + 1e-5) + 1e-6)
    assert torch.allclose(xq[~inside], x[~inside].clamp(lo, hi), atol=1e-5)


def test_zero_is_exact_for_asymmetric_ranges():
    spec = QuantSpec(4, signed=True, symmetric=False)
    s, z = qparams_from_range(torch.tensor(-0.3), torch.tensor(2.1), spec)
    assert float(fake_quantize(torch.zeros(1), spec, s, z)) == 0.0
    assert torch.allclose(fake_quantize(torch.tensor([2.1, -0.3]), spec, s, z),
                          torch.tensor([2.1, -0.3]), atol=float(s) / 2)


def test_round_half_up_and_ste():
    x = torch.tensor([-1.5, -0.5, 0.5, 1.5, 2.4999], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [-1.0, 0.0, 1.0, 2.0, 2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 5


def test_fake_quantize_ste_gradient_is_clipped_identity():
    spec = QuantSpec(4, signed=True)
    x = torch.tensor([-3.0, -0.4, 0.0, 0.33, 0.76, 3.0], requires_grad=True)
    fake_quantize(x, spec, torch.tensor(0.1), torch.tensor(0.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # codes clip at +-7


def test_sign_quantizer():
    spec = QuantSpec(1, signed=True)
    x = torch.tensor([-2.0, -0.1, 0.0, 0.3], requires_grad=True)
    y = fake_quantize(x, spec, torch.tensor(0.5), torch.tensor(0.0))
    assert y.tolist() == [-0.5, -0.5, 0.5, 0.5]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0]  # hard-tanh STE on x / s


def test_per_channel_scales_broadcast_along_axis0():
    spec = QuantSpec(8)
    w = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    s = w.abs().amax(dim=(1, 2, 3)) / spec.qmax
    codes = quantize_codes(w, spec, s, torch.zeros(3))
    for c in range(3):
        assert torch.equal(codes[c], quantize_codes(w[c], spec, s[c], torch.tensor(0.0)))


def test_stochastic_round_is_unbiased_and_seeded():
    x = torch.full((40_000,), 0.3)
    r = stochastic_round(x, torch.Generator().manual_seed(1))
    assert set(r.unique().tolist()) <= {0.0, 1.0}
    # Bernoulli(0.3) mean: 5 standard errors of tolerance
    assert abs(r.mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / x.numel())
    again = stochastic_round(x, torch.Generator().manual_seed(1))
    assert torch.equal(r, again)
    xs = torch.linspace(-3, 3, 101, requires_grad=True)
    out = stochastic_round(xs, torch.Generator().manual_seed(2))
    assert torch.all((out == xs.floor()) | (out == xs.ceil()))
    out.sum().backward()
    assert torch.all(xs.grad == 1)


@pytest.mark.parametrize("bits", [2, 4])
def test_stochastic_fake_quantize_needs_generator_and_is_unbiased(bits):
    spec = QuantSpec(bits, rounding="stochastic")
    x = torch.full((20_000,), 0.123)  # 0.615 steps of 0.2: inside the range at 2 bits too
    s, z = torch.tensor(0.2), torch.tensor(0.0)
    det = fake_quantize(x, spec, s, z)  # no generator: nearest
    assert torch.allclose(det, torch.full_like(x, 0.2))
    sto = fake_quantize(x, spec, s, z, torch.Generator().manual_seed(0))
    assert set((sto / 0.2).round().unique().tolist()) <= {0.0, 1.0}
    assert abs(sto.mean().item() - 0.123) < 5 * 0.2 * math.sqrt(0.615 * 0.385 / x.numel())
