"""Sound bounds on every integer tensor of a :class:`~qrobust.integer.program.Program` over
boxes of pixel codes: exact-integer interval propagation for every op, and a linear relaxation
(DeepPoly / CROWN back-substitution; Singh et al. POPL 2019, Zhang et al. arXiv 1811.00866)
for straight-line MLP programs, as used for quantized networks by Henzinger et al.
(arXiv 2012.08185).

**Intervals** (:func:`interval_bounds`): int64 tensors (N, ...) per slot, exact. Linear and
(grouped) convolution layers split the centred weights into positive and negative parts;
a lookup table (and an imported file's input table) takes the table's minimum and maximum
over the code range; a product of two code tensors takes the extremes of its four corners;
every other op (requantization with multipliers m_t >= 0 in any of its roundings and a clamp,
ONNX Runtime's float average pool; max, sum and window-sum pooling, flatten, concatenation,
ReLU, clamp) is non-decreasing in each input, so it is applied exactly, with the executor's
own code, to the lower and the upper bound. Intervals are exact on a single point.

**Linear relaxation** (:func:`linear_bounds`), for programs that are one chain
InputOp -> [LookupOp]* -> [FlattenOp] -> (LinearOp -> [RequantOp (one term, not sign)] ->
[ReluOp])* -> OutputOp. The (fixed-point) requantization of an accumulator a,
``x = clamp(floor((a - z_t) m / 2^S + 1/2) + z, lo, hi)``, lies between the envelopes
``f_l(a) = clamp(r (a - z_t) - 1/2 + 2^-S, L, H) + z`` and ``f_u(a) = clamp(r (a - z_t) + 1/2,
L, H) + z`` (r = m 2^-S, L = lo - z, H = hi - z), since floor(w) >= w - 1 + 2^-S when 2^S w
is an integer. Each neuron gets an upper line (the chord of f_u from the box's lower end to
the upper kink, or a constant) and a lower line (the chord of f_l from the lower kink to the
box's upper end, or a constant), picked by their value at the box's midpoint (CROWN's
adaptive choice); ReLU is the same with r = 1 and no rounding. Imported files' roundings
("float32", "tflite", "ruy") get the same envelopes with a wider rounding band, bounded in
:func:`step_of_requant`.

**How the floats are made sound.** Back-substitution runs in float64; every weight, bias,
bound and multiplier is an integer or a dyadic number held exactly. Soundness never depends
on the floats being exact:
- a line's *slope* is any float; its *offset* is computed afterwards as the max (upper line)
  or min (lower line) of ``f(p) - k p`` over the integer points p where ``f - line`` can be
  extreme on the box: its two ends and the integer neighbours of the envelope's two kinks
  (f - line is piecewise linear with those kinks, and only integers matter). Each value is
  rounded outward by ``4 u |x| + 2^-1000`` per operation (u = 2^-53), which bounds one
  rounding error (u |x|) with room to spare, underflow included;
- a product ``lam @ W`` of n-term sums is off by at most ``gamma_n |lam| @ |W|`` (Higham,
  Accuracy and Stability, Thm 3.5, any summation order, FMA included); that error times the
  largest |x| of the box is subtracted from the constant term, with the factor
  ``2 (n + 2) u`` in place of ``gamma_n`` covering the rounding of the error term itself;
- dot products with the constant terms and the final concretization over the input box
  (:func:`dot_lower`) subtract the same kind of bound, and every addition to the constant
  is rounded down.
The result is a float lower bound on an integer quantity, so its ceiling is one too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qrobust.errors import ConfigError
from qrobust.integer.program import (
    ClampOp,
    ConcatOp,
    ConvOp,
    FlattenOp,
    FloatAvgPoolOp,
    GroupConvOp,
    InputOp,
    LinearOp,
    LookupOp,
    MaxPoolOp,
    MulOp,
    OutputOp,
    Program,
    ReluOp,
    RequantOp,
    SumPoolOp,
    WindowSumPoolOp,
    float_avg_pool,
    input_codes,
)
from qrobust.integer.reference import (
    channel_view,
    exact_dtype,
    int_conv2d,
    int_matmul,
    requantize,
)

U = 2.0**-53
# the ops interval_bounds has a rule for (verify.search.check_supported refuses the others)
BOUNDED_OPS = (InputOp, ConvOp, GroupConvOp, LinearOp, WindowSumPoolOp, ConcatOp, LookupOp,
               ClampOp, RequantOp, MaxPoolOp, SumPoolOp, MulOp, FloatAvgPoolOp, FlattenOp,
               ReluOp, OutputOp)
TINY = 2.0**-1000
Interval = tuple[torch.Tensor, torch.Tensor]


# ---- exact integer intervals ---------------------------------------------------------------
def requantize_exact(values: list[torch.Tensor], op: RequantOp) -> torch.Tensor:
    """The executor's own requantization (exact, any rounding) as int64: ``values`` are
    same-shape integer tensors (N, C, ...), one per term; returns codes of that shape.

    Every rounding is non-decreasing in each term whose multiplier is >= 0, so interval ends
    map to interval ends (tests/verify/test_imported.py checks it against the executor):
    "fixed" is one floor of an increasing sum; "float32" (ONNX Runtime) is a float32
    conversion, a product by a float32 multiplier and float32 sums, each rounded to nearest
    (a monotone map), then round half to even; "tflite" / "ruy" are an integer sum, a left
    shift and two roundings to nearest (gemmlowp's doubling high multiply, a rounding right
    shift), each monotone. Clamps are monotone too."""
    if op.rounding in ("tflite", "ruy"):  # int64 in the executor: an overflow would wrap
        widest = sum(_abs_max(v - t.zero_point) for v, t in zip(values, op.terms, strict=True))
        left = op.left_shift + max(0, 31 - int(op.shift.min()))
        if widest * 2**left * int(op.terms[0].multiplier.max()) >= 2**62:
            raise ConfigError(f"{op.out}: the bounds of its {op.rounding!r} requantization "
                              "reach beyond int64; the verifier cannot bound this program")
    return requantize(values, op).long()


def _abs_max(t: torch.Tensor) -> int:
    return int(t.abs().max()) if t.numel() else 0


def _affine_interval(op: ConvOp | GroupConvOp | LinearOp, lo: torch.Tensor, hi: torch.Tensor
                     ) -> Interval:
    lo, hi = lo - op.in_zero_point, hi - op.in_zero_point
    pos, neg = op.weight.clamp(min=0), op.weight.clamp(max=0)
    if isinstance(op, LinearOp):
        out_lo = int_matmul(lo, pos.t()) + int_matmul(hi, neg.t())
        out_hi = int_matmul(hi, pos.t()) + int_matmul(lo, neg.t())
        return out_lo + op.bias, out_hi + op.bias
    groups = op.groups if isinstance(op, GroupConvOp) else 1

    def conv(x, w):
        return int_conv2d(x, w, op.stride, op.padding, groups=groups)
    bias = channel_view(op.bias, 4)
    return conv(lo, pos) + conv(hi, neg) + bias, conv(hi, pos) + conv(lo, neg) + bias


def _window_sum(op: WindowSumPoolOp, v: torch.Tensor) -> torch.Tensor:
    x = v - op.zero_point
    reach = int(x.abs().max()) if x.numel() else 0
    x = x.to(exact_dtype(reach * op.kernel[0] * op.kernel[1]))
    return F.avg_pool2d(x, op.kernel, op.stride, op.padding, count_include_pad=True,
                        divisor_override=1).long()


def _range_hull(table: torch.Tensor, row: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                ) -> Interval:
    """Exact min and max of ``table[row, a..b]`` (table (K, n); row, a <= b index tensors of one
    shape) by a sparse table of minima and maxima over windows of 2^k: no monotonicity of the
    table is assumed, and long tables (window sums) stay small (n log n)."""
    mins, maxs = [table.long()], [table.long()]
    while 2 ** len(mins) <= table.shape[1]:
        h = 2 ** (len(mins) - 1)
        mins.append(torch.minimum(mins[-1][:, :-h], mins[-1][:, h:]))
        maxs.append(torch.maximum(maxs[-1][:, :-h], maxs[-1][:, h:]))
    pad = lambda t: F.pad(t, (0, table.shape[1] - t.shape[1]))  # noqa: E731  (never read)
    mins_t, maxs_t = torch.stack([pad(t) for t in mins]), torch.stack([pad(t) for t in maxs])
    length = b - a + 1
    k = torch.floor(torch.log2(length.double())).long()  # then made exact: 2^k <= length < 2^(k+1)
    k = k + (torch.bitwise_left_shift(torch.ones_like(k), k + 1) <= length).long()
    k = k - (torch.bitwise_left_shift(torch.ones_like(k), k) > length).long()
    other = b - torch.bitwise_left_shift(torch.ones_like(k), k) + 1
    return (torch.minimum(mins_t[k, row, a], mins_t[k, row, other]),
            torch.maximum(maxs_t[k, row, a], maxs_t[k, row, other]))


def _lookup_interval(op: LookupOp, lo: torch.Tensor, hi: torch.Tensor) -> Interval:
    """Exact hull of ``table[clamp(q - qmin)]`` over q in [lo, hi]."""
    n = len(op.table)
    a, b = (lo - op.qmin).clamp(0, n - 1), (hi - op.qmin).clamp(0, n - 1)
    return _range_hull(op.table.view(1, -1), torch.zeros_like(a), a, b)


def _input_interval(op: InputOp, lo: torch.Tensor, hi: torch.Tensor) -> Interval:
    """Centred input codes over pixel boxes (N, C, H, W). A table (an imported file's own input
    quantizer) gets its exact hull over each pixel's range; the formula of qrobust's own
    programs is non-decreasing in the pixel code, so its ends map to ends."""
    zp = channel_view(op.zero_point, lo.ndim)
    if op.table is None:
        return input_codes(op, lo) - zp, input_codes(op, hi) - zp
    channel = torch.arange(lo.shape[1]).view(1, -1, *([1] * (lo.ndim - 2))).expand_as(lo)
    low, high = _range_hull(op.table, channel, lo.clamp(0, 255), hi.clamp(0, 255))
    return low - zp, high - zp


def _mul_interval(op: MulOp, a: Interval, b: Interval) -> Interval:
    """Exact hull of the product of centred codes: a bilinear map is extreme at corners."""
    (a_lo, a_hi), (b_lo, b_hi) = ((lo - z, hi - z) for (lo, hi), z in
                                  zip((a, b), op.zero_points, strict=True))
    corners = torch.stack(torch.broadcast_tensors(a_lo * b_lo, a_lo * b_hi, a_hi * b_lo,
                                                  a_hi * b_hi))
    return corners.amin(0), corners.amax(0)


def _float_avg_pool_exact(op: FloatAvgPoolOp, v: torch.Tensor) -> torch.Tensor:
    """The executor's float average pool (exact) as int64. Non-decreasing in each code when
    both scales are > 0 (checked by verify.search.check_supported): float32 dequantization,
    float32 sums, divisions by positive numbers, each rounded to nearest, then round half to
    even and a clamp."""
    return torch.round(float_avg_pool(op, v)).clamp(op.lo, op.hi).long()


def interval_bounds(program: Program, lo: torch.Tensor, hi: torch.Tensor) -> dict[str, Interval]:
    """Exact integer intervals of every slot of ``program`` over the boxes ``[lo, hi]`` of
    pixel codes (N, C, H, W) int64: slot -> (lower, upper), int64 (N, ...), the values the
    reference executor holds in that slot (``execute(..., keep=True)``)."""
    env: dict[str, Interval] = {}
    for op in program.ops:
        if isinstance(op, InputOp):
            env[op.out] = _input_interval(op, lo, hi)
        elif isinstance(op, (ConvOp, GroupConvOp, LinearOp)):
            env[op.out] = _affine_interval(op, *env[op.inp])
        elif isinstance(op, WindowSumPoolOp):
            env[op.out] = tuple(_window_sum(op, v) for v in env[op.inp])  # type: ignore[assignment]
        elif isinstance(op, ConcatOp):
            env[op.out] = (torch.cat([env[i][0] for i in op.inps], 1),
                           torch.cat([env[i][1] for i in op.inps], 1))
        elif isinstance(op, LookupOp):
            env[op.out] = _lookup_interval(op, *env[op.inp])
        elif isinstance(op, ClampOp):
            env[op.out] = tuple(v.clamp(op.lo, op.hi) for v in env[op.inp])  # type: ignore[assignment]
        elif isinstance(op, RequantOp):  # non-decreasing in each term (multipliers >= 0)
            env[op.out] = (requantize_exact([env[t.slot][0] for t in op.terms], op),
                           requantize_exact([env[t.slot][1] for t in op.terms], op))
        elif isinstance(op, MaxPoolOp):
            env[op.out] = tuple(F.max_pool2d(v.double(), op.kernel, op.stride).long()
                                for v in env[op.inp])  # type: ignore[assignment]
        elif isinstance(op, SumPoolOp):
            env[op.out] = tuple((v - op.zero_point).sum(dim=(2, 3), keepdim=True)
                                for v in env[op.inp])  # type: ignore[assignment]
        elif isinstance(op, MulOp):
            env[op.out] = _mul_interval(op, env[op.inps[0]], env[op.inps[1]])
        elif isinstance(op, FloatAvgPoolOp):
            env[op.out] = tuple(_float_avg_pool_exact(op, v) for v in env[op.inp])  # type: ignore[assignment]
        elif isinstance(op, FlattenOp):
            env[op.out] = tuple(v.flatten(1) for v in env[op.inp])  # type: ignore[assignment]
        elif isinstance(op, ReluOp):
            env[op.out] = tuple(v.clamp(min=op.zero_point) for v in env[op.inp])  # type: ignore[assignment]
        elif isinstance(op, OutputOp):
            env["output"] = env[op.inp]
        else:
            raise ConfigError(f"the verifier has no interval rule for {type(op).__name__}")
    return env


def output_op(program: Program) -> OutputOp:
    return next(op for op in program.ops if isinstance(op, OutputOp))


def logits_of(program: Program, values: torch.Tensor) -> torch.Tensor:
    """The executor's float32 logits ``((v - z) * s).float()`` of output-slot integers v (N, K):
    the same IEEE operations as :mod:`qrobust.integer.reference`, non-decreasing in v (s > 0)."""
    op = output_op(program)
    scale = op.scale if op.scale.ndim == 0 else op.scale.view(1, -1)
    return ((values.double() - op.zero_point) * scale).float()


# ---- float64 arithmetic with outward rounding -----------------------------------------------
def up(x: torch.Tensor) -> torch.Tensor:
    return x + 4 * U * x.abs() + TINY


def down(x: torch.Tensor) -> torch.Tensor:
    return x - 4 * U * x.abs() - TINY


def dot_lower(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 lower bound on the exact ``sum_i a[..., r, i] x[..., i]``: a (N, R, n), x
    (N, n) -> (N, R)."""
    prods = a * x.unsqueeze(1)
    n = a.shape[-1]
    err = 2 * (n + 2) * U * prods.abs().sum(-1) + (n + 1) * TINY
    return down(prods.sum(-1) - err)


