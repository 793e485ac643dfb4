"""The reference executor: integer kernels against oracles, and the twin <-> integer contract."""

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qrobust.errors import ConfigError
from qrobust.integer import to_integer
from qrobust.integer.agreement import contract, prediction_agreement
from qrobust.integer.base import pixel_codes
from qrobust.integer.program import RequantOp, Term, fixed_point, input_codes
from qrobust.integer.reference import exact_dtype, int_conv2d, int_matmul, requantize
from qrobust.quant import QuantInput, quantize, widen_input

CODE_MISMATCH_TOLERANCE = 1e-3  # share of codes allowed to differ (each by at most 1 LSB)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 70), st.integers(1, 20),
       st.sampled_from([(0, 255), (-128, 127), (-255, 255), (0, 15), (-3000, 3000)]),
       st.sampled_from([(-127, 127), (-1, 1), (-300, 300)]), st.integers(0, 2**31 - 1))
def test_int_matmul_is_exact(m, k, n, a_range, b_range, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(a_range[0], a_range[1] + 1, (m, k), generator=g)
    b = torch.randint(b_range[0], b_range[1] + 1, (k, n), generator=g)
    out = int_matmul(a, b)
    assert out.dtype == torch.int64
    assert torch.equal(out, a @ b)  # int64 matmul: no BLAS, no rounding


def int64_conv2d(x, w, stride, padding):
    """Oracle: zero-pad, take every window, multiply-add in int64."""
    kh, kw = w.shape[2:]
    cols = F.pad(x, (padding, padding, padding, padding)).unfold(2, kh, stride).unfold(3, kw, stride)
    return torch.einsum("nchwkl,ockl->nohw", cols, w)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0), (2, 0)])
@pytest.mark.parametrize("x_range", [(0, 255), (-255, 255), (-2000, 2000)])
def test_int_conv2d_is_exact(stride, padding, x_range):
    g = torch.Generator().manual_seed(stride * 10 + padding)
    x = torch.randint(x_range[0], x_range[1] + 1, (16, 64, 9, 7), generator=g)
    w = torch.randint(-127, 128, (8, 64, 3, 3), generator=g)
    got = int_conv2d(x, w, (stride, stride), (padding, padding))
    assert got.dtype == torch.int64
    assert torch.equal(got, int64_conv2d(x, w, stride, padding))


def test_exact_dtype_follows_the_bound_and_refuses_reduced_float32():
    assert exact_dtype(2**24) == torch.float32 and exact_dtype(2**24 + 1) == torch.float64
    with pytest.raises(ConfigError, match="too wide"):
        exact_dtype(2**53 + 1)
    old = torch.backends.mkldnn.conv.fp32_precision
    try:
        torch.backends.mkldnn.conv.fp32_precision = "tf32"  # a user's speed setting
        assert exact_dtype(100) == torch.float64
    finally:
        torch.backends.mkldnn.conv.fp32_precision = old


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1e-6, 50.0), min_size=1, max_size=2),
       st.lists(st.integers(-2**24, 2**24), min_size=2, max_size=2))
@example(reals=[16.125, 0.04], values=[1, 15011057])  # a small multiplier under a shared shift
def test_fixed_point_requantization_rounds_half_up_exactly(reals, values):
    """(sum v_t m_t + 2^(S-1)) >> S equals round-half-up of the exact sum v_t M_t, except
    within the multipliers' rounding error (2^-(S+1) each, S shared) of a tie, where it is off
    by at most 1."""
    real = torch.tensor(reals, dtype=torch.float64).view(-1, 1)
    mult, shift = fixed_point(real)
    assert 2**30 <= int(mult.max()) < 2**31
    terms = tuple(Term(f"t{i}", 0, mult[i], real[i]) for i in range(len(reals)))
    op = RequantOp("out", terms, shift, 0, -(2**62), 2**62)
    vs = [torch.tensor([[values[i]]]) for i in range(len(reals))]
    got = int(requantize(vs, op))
    exact = sum(Fraction(values[i]) * Fraction(reals[i]) for i in range(len(reals)))
    want = int(np.floor(exact + Fraction(1, 2)))
    # the terms share one shift S with 2^-S <= max(reals) 2^-30: each m_t / 2^S is within
    # 2^-(S+1) of M_t, so a small multiplier's relative error can be far above 2^-30
    slack = sum(abs(v) for v in values[:len(reals)]) * max(reals) * 2**-30 + 2**-20
    tie_distance = abs(float(exact - want) + 0.5)  # distance of exact to the tie below
    tie_distance = min(tie_distance, abs(float(exact - want) - 0.5))
    assert got == want or (abs(got - want) == 1 and tie_distance <= slack)


def all_digits(digits):
    xtr, _ = digits.train.tensors()
    xte, _ = digits.test.tensors()
    return torch.cat([xtr, xte])  # 1797 images


CASES = [("small-cnn", r) for r in ("w8a8", "w4a4", "w2a2", "w1a1", "w4a4,first=8,last=8")]
CASES += [("mlp", r) for r in ("w8a8,pt", "w3a3,relu6", "w4a8,asym")]
CASES += [("resnet20", r) for r in ("w8a8", "w2a2,first=8,last=8")]  # residual adds, avg pool


