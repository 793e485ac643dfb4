"""The functional core: exact grid properties, STE gradients, stochastic rounding statistics."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qrobust.quant import QuantSpec, fake_quantize, round_ste, stochastic_round
from qrobust.quant.functional import (
    codes_ste,
    qparams_from_range,
    quantize_codes,
    scale_accumulator,
)

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


def _unfused_fake_quantize(x, s, z, qmin, qmax):
    """The STE graph written out with autograd's own ops: the oracle of the fused function."""
    return (torch.clamp(round_ste(x / s) + z, qmin, qmax) - z) * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed,symmetric,per_channel",
                         [(True, True, False), (True, False, True), (False, True, True)])
def test_fused_fake_quantize_matches_the_unfused_graph(dtype, signed, symmetric, per_channel):
    g = torch.Generator().manual_seed(5)
    spec = QuantSpec(4, signed=signed, symmetric=symmetric)
    x = torch.randn(6, 3, 5, generator=g, dtype=dtype) * 2
    lo, hi = (x.amin((1, 2)), x.amax((1, 2))) if per_channel else (x.min(), x.max())
    s, z = qparams_from_range(lo * 0.7, hi * 0.7, spec)  # some values clip
    sb = (s.view(-1, 1, 1) if per_channel else s).to(dtype)
    zb = (z.view(-1, 1, 1) if per_channel else z).to(dtype)
    x[0, 0, :3] = (torch.tensor([-1.5, 0.5, 2.5], dtype=dtype) * sb.flatten()[0])  # exact ties
    x[1, 0, :2] = (torch.tensor([spec.qmin, spec.qmax], dtype=dtype) - zb.flatten()[-1]) * sb.flatten()[-1]
    fused_x = x.clone().requires_grad_()
    fused = fake_quantize(fused_x, spec, s, z)
    oracle_x = x.clone().requires_grad_()
    oracle = _unfused_fake_quantize(oracle_x, sb, zb, spec.qmin, spec.qmax)
    with torch.no_grad():
        plain = fake_quantize(x, spec, s, z)
    assert fused.grad_fn is not None and "FakeQuant" in type(fused.grad_fn).__name__
    assert torch.equal(fused.detach(), oracle.detach()) and torch.equal(plain, oracle.detach())
    upstream = torch.randn(x.shape, generator=g, dtype=dtype)
    fused.backward(upstream)
    oracle.backward(upstream)
    assert torch.allclose(fused_x.grad, oracle_x.grad, rtol=1e-6, atol=0)
    assert (fused_x.grad == 0).any() and (fused_x.grad != 0).any()  # both sides of the clip


def test_codes_ste_matches_round_ste():
    g = torch.Generator().manual_seed(6)
    s = torch.tensor(0.037)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64)
    x[0, :2] = torch.tensor([0.5, -2.5], dtype=torch.float64) * s.double()  # ties
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = codes_ste(a, s, torch.float32)
    oracle = round_ste(b / s.double()).to(torch.float32)
    assert fused.dtype == torch.float32 and torch.equal(fused.detach(), oracle.detach())
    with torch.no_grad():
        assert torch.equal(codes_ste(x, s, torch.float32), oracle.detach())
    upstream = torch.randn(x.shape, generator=g)
    fused.backward(upstream)
    oracle.backward(upstream)
    assert a.grad.dtype == torch.float64 and torch.allclose(a.grad, b.grad, rtol=1e-7, atol=0)


@pytest.mark.parametrize("with_bias", [True, False])
def test_scale_accumulator_matches_the_unfused_graph(with_bias):
    g = torch.Generator().manual_seed(7)
    acc = torch.randint(-500, 500, (3, 4, 2, 2), generator=g).float()
    bias = torch.randint(-50, 50, (1, 4, 1, 1), generator=g).double() if with_bias else None
    s = torch.rand(1, 4, 1, 1, generator=g, dtype=torch.float64) * 1e-3
    leaves = [acc.clone().requires_grad_(), None if bias is None else bias.clone().requires_grad_()]
    oracle_leaves = [t if t is None else t.clone().detach().requires_grad_() for t in leaves]
    fused = scale_accumulator(leaves[0], leaves[1], s)
    oracle_acc = oracle_leaves[0].double()
    oracle = (oracle_acc + oracle_leaves[1] if with_bias else oracle_acc) * s
    with torch.no_grad():
        assert torch.equal(scale_accumulator(acc, bias, s), oracle.detach())
    assert fused.dtype == torch.float64 and torch.equal(fused.detach(), oracle.detach())
    upstream = torch.randn(fused.shape, generator=g, dtype=torch.float64)
    fused.backward(upstream)
    oracle.backward(upstream)
    for mine, theirs in zip(leaves, oracle_leaves, strict=True):
        if mine is not None:
            assert mine.grad.dtype == theirs.grad.dtype
            assert torch.allclose(mine.grad, theirs.grad, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="constant"):
        scale_accumulator(acc, bias, s.clone().requires_grad_())