# ---- the linear relaxation of MLP chains ----------------------------------------------------
@dataclass(frozen=True)
class Affine:
    """x_out = W x_in + b over flat vectors: W (o, i), b (o,) float64 holding integers."""

    slot: str
    weight: torch.Tensor
    bias: torch.Tensor


@dataclass(frozen=True)
class Step:
    """x_out = clamp(r (x_in - z_in) + d, L, H) + z elementwise, d in [d_lo, d_hi]; all (n,)
    float64 (H may be +inf). ``op`` computes the exact value from integer bounds."""

    slot: str
    op: RequantOp | ReluOp
    rate: torch.Tensor
    z_in: torch.Tensor
    d_lo: torch.Tensor
    d_hi: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    z: torch.Tensor


@dataclass(frozen=True)
class Chain:
    """A program as input slot -> stages (Affine / Step) -> output slot."""

    input_slot: str
    stages: tuple[Affine | Step, ...]


def step_of_requant(op: RequantOp) -> Step:
    """The :class:`Step` of a one-term requantization (per-channel multipliers and shifts):
    the exact real value ``r (a - z_t)`` (a rate r exact in float64) and the most the rounded
    result ``x`` (before the clamp) can differ from it, ``x - r (a - z_t)`` in [d_lo, d_hi]:

    - "fixed": floor(w + 1/2), w with 2^S w an integer: d in [-1/2 + 2^-S, 1/2];
    - "tflite" / "ruy": a rounding to nearest of ``X = a' m 2^-31`` (the doubling high
      multiply, a' the shifted centred sum), then, when S > 31, a rounding to nearest of its
      quotient by 2^k, k = S - 31: ``|h - X| <= 1/2`` and ``|x - h 2^-k| <= 1/2``, so
      ``|x - r a'| <= 1/2 + 2^-(k+1)`` (r = m 2^(left_shift - S));
    - "float32": ``x = rne(fl(fl(a') M))``, M the float32 multiplier (r = M exactly):
      ``|fl(fl(a') M) - a' M| <= 2.01 u |a' M| + 2^-149`` (u = 2^-24, two roundings,
      subnormals included). Only ``|a' M| <= B = max(|L|, |H|) + 2`` matters: beyond it x
      rounds past the clamp on the same side as ``a' M +- 1/2``, so the envelopes clamp to the
      same end. So d in [-1/2 - e, 1/2 + e] with e = 2^-22 (B + 1) > 2.01 u B + 2^-149."""
    n = op.shift.numel()
    full = lambda v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
    shift = op.shift.double()
    term = op.terms[0]
    low, high = op.lo - op.zero_point, op.hi - op.zero_point
    if op.rounding == "fixed":
        rate = term.multiplier.double() * torch.pow(2.0, -shift)
        d_lo, d_hi = -0.5 + torch.pow(2.0, -shift), full(0.5)
    elif op.rounding == "float32":
        rate = term.real_multiplier.float().double().expand(n)  # the executor's float32 M
        err = full(2.0**-22 * (max(abs(low), abs(high)) + 3))
        d_lo, d_hi = -0.5 - err, 0.5 + err
    else:  # "tflite", "ruy"
        rate = term.multiplier.double() * torch.pow(2.0, op.left_shift - shift)
        err = torch.where(shift > 31, torch.pow(2.0, 30 - shift), 0.0)
        d_lo, d_hi = -0.5 - err, 0.5 + err
    return Step(op.out, op, rate, full(term.zero_point), d_lo, d_hi, full(low), full(high),
                full(op.zero_point))