@pytest.mark.parametrize("arch,recipe", CASES)
def test_twin_and_reference_agree(trained, digits, calib, arch, recipe):
    """The contract: same codes up to 1 LSB (on <= 0.1% of codes), identical predictions on
    >= 99.9% of the 1797 digits images."""
    twin = quantize(trained(arch), recipe, calib)
    report = contract(twin, to_integer(twin), all_digits(digits))
    assert report.codes, "no activation quantizers compared"
    for name, d in report.codes.items():
        assert d.max_abs <= 1, (name, d)
        assert d.mismatch_rate <= CODE_MISMATCH_TOLERANCE, (name, d)
    assert report.n == 1797 and report.prediction_agreement >= 0.999


def test_integer_tensors_are_integers_in_range(trained, digits, calib):
    twin = quantize(trained("resnet20"), "w4a4", calib)
    integer = to_integer(twin)
    x = digits.test.tensors()[0][:50]
    slots = integer.intermediate_codes(pixel_codes(x))
    program = integer.program(tuple(x.shape[1:]))
    for name, value in slots.items():
        if name == "logits":
            continue
        assert value.dtype == torch.int64, name
        if name in program.codes:
            c = program.codes[name]
            assert c.qmin <= int(value.min()) and int(value.max()) <= c.qmax, name


def test_forward_pixels_clips_and_matches_forward(trained, digits, calib):
    integer = to_integer(quantize(trained("small-cnn"), "w4a8", calib))
    x = digits.test.tensors()[0][:64]
    codes = pixel_codes(x)
    assert torch.equal(integer(x), integer.forward_pixels(codes))
    noise = torch.randint(-400, 400, codes.shape, generator=torch.Generator().manual_seed(0))
    wild = codes + noise
    assert torch.equal(integer.forward_pixels(wild), integer.forward_pixels(wild.clamp(0, 255)))
    out = integer(x.requires_grad_())
    assert not out.requires_grad and out.dtype == torch.float32


def test_lowering_errors(trained, calib):
    model = trained("mlp")
    with pytest.raises(ConfigError, match="weight-only"):
        to_integer(quantize(model, "w4", calib))
    with pytest.raises(ConfigError, match="at most 8"):
        to_integer(quantize(model, "w8a12", calib))(calib[:2])
    with pytest.raises(ConfigError, match="not calibrated"):
        to_integer(quantize(model, "w8a8"))(calib[:2])
    with pytest.raises(ConfigError, match="unknown integer backend"):
        to_integer(quantize(model, "w8a8", calib), backend="tpu")


@pytest.mark.parametrize("arch", ["small-cnn", "resnet20"])
def test_widened_input_twin_and_integer_models_agree_on_noisy_images(trained, digits, calib, arch):
    """A widened twin (input window [-1.5, 2.5], step 4 pixel codes) and its integer models
    agree on unclipped noisy images as the plain ones do on clean images."""
    twin = widen_input(quantize(trained(arch), "w8a8", calib), -1.5, 2.5)
    x = all_digits(digits)
    noisy = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    report = contract(twin, to_integer(twin), noisy)
    assert all(d.max_abs <= 1 and d.mismatch_rate <= CODE_MISMATCH_TOLERANCE
               for d in report.codes.values()), report.codes
    assert report.prediction_agreement >= 0.999
    assert prediction_agreement(twin, to_integer(twin, "onnx", threads=1), noisy) >= 0.995


def test_widened_input_codes_cover_the_window_and_clip_outside_it(trained, calib):
    plain = quantize(trained("small-cnn"), "w8a8", calib)
    wide = widen_input(plain, -1.5, 2.5)
    q = next(m for m in wide.modules() if isinstance(m, QuantInput))
    assert q.step == 4 and torch.equal(q.code_zero_point, q.code_zero_point.round())
    op = to_integer(wide).program((1, 8, 8)).input_op
    low, high = -int(op.offset), 255 * 4 - int(op.offset)  # pixel codes of input codes 0, 255
    assert low <= round(-1.5 * 255) + 2 and high >= round(2.5 * 255) - 2
    pixels = torch.arange(-800, 1200).view(1, 1, 1, -1)
    u = input_codes(op, pixels)
    inside = (pixels >= low - 2) & (pixels < high + 2)
    assert ((u * 4 - op.offset - pixels).abs()[inside] <= 2).all()  # within half a step
    assert torch.equal(u[pixels < low - 2], torch.zeros_like(u[pixels < low - 2]))
    assert (u[pixels >= high + 2] == 255).all()  # clipped outside the window
    assert torch.equal(op.pixel_zero_point, q.zero_point.reshape(-1).long())
    # the default window is the plain pixel grid: the same program as before widening
    same = to_integer(widen_input(plain, 0, 1))(calib[:64])
    assert torch.equal(same, to_integer(plain)(calib[:64]))
    with pytest.raises(ConfigError, match="must contain"):
        widen_input(plain, 0.1, 2)
    assert plain.get_submodule(next(n for n, m in plain.named_modules()
                                    if isinstance(m, QuantInput))).step == 1  # a copy
