"""The reference executor's requantization against fixed point computed in Python integers,
and the static slot bounds it relies on against the values real programs produce."""

import pytest
import torch

from qrobust.integer import to_integer
from qrobust.integer.base import pixel_codes
from qrobust.integer.program import RequantOp, Term
from qrobust.integer.reference import execute, requantize, slot_bounds
from qrobust.quant import quantize


def python_fixed_point(values: list[list[int]], op: RequantOp, channels: list[int]) -> list[int]:
    """``clamp(((sum_t (v_t - z_t) m_t + 2^(S-1)) >> S) + z, lo, hi)`` (or the sum's sign) per
    element, in unbounded Python integers."""
    out = []
    for i, c in enumerate(channels):
        total = sum((vs[i] - t.zero_point) * int(t.multiplier[c]) for vs, t in zip(values, op.terms, strict=True))
        if op.sign:
            out.append(1 if total >= 0 else -1)
            continue
        s = int(op.shift[c])
        out.append(min(max(((total + (1 << (s - 1))) >> s) + op.zero_point, op.lo), op.hi))
    return out


def random_op(gen: torch.Generator, k: int, channels: int, sign: bool, bits: int,
              magnitude: int, reach: int) -> RequantOp:
    """Random multipliers in [2^30, 2^31) and shifts that take values of ``magnitude`` to
    ``2^reach`` times the output range (1/4: rounding, not the clamp, decides; 256: only sums
    that cancel land inside it)."""
    mult = [torch.randint(2**30, 2**31, (channels,), generator=gen) for _ in range(k)]
    top = mult[0].double() * magnitude / 2 ** (bits + reach)
    shift = torch.log2(top).round().long().clamp(1, 62)
    terms = tuple(Term(f"t{i}", int(torch.randint(-3, 4, (), generator=gen)), mult[i],
                       torch.zeros(channels, dtype=torch.float64)) for i in range(k))
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return RequantOp("out", terms, shift, int(torch.randint(-2, 3, (), generator=gen)), lo, hi, sign)


def values_near_boundaries(gen, op: RequantOp, shape, magnitude: int) -> list[torch.Tensor]:
    """Random integers of up to ``magnitude`` (plus the zero point), a third of each channel's
    replaced by the candidates (from 2^17 random ones) whose exact sum lies closest to a
    rounding boundary (a tie n + 1/2 inside the clamp; for the sign: 0), where float rounding
    can land on the wrong side. With two terms the second one cancels the first (the case of
    residual adds), which brings the sum far closer to a boundary than the products' error."""
    k, channels = len(op.terms), shape[1]
    centred = torch.randint(-magnitude, magnitude + 1, (k, *shape), generator=gen)
    pick = torch.rand(shape, generator=gen) < 1 / 3
    for c in range(channels):
        where = pick[:, c]
        pool = torch.randint(-magnitude, magnitude + 1, (k, 2**17), generator=gen)
        m = [int(term.multiplier[c]) for term in op.terms]
        if k == 2:  # the second term cancels the first to just off a boundary
            half = 0 if op.sign else 2 ** (int(op.shift[c]) - 1)
            n = torch.randint(-(2 ** (op.hi.bit_length() - 2)), 2 ** (op.hi.bit_length() - 2),
                              (2**17,), generator=gen)
            target = (2 * n + 1).double() * half
            pool[1] = torch.round((target - pool[0].double() * m[0]) / m[1]).long()
            pool[1] = pool[1].clamp(-magnitude, magnitude)
        total = sum(pool[t] * m[t] for t in range(k))
        if op.sign:
            distance = total.abs()
        else:
            s = int(op.shift[c])
            r = torch.remainder(total + 2 ** (s - 1), 2**s)
            distance = torch.minimum(r, 2**s - r)
            code = torch.div(total + 2 ** (s - 1), 2**s, rounding_mode="floor") + op.zero_point
            distance[(code < op.lo) | (code > op.hi)] = 2**62  # clamped: rounding cannot matter
        best = pool[:, distance.argsort()[: int(where.sum())]]
        for t in range(k):
            centred[t][:, c][where] = best[t]
    return [centred[t] + term.zero_point for t, term in enumerate(op.terms)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 300), (torch.float32, 2**22),
                                             (torch.float64, 2**29)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "matrix"])