def step_of_relu(op: ReluOp, n: int) -> Step:
    """The :class:`Step` of a ReLU on codes, max(x, zero point), over n neurons."""
    zeros = torch.zeros(n, dtype=torch.float64)
    return Step(op.out, op, torch.ones(n, dtype=torch.float64), zeros, zeros, zeros,
                torch.full((n,), float(op.zero_point), dtype=torch.float64),
                torch.full((n,), math.inf, dtype=torch.float64), zeros)


def mlp_chain(program: Program) -> Chain | None:
    """The program as a :class:`Chain`, or None when it is not a straight-line MLP (then only
    intervals apply). Lookup tables right after the input (a TFLite file's own QUANTIZE) are
    elementwise, so the chain starts at their output: its box is the tables' exact hulls."""
    ops = program.ops
    if not ops or not isinstance(ops[0], InputOp) or not isinstance(ops[-1], OutputOp):
        return None
    start = 1
    while (start < len(ops) - 1 and isinstance(ops[start], LookupOp)
           and ops[start].inp == ops[start - 1].out):
        start += 1
    first = ops[start - 1].out
    prev, width, stages = first, math.prod(program.input_shape), []
    for op in ops[start:-1]:
        reads = ([t.slot for t in op.terms] if isinstance(op, RequantOp) else
                 [getattr(op, "inp", None)])
        if reads != [prev]:
            return None
        if isinstance(op, FlattenOp):
            prev = op.out
            continue
        if isinstance(op, LinearOp):
            if op.weight.shape[1] != width or op.weight.abs().max() >= 2**52:
                return None
            w = op.weight.double()
            bias = op.bias - op.weight.sum(1) * op.in_zero_point
            if bias.abs().max() >= 2**52:
                return None
            stages.append(Affine(op.out, w, bias.double()))
            width = op.weight.shape[0]
        elif isinstance(op, RequantOp) and not op.sign and len(op.terms) == 1:
            term = op.terms[0]
            if term.multiplier.max() >= 2**52 or term.multiplier.min() < 0 or (
                    op.rounding == "float32" and not bool((term.real_multiplier >= 0).all())):
                return None
            stages.append(step_of_requant(op))
        elif isinstance(op, ReluOp):
            stages.append(step_of_relu(op, width))
        else:
            return None
        prev = op.out
    if ops[-1].inp != prev or not stages or not isinstance(stages[0], Affine):
        return None
    return Chain(first, tuple(stages))


