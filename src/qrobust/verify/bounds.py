"""Sound bounds on every integer tensor of a :class:`~qrobust.integer.program.Program` over
boxes of pixel codes: exact-integer interval propagation for every op, and a linear relaxation
(DeepPoly / CROWN back-substitution; Singh et al. POPL 2019, Zhang et al. arXiv 1811.00866)
for straight-line MLP programs, as used for quantized networks by Henzinger et al.
(arXiv 2012.08185).

**Intervals** (:func:`interval_bounds`): int64 tensors (N, ...) per slot, exact. Linear and
(grouped) convolution layers split the centred weights into positive and negative parts;
a lookup table takes the table's minimum and maximum over the code range; every other op
(requantization with multipliers m_t >= 0, round half up and a clamp; max, sum and window-sum
pooling, flatten, concatenation, ReLU, clamp) is non-decreasing in each input, so it is
applied exactly, with the executor's formula, to the lower and the upper bound. Intervals are
exact on a single point.

**Linear relaxation** (:func:`linear_bounds`), for programs that are one chain
InputOp -> [FlattenOp] -> (LinearOp -> [RequantOp (one term, not sign)] -> [ReluOp])* ->
OutputOp. The requantization of an accumulator a,
``x = clamp(floor((a - z_t) m / 2^S + 1/2) + z, lo, hi)``, lies between the envelopes
``f_l(a) = clamp(r (a - z_t) - 1/2 + 2^-S, L, H) + z`` and ``f_u(a) = clamp(r (a - z_t) + 1/2,
L, H) + z`` (r = m 2^-S, L = lo - z, H = hi - z), since floor(w) >= w - 1 + 2^-S when 2^S w
is an integer. Each neuron gets an upper line (the chord of f_u from the box's lower end to
the upper kink, or a constant) and a lower line (the chord of f_l from the lower kink to the
box's upper end, or a constant), picked by their value at the box's midpoint (CROWN's
adaptive choice); ReLU is the same with r = 1 and no rounding.

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
    GroupConvOp,
    InputOp,
    LinearOp,
    LookupOp,
    MaxPoolOp,
    OutputOp,
    Program,
    ReluOp,
    RequantOp,
    SumPoolOp,
    WindowSumPoolOp,
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
TINY = 2.0**-1000
Interval = tuple[torch.Tensor, torch.Tensor]


# ---- exact integer intervals ---------------------------------------------------------------
def requantize_exact(values: list[torch.Tensor], op: RequantOp) -> torch.Tensor:
    """The executor's own fixed-point requantization (exact) as int64: ``values`` are
    same-shape integer tensors (N, C, ...), one per term; returns codes of that shape."""
    return requantize(values, op).long()


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


def _lookup_interval(op: LookupOp, lo: torch.Tensor, hi: torch.Tensor) -> Interval:
    """Exact hull of ``table[clamp(q - qmin)]`` over q in [lo, hi]: range minima and maxima of
    the table (the table need not be monotone)."""
    t = op.table.long()
    n = len(t)
    below = torch.arange(n).view(-1, 1) > torch.arange(n).view(1, -1)  # b < a
    big = torch.iinfo(torch.long).max
    rmin = torch.where(below, big, t.view(1, -1)).cummin(1).values  # min t[a..b]
    rmax = torch.where(below, -big, t.view(1, -1)).cummax(1).values
    a, b = (lo - op.qmin).clamp(0, n - 1), (hi - op.qmin).clamp(0, n - 1)
    return rmin[a, b], rmax[a, b]


def interval_bounds(program: Program, lo: torch.Tensor, hi: torch.Tensor) -> dict[str, Interval]:
    """Exact integer intervals of every slot of ``program`` over the boxes ``[lo, hi]`` of
    pixel codes (N, C, H, W) int64: slot -> (lower, upper), int64 (N, ...), the values the
    reference executor holds in that slot (``execute(..., keep=True)``)."""
    env: dict[str, Interval] = {}
    for op in program.ops:
        if isinstance(op, InputOp):
            zp = channel_view(op.zero_point, lo.ndim)
            env[op.out] = (input_codes(op, lo) - zp, input_codes(op, hi) - zp)
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
        elif isinstance(op, RequantOp):
            if op.rounding != "fixed":
                raise ConfigError(f"the verifier supports the 'fixed' requantization rounding "
                                  f"only; '{op.out}' rounds as {op.rounding!r}")
            env[op.out] = (requantize_exact([env[t.slot][0] for t in op.terms], op),
                           requantize_exact([env[t.slot][1] for t in op.terms], op))
        elif isinstance(op, MaxPoolOp):
            env[op.out] = tuple(F.max_pool2d(v.double(), op.kernel, op.stride).long()
                                for v in env[op.inp])  # type: ignore[assignment]
        elif isinstance(op, SumPoolOp):
            env[op.out] = tuple((v - op.zero_point).sum(dim=(2, 3), keepdim=True)
                                for v in env[op.inp])  # type: ignore[assignment]
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
    """The :class:`Step` of a one-term requantization (per-channel multipliers and shifts)."""
    n = op.shift.numel()
    full = lambda v: torch.full((n,), float(v), dtype=torch.float64)  # noqa: E731
    shift = op.shift.double()
    rate = op.terms[0].multiplier.double() * torch.pow(2.0, -shift)
    return Step(op.out, op, rate, full(op.terms[0].zero_point), -0.5 + torch.pow(2.0, -shift),
                full(0.5), full(op.lo - op.zero_point), full(op.hi - op.zero_point),
                full(op.zero_point))


def step_of_relu(op: ReluOp, n: int) -> Step:
    """The :class:`Step` of a ReLU on codes, max(x, zero point), over n neurons."""
    zeros = torch.zeros(n, dtype=torch.float64)
    return Step(op.out, op, torch.ones(n, dtype=torch.float64), zeros, zeros, zeros,
                torch.full((n,), float(op.zero_point), dtype=torch.float64),
                torch.full((n,), math.inf, dtype=torch.float64), zeros)


def mlp_chain(program: Program) -> Chain | None:
    """The program as a :class:`Chain`, or None when it is not a straight-line MLP (then only
    intervals apply)."""
    ops = program.ops
    if not ops or not isinstance(ops[0], InputOp) or not isinstance(ops[-1], OutputOp):
        return None
    prev, width, stages = ops[0].out, math.prod(program.input_shape), []
    for op in ops[1:-1]:
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
        elif (isinstance(op, RequantOp) and not op.sign and len(op.terms) == 1
              and op.rounding == "fixed"):
            if op.terms[0].multiplier.max() >= 2**52 or op.terms[0].multiplier.min() < 0:
                return None
            stages.append(step_of_requant(op))
        elif isinstance(op, ReluOp):
            stages.append(step_of_relu(op, width))
        else:
            return None
        prev = op.out
    if ops[-1].inp != prev or not stages or not isinstance(stages[0], Affine):
        return None
    return Chain(ops[0].out, tuple(stages))


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