@pytest.mark.parametrize("reach", [-2, 8])
def test_requantize_equals_python_fixed_point(seed, k, sign, dtype, magnitude, layout, reach):
    gen = torch.Generator().manual_seed(seed)
    shape = (7, 3) if layout == "matrix" else (2, 3, 9, 11)
    op = random_op(gen, k, shape[1], sign, 8 if seed % 2 else 16, magnitude, reach)
    ints = values_near_boundaries(gen, op, shape, magnitude)
    values = [v.to(dtype) for v in ints]
    if layout == "channels_last":
        values = [v.contiguous(memory_format=torch.channels_last) for v in values]
    bounds = [None] * k if seed % 3 else [int(v.abs().max()) for v in ints]  # measured or given
    got = requantize(values, op, bounds=bounds)
    assert got.shape == shape
    channels = torch.arange(shape[1]).view(1, -1, *([1] * (len(shape) - 2))).expand(shape)
    want = python_fixed_point([v.reshape(-1).tolist() for v in ints], op,
                              channels.reshape(-1).tolist())
    assert got.reshape(-1).long().tolist() == want
    assert all(torch.equal(v, i.to(dtype)) for v, i in zip(values, ints, strict=True))  # inputs untouched


def test_requantize_refuses_an_int64_overflow():
    op = RequantOp("out", (Term("t", 0, torch.tensor([2**31 - 1]), torch.zeros(1)),),
                   torch.tensor([31]), 0, -(2**62), 2**62)
    with pytest.raises(OverflowError, match="int64"):
        requantize([torch.tensor([[2.0**40 + 2**30]], dtype=torch.float64)], op)


@pytest.mark.parametrize("arch,recipe", [("small-cnn", "w8a8"), ("resnet20", "w4a8,asym"),
                                         ("mlp", "w3a3,relu6"), ("small-cnn", "w1a1")])
def test_slot_bounds_hold_on_real_programs(trained, digits, calib, arch, recipe):
    """Every slot's |value| stays within the bound the executor chooses float types from,
    on real images and on adversarially extreme pixel codes (all 0, all 255, a checkerboard)."""
    integer = to_integer(quantize(trained(arch), recipe, calib))
    x = digits.test.tensors()[0][:64]
    program = integer.program(tuple(x.shape[1:]))
    codes = pixel_codes(x)
    board = (torch.arange(64).view(8, 8) + torch.arange(64).view(8, 8).t()) % 2 * 255
    extremes = torch.stack([torch.zeros_like(codes[0]), torch.full_like(codes[0], 255),
                            board.expand_as(codes[0]).to(codes.dtype)])
    bounds = slot_bounds(program)
    assert any(b is not None for b in bounds.values())
    for batch in (codes, extremes):
        for name, value in execute(program, batch, keep=True).items():
            if bounds.get(name) is not None:
                assert int(value.abs().max()) <= bounds[name], name


@pytest.mark.parametrize("recipe", ["w8a8", "w2a2", "w4a8,asym", "w1a1"])
def test_pooling_before_requantization_changes_no_logit(trained, digits, calib, recipe):
    """The logits-only path (max pools moved before the requantizations they read, dead slots
    freed) gives exactly the logits of the program run op by op."""
    integer = to_integer(quantize(trained("small-cnn"), recipe, calib))
    x = digits.test.tensors()[0]
    codes = pixel_codes(x)
    executor = integer.executor(tuple(x.shape[1:]))
    moved = [op for op in executor.fast_ops if op not in executor.program.ops]
    assert len(moved) == 4  # two pools, each with its requantization
    assert torch.equal(executor.run(codes)["logits"], executor.run(codes, keep=True)["logits"])
    assert torch.equal(integer.forward_pixels(codes), execute(integer.program(x.shape[1:]), codes,
                                                              keep=True)["logits"])