def _envelope(st: Step, p: torch.Tensor, upper: bool) -> torch.Tensor:
    """An outward-rounded value of f_u (upper) or f_l at integer points p (N, n, P) float64."""
    view = lambda t: t.view(1, -1, 1)  # noqa: E731
    rounded = up if upper else down
    t = rounded(view(st.rate) * (p - view(st.z_in)))  # p - z_in: exact small integers
    t = rounded(t + view(st.d_hi if upper else st.d_lo))
    t = torch.minimum(torch.maximum(t, view(st.low)), view(st.high))
    return rounded(t + view(st.z))


def _kinks(st: Step, d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> list[torch.Tensor]:
    """Approximate positions (N, n) of the two kinks of clamp(r (a - z_in) + d, L, H)."""
    out = []
    for edge in (st.low, st.high):
        with torch.no_grad():
            k = torch.where(st.rate > 0, (edge - d) / st.rate.clamp(min=TINY), -math.inf)
        k = torch.nan_to_num(k, nan=-math.inf) + st.z_in
        out.append(torch.minimum(torch.maximum(k, lo - 2), hi + 2))
    return out


def _candidates(st: Step, d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Integer points (N, n, P) where envelope - line is extreme on [lo, hi] (any slope): both
    ends and the integer neighbours of both kinks (floor - 1 .. floor + 2: float error in a
    kink's position is far below 1)."""
    pts = [lo, hi]
    for k in _kinks(st, d, lo, hi):
        base = torch.floor(k)
        pts += [base + j for j in (-1, 0, 1, 2)]
    p = torch.stack(pts, -1)
    return torch.minimum(torch.maximum(p, lo.unsqueeze(-1)), hi.unsqueeze(-1))


def _offset(st: Step, p: torch.Tensor, slope: torch.Tensor, upper: bool) -> torch.Tensor:
    """The tightest sound offset b (N, n) of the line ``slope * a + b`` above (upper) or below
    the envelope at all integer points of the box (p: candidates from :func:`_candidates`)."""
    f = _envelope(st, p, upper)
    kp = slope.unsqueeze(-1) * p
    if upper:
        return up(f - down(kp)).amax(-1)
    return down(f - up(kp)).amin(-1)


def relax(st: Step, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sound lines ``k_l a + b_l <= x <= k_u a + b_u`` of a :class:`Step` over integer input
    boxes [lo, hi] (N, n) float64: returns (k_l, b_l, k_u, b_u), each (N, n) float64."""
    mid = (lo + hi) / 2
    zero = torch.zeros_like(lo)

    def value(a, d):  # float envelope for the heuristic slope choice only
        return torch.clamp(st.rate * (a - st.z_in) + d, st.low, st.high) + st.z

    # upper: chord of f_u from lo to its upper kink (or hi), or a constant
    p_u = _candidates(st, st.d_hi, lo, hi)
    end = torch.minimum(hi, _kinks(st, st.d_hi, lo, hi)[1])
    chord_u = torch.where(end > lo, (value(end, st.d_hi) - value(lo, st.d_hi))
                          / (end - lo).clamp(min=1e-300), zero).clamp(min=0)
    b_chord_u, b_flat_u = _offset(st, p_u, chord_u, True), _offset(st, p_u, zero, True)
    use_chord = chord_u * mid + b_chord_u < b_flat_u
    k_u = torch.where(use_chord, chord_u, zero)
    b_u = torch.where(use_chord, b_chord_u, b_flat_u)
    # lower: chord of f_l from its lower kink (or lo) to hi, or a constant
    p_l = _candidates(st, st.d_lo, lo, hi)
    start = torch.maximum(lo, _kinks(st, st.d_lo, lo, hi)[0])
    chord_l = torch.where(hi > start, (value(hi, st.d_lo) - value(start, st.d_lo))
                          / (hi - start).clamp(min=1e-300), zero).clamp(min=0)
    b_chord_l, b_flat_l = _offset(st, p_l, chord_l, False), _offset(st, p_l, zero, False)
    use_chord = chord_l * mid + b_chord_l > b_flat_l
    k_l = torch.where(use_chord, chord_l, zero)
    b_l = torch.where(use_chord, b_chord_l, b_flat_l)
    return k_l, b_l, k_u, b_u


def backsubstitute(chain: Chain, bounds: list[Interval], lines: dict[int, tuple], k: int,
                   lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sound lower bound of ``lam . x_k`` (x_k: output of stage k-1 of the chain; x_0 the
    input) over the boxes: lam (N, R, n_k) float64 -> (lower bound (N, R) float64, the input
    coefficients (N, R, n_0)). ``bounds[j]``: float64 (lo, hi) (N, n_j) of x_j; ``lines[j]``:
    the relaxation of stage j-1 when it is a :class:`Step`."""
    const = torch.zeros(lam.shape[:2], dtype=torch.float64)
    for j in range(k, 0, -1):
        st = chain.stages[j - 1]
        lo, hi = bounds[j - 1]
        reach = torch.maximum(lo.abs(), hi.abs()).unsqueeze(1)  # (N, 1, n_{j-1})
        if isinstance(st, Affine):
            new = lam @ st.weight
            n = st.weight.shape[0]
            err = 2 * (n + 2) * U * ((lam.abs() @ st.weight.abs()) * reach).sum(-1)
            part = dot_lower(lam, st.bias.expand(lam.shape[0], -1)) - up(err)
        else:
            k_l, b_l, k_u, b_u = lines[j]
            pos = lam >= 0
            new = torch.where(pos, lam * k_l.unsqueeze(1), lam * k_u.unsqueeze(1))
            err = 4 * U * (new.abs() * reach).sum(-1)
            part = (dot_lower(torch.where(pos, lam, 0.0), b_l)
                    + dot_lower(torch.where(pos, 0.0, lam), b_u))
            part = down(part) - up(err)
        const = down(const + down(part))
        lam = new
    lo, hi = bounds[0]
    low = dot_lower(lam.clamp(min=0), lo) + dot_lower(lam.clamp(max=0), hi)
    return down(down(low) + const), lam


def _step_exact(st: Step, lo: torch.Tensor, hi: torch.Tensor) -> Interval:
    if isinstance(st.op, RequantOp):
        return requantize_exact([lo], st.op), requantize_exact([hi], st.op)
    return lo.clamp(min=st.op.zero_point), hi.clamp(min=st.op.zero_point)


def _affine_exact(st: Affine, lo: torch.Tensor, hi: torch.Tensor) -> Interval:
    w = st.weight.long()
    pos, neg = w.clamp(min=0), w.clamp(max=0)
    b = st.bias.long()
    return (int_matmul(lo, pos.t()) + int_matmul(hi, neg.t()) + b,
            int_matmul(hi, pos.t()) + int_matmul(lo, neg.t()) + b)


@dataclass(frozen=True)
class LinearBounds:
    """Per box: integer bounds (N, n_j) of every chain value (intervals tightened by
    back-substitution), and for the objective rows C the lower bounds (N, R) float64 of
    ``C x_out`` and their input coefficients (N, R, n_0)."""

    values: list[Interval]
    lower: torch.Tensor
    coeffs: torch.Tensor


def linear_bounds(chain: Chain, input_lo: torch.Tensor, input_hi: torch.Tensor,
                  objective: torch.Tensor) -> LinearBounds:
    """DeepPoly / CROWN bounds of an MLP chain over integer boxes of its input slot's values
    ``[input_lo, input_hi]`` (N, n_0) int64 (the centred input codes, flattened) for the
    objective rows ``objective`` (R, n_out) float64 on the output slot."""
    vals: list[Interval] = [(input_lo, input_hi)]
    floats: list[Interval] = [(input_lo.double(), input_hi.double())]
    lines: dict[int, tuple] = {}
    for j, st in enumerate(chain.stages, start=1):
        lo, hi = vals[-1]
        if isinstance(st, Affine):
            out_lo, out_hi = _affine_exact(st, lo, hi)
            if any(isinstance(s, Step) for s in chain.stages[: j - 1]):
                n = st.weight.shape[0]
                eye = torch.eye(n, dtype=torch.float64)
                rows = torch.cat([eye, -eye]).expand(lo.shape[0], -1, -1)
                low, _ = backsubstitute(chain, floats, lines, j, rows)
                low = torch.where(torch.isfinite(low), low, -math.inf).clamp(-2.0**62, 2.0**62)
                out_lo = torch.maximum(out_lo, torch.ceil(low[:, :n]).long())
                out_hi = torch.minimum(out_hi, torch.floor(-low[:, n:]).long())
        else:
            out_lo, out_hi = _step_exact(st, lo, hi)
            lines[j] = relax(st, floats[-1][0], floats[-1][1])
        if bool((out_lo > out_hi).any()):
            raise AssertionError("empty bounds: an unsound relaxation")  # never: a bug guard
        vals.append((out_lo, out_hi))
        floats.append((out_lo.double(), out_hi.double()))
    rows = objective.expand(input_lo.shape[0], -1, -1)
    low, coeffs = backsubstitute(chain, floats, lines, len(chain.stages), rows)
    return LinearBounds(vals, low, coeffs)
