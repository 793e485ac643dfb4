"""The reference integer executor: runs a lowered :class:`Program` with integer tensors only.

Convolutions and matrix products of integer tensors run as float32 (or float64) BLAS/oneDNN
products, which is **exact**, not approximate: every partial sum of ``sum_k x_k w_k`` is an
integer of magnitude at most ``max|x| * max_o sum_k |w_ok|``, and where that bound is <= 2^24
(float32) or 2^53 (float64) every such integer and every sum of them is represented exactly,
whatever order the kernel adds in (:func:`exact_dtype` checks the bound per call; resnet20's
layers stay below 2^24). Unlike int8 kernels this does not depend on the CPU (no int16
saturation, :mod:`qrobust.integer.int8`). Reduced-precision float32 modes (bf16/tf32 that a
user may switch on) and NNPACK's Winograd/FFT convolutions are excluded. Requantization gives
the fixed-point scheme of :mod:`qrobust.integer.program` exactly: computed in float with a
proven error bound, and in int64 for the few elements within that bound of a rounding boundary
(:func:`requantize`). Only the final ``logits = acc * s`` is a float result (the accumulator is
the integer output code). For logits alone, max pools run before the requantization they read
(it is monotone) and dead tensors are freed as soon as they are (memory reused in cache):
``benchmarks/results/reference_speed.json``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError
from qrobust.integer.base import IntegerModel
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
    lower,
)
from qrobust.quant.modules import QuantInput

CHUNK = 64  # images per chunk: tensors freed in one op are reused, still cached, by the next
EXACT_INTEGERS = {torch.float32: 2**24, torch.float64: 2**53}


def _ieee_float32() -> bool:
    """float32 products are plain IEEE: no bf16 / tf32 shortcut switched on in torch."""
    modes = [getattr(getattr(torch.backends.mkldnn, part, None), "fp32_precision", "none")
             for part in ("conv", "matmul")]
    return (torch.get_float32_matmul_precision() == "highest"
            and all(mode in ("none", "ieee") for mode in modes))


def exact_dtype(bound: int) -> torch.dtype:
    """The float type in which a product of integer tensors is exact when every partial sum
    is at most ``bound`` in magnitude."""
    if bound <= EXACT_INTEGERS[torch.float32] and _ieee_float32():
        return torch.float32
    if bound <= EXACT_INTEGERS[torch.float64]:
        return torch.float64
    raise ConfigError(f"integer product too wide for exact float arithmetic (bound {bound})")


def _abs_max(t: torch.Tensor) -> int:
    if not t.numel():
        return 0
    lo, hi = torch.aminmax(t)
    return max(-int(lo), int(hi))


def _row_abs_sum(w: torch.Tensor) -> int:
    """max over output channels (axis 0) of sum |w|: with max|x| it bounds every partial sum."""
    return int(w.abs().flatten(1).sum(1).max()) if w.numel() else 0


def float_conv2d(x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int],
                 padding: tuple[int, int], row_abs_sum: int | None = None,
                 groups: int = 1) -> torch.Tensor:
    """Exact integer convolution with zero padding, as a float tensor: x (N, C, H, W) and w
    (O, C / groups, kh, kw) hold integers; the result (N, O, Ho, Wo) holds the exact sums."""
    bound = _abs_max(x) * (_row_abs_sum(w) if row_abs_sum is None else row_abs_sum)
    dtype = exact_dtype(bound)
    with torch.backends.nnpack.flags(enabled=False):  # Winograd / FFT would round
        return F.conv2d(x.to(dtype), w.to(dtype), stride=stride, padding=padding, groups=groups)


def float_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product (M, K) @ (K, N) as a float tensor (a, b hold integers)."""
    dtype = exact_dtype(_abs_max(a) * _row_abs_sum(b.t()))
    return a.to(dtype) @ b.to(dtype)


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product (M, K) @ (K, N) -> int64."""
    return float_matmul(a, b).long()


def int_conv2d(x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int],
               padding: tuple[int, int], groups: int = 1) -> torch.Tensor:
    """Exact integer convolution with zero padding -> int64 (N, O, Ho, Wo)."""
    return float_conv2d(x, w, stride, padding, groups=groups).long()


def channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector (C,) viewed to broadcast over (N, C, ...) of ``ndim`` dims."""
    return t.view(1, -1, *([1] * (ndim - 2)))


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def requant_scales(op: RequantOp) -> list[torch.Tensor]:
    """Each term's ``m_t 2^-S`` per channel, exact in float64."""
    shift = torch.pow(2.0, -op.shift.double())
    return [term.multiplier.double() * shift for term in op.terms]


def requantize(values: list[torch.Tensor], op: RequantOp,
               scales: list[torch.Tensor] | None = None,
               bounds: list[int | None] | None = None) -> torch.Tensor:
    """Fixed-point requantization of a sum of integer terms (see program.py):
    ``clamp(((sum_t (v_t - z_t) m_t + 2^(S-1)) >> S) + z_out, lo, hi)``, or the sign of the sum.

    Computed in floating point as ``p = sum_t (v_t - z_t) (m_t 2^-S)`` (float32 where the error
    bound below is small, else float64; unit roundoff u). ``p`` is within
    ``err = (k + 3) u (span + 1)`` of the exact sum ``t`` of k terms, where ``span`` bounds
    ``sum_t |v_t - z_t| m_t 2^-S`` (E). For one term the error is relative (<= 2.01 u |t|), so
    ``span`` may be ``R = max(hi - z, z - lo) + 3`` instead: any ``|p| > R`` is clamped to the
    same end as ``t``. Wherever ``p`` lies within ``2 err`` of a rounding boundary (for the sign:
    of 0), that element is recomputed in int64: the result is the exact fixed-point one.
    ``values``: same-shape tensors holding integers; ``bounds``: a known bound on each one's
    ``max |v_t|`` (None: measured). Returns float32 codes (float64 for a range beyond 2^24).
    The roundings of imported files follow their runtimes: "float32" (ONNX Runtime) in float32
    (:func:`requantize_float32`), "tflite" and "ruy" in int64 throughout."""
    if op.rounding == "float32":
        return requantize_float32(values, op)
    if op.rounding != "fixed":
        out = _requantize_integer(values, op)
        small = max(abs(op.lo), abs(op.hi)) <= EXACT_INTEGERS[torch.float32]
        return out.float() if small else out.double()
    scales = requant_scales(op) if scales is None else scales
    bounds = [None] * len(values) if bounds is None else bounds
    extent, magnitude = 1.0, 0.0  # E + 1; the largest |v_t| + |z_t|
    for v, term, scale, bound in zip(values, op.terms, scales, bounds, strict=True):
        b = _abs_max(v) if bound is None else bound
        extent += (b + abs(term.zero_point)) * float(scale.max())
        magnitude = max(magnitude, b + abs(term.zero_point))
    k = len(values)
    clamp_span = max(op.hi - op.zero_point, op.zero_point - op.lo) + 3.0
    span = extent if op.sign or k > 1 else min(extent, clamp_span)
    float32 = (all(v.dtype == torch.float32 for v in values)
               and magnitude <= EXACT_INTEGERS[torch.float32]
               and (k + 3) * UNIT_ROUNDOFF[torch.float32] * span <= 2.0**-12)
    dtype = torch.float32 if float32 else torch.float64
    err = (k + 3) * UNIT_ROUNDOFF[dtype] * span
    t = None
    for v, term, scale in zip(values, op.terms, scales, strict=True):
        v = v.to(dtype)
        centred = v - term.zero_point if term.zero_point else v  # exact: small integers
        scale = channel_view(scale.to(dtype), v.ndim)
        t = centred * scale if t is None else t.addcmul_(centred, scale)  # values stay intact
    assert t is not None
    if op.sign:
        out = torch.where(t >= 0, 1.0, -1.0).to(dtype)
        near = _at_least(t.abs_().neg_(), -2 * err)
    else:
        out = torch.round(t)  # = floor(t + 1/2) away from the boundaries checked next
        near = _at_least(t.sub_(out).abs_(), 0.5 - 2 * err)
    if near[0].numel():
        out[near] = _requantize_exact(values, op, near).to(dtype)
    if not op.sign:
        out = out.clamp_(op.lo - op.zero_point, op.hi - op.zero_point)
        out = out.add_(op.zero_point) if op.zero_point else out
    small = op.sign or max(abs(op.lo), abs(op.hi)) <= EXACT_INTEGERS[torch.float32]
    return out.float() if small else out.double()


def requantize_float32(values: list[torch.Tensor], op: RequantOp) -> torch.Tensor:
    """ONNX Runtime's float requantization (``rounding='float32'``): each term's centred value
    rounded to float32 (as ``float(acc)``), times its float32 multiplier, summed in float32 in
    term order; round half to even (torch.round), clamp, add the zero point. float32 codes."""
    t = None
    for v, term in zip(values, op.terms, strict=True):
        centred = (v.double() - term.zero_point).float()
        m = channel_view(term.real_multiplier.float(), v.ndim)
        t = centred * m if t is None else t + centred * m
    assert t is not None
    out = torch.round(t).clamp_(op.lo - op.zero_point, op.hi - op.zero_point)
    return out.add_(op.zero_point)


def _at_least(d: torch.Tensor, threshold: float) -> tuple[torch.Tensor, ...]:
    """Indices (one tensor per dim) of the few elements of ``d`` that are >= ``threshold``.

    Blocks of 256 elements (in memory order) whose maximum reaches it are found first, then the
    elements inside them: torch's comparisons and nonzero over millions of elements cost more
    than the arithmetic of the requantization itself."""
    if d.is_contiguous():
        order = list(range(d.ndim))
    elif d.ndim == 4 and d.is_contiguous(memory_format=torch.channels_last):
        order = [0, 2, 3, 1]
    else:
        d, order = d.contiguous(), list(range(d.ndim))
    flat = d.permute(order).reshape(-1)  # a view: memory order
    block = 256
    whole = flat.numel() - flat.numel() % block
    hits = (flat[:whole].view(-1, block).amax(1) >= threshold).nonzero().squeeze(1)
    candidates = torch.cat([(hits.unsqueeze(1) * block + torch.arange(block)).view(-1),
                            torch.arange(whole, flat.numel())])
    found = candidates[flat[candidates] >= threshold]
    coords = torch.unravel_index(found, tuple(d.shape[i] for i in order))
    return tuple(coords[order.index(dim)] for dim in range(d.ndim))


def _requantize_exact(values: list[torch.Tensor], op: RequantOp, where: tuple) -> torch.Tensor:
    """int64 fixed-point requantization (before zero point and clamp) at indices ``where``."""
    channel = where[1]
    centred = [v[where].long() - term.zero_point for v, term in zip(values, op.terms, strict=True)]
    reach = sum(_abs_max(c) * int(term.multiplier.max()) for c, term in zip(centred, op.terms, strict=True))
    if reach >= 2**62:  # the sum (and its rounding offset 2^(S-1) <= 2^61) must fit in int64
        raise OverflowError(f"{op.out}: fixed-point sum reaches {reach:.3g}, beyond int64")
    total = sum(c * term.multiplier[channel] for c, term in zip(centred, op.terms, strict=True))
    if op.sign:
        return torch.where(total >= 0, 1, -1)
    s = op.shift[channel]
    return torch.bitwise_right_shift(total + torch.bitwise_left_shift(torch.ones_like(s), s - 1), s)


def _rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp's SaturatingRoundingDoublingHighMul of int32 values held in int64: 2 a b / 2^32
    rounded to nearest, ties up (its nudge 1 - 2^30 for negative products, then C++'s division
    toward zero); no saturation case, as b > 0."""
    ab = a * b
    nudge = torch.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    return torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")  # C++ division truncates


def _rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """gemmlowp's RoundingDivideByPOT: x / 2^exponent rounded half away from zero."""
    mask = torch.bitwise_left_shift(torch.ones_like(exponent), exponent) - 1
    remainder = torch.bitwise_and(x, mask)
    threshold = torch.bitwise_right_shift(mask, 1) + (x < 0).long()
    return torch.bitwise_right_shift(x, exponent) + (remainder > threshold).long()


def _requantize_integer(values: list[torch.Tensor], op: RequantOp) -> torch.Tensor:
    """The "tflite" and "ruy" roundings of :class:`RequantOp`, exactly, in int64: the sum of the
    centred terms (one multiplier m for all), shifted left by ``left_shift`` and by TFLite's
    exponent ``31 - S`` where positive, its high product with m, then a rounding right shift by
    ``S - 31`` where positive."""
    if any(not torch.equal(t.multiplier, op.terms[0].multiplier) for t in op.terms):
        raise ConfigError(f"{op.out}: {op.rounding!r} rounding needs one multiplier for all terms")
    ndim = values[0].ndim
    x = sum(v.long() - term.zero_point for v, term in zip(values, op.terms, strict=True))
    m = channel_view(op.terms[0].multiplier, ndim)
    s = channel_view(op.shift, ndim)
    x = torch.bitwise_left_shift(x, (31 - s).clamp(min=0) + op.left_shift)
    right = (s - 31).clamp(min=0)
    if op.rounding == "tflite":
        r = _rounding_divide_by_pot(_rounding_doubling_high_mul(x, m), right)
    else:  # ruy (its sqrdmulh, then a rounding shift): both round ties up
        h = torch.bitwise_right_shift(x * m + (1 << 30), 31)
        half = torch.bitwise_right_shift(torch.bitwise_left_shift(torch.ones_like(right), right), 1)
        r = torch.bitwise_right_shift(h + half, right)
    return (r + op.zero_point).clamp_(op.lo, op.hi)


class _Executor:
    """Runs one program: codes and accumulators are float32 tensors (float64 where a bound
    needs it) holding exact integers; convolutions in channels-last layout (oneDNN's fast path
    for convolution and pooling). Weights, scales and a bound on every slot's magnitude (so the
    float type of each product is chosen once, without a pass over the data) are prepared here."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.weights = {op.out: (op.weight.float(), op.weight.double(), op.bias.float(),
                                 op.bias.double(), _row_abs_sum(op.weight), _abs_max(op.bias))
                        for op in program.ops if isinstance(op, (ConvOp, GroupConvOp, LinearOp))}
        self.fast_ops = _pool_before_requant(program.ops)  # for the logits alone
        self.scales = {op.out: requant_scales(op) for op in program.ops + self.fast_ops
                       if isinstance(op, RequantOp)}
        self.bounds = _bounds(program.ops + self.fast_ops)  # the pooled accumulators too
        self.dead = _last_uses(self.fast_ops)
        self.kernels = {InputOp: self.input, ConvOp: self.conv, GroupConvOp: self.conv,
                        LinearOp: self.linear, RequantOp: self.requant, MaxPoolOp: self.maxpool,
                        SumPoolOp: self.sumpool, WindowSumPoolOp: self.window_sum,
                        ConcatOp: self.concat, LookupOp: self.lookup, ClampOp: self.clamp,
                        MulOp: self.mul, FloatAvgPoolOp: self.float_avg_pool,
                        FlattenOp: self.flatten, ReluOp: self.relu}
        self.tables = {op.out: op.table.float() for op in program.ops if isinstance(op, LookupOp)}

    def weight(self, op: ConvOp | GroupConvOp | LinearOp, x: torch.Tensor):
        """(weight, bias, dtype): the float type in which ``x w + b`` is exact."""
        w32, w64, b32, b64, row_sum, bias_max = self.weights[op.out]
        bound = self.bounds[op.inp]
        x_max = _abs_max(x) if bound is None else bound + abs(op.in_zero_point)
        dtype = exact_dtype(x_max * row_sum + bias_max)
        return (w32, b32, dtype) if dtype == torch.float32 else (w64, b64, dtype)

    def run(self, codes: torch.Tensor, keep: bool = False) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {}
        ops, dead_after = (self.program.ops, [()] * len(self.program.ops)) if keep else (
            self.fast_ops, self.dead)
        for op, dead in zip(ops, dead_after, strict=True):
            if isinstance(op, OutputOp):
                scale = op.scale if op.scale.ndim == 0 else op.scale.view(1, -1)
                env["logits"] = ((env[op.inp].double() - op.zero_point) * scale).float()
            else:
                env[op.out] = self.kernels[type(op)](op, env, codes)
            for slot in dead:  # freed memory is reused while still in cache
                del env[slot]
        if not keep:
            return {"logits": env["logits"]}
        return {k: v if k == "logits" else v.long().contiguous() for k, v in env.items()}

    def input(self, op: InputOp, env, pixels):
        return (input_codes(op, pixels) - channel_view(op.zero_point, pixels.ndim)).float()

    def conv(self, op: ConvOp | GroupConvOp, env, pixels):
        x = env[op.inp] - op.in_zero_point if op.in_zero_point else env[op.inp]
        w, b, dtype = self.weight(op, x)
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        groups = op.groups if isinstance(op, GroupConvOp) else 1
        with torch.backends.nnpack.flags(enabled=False):  # Winograd / FFT would round
            return F.conv2d(x, w, b, stride=op.stride, padding=op.padding, groups=groups)

    def linear(self, op: LinearOp, env, pixels):
        x = env[op.inp] - op.in_zero_point if op.in_zero_point else env[op.inp]
        w, b, dtype = self.weight(op, x)
        return torch.addmm(b, x.to(dtype), w.t())

    def requant(self, op: RequantOp, env, pixels):
        return requantize([env[t.slot] for t in op.terms], op, self.scales[op.out],
                          [self.bounds[t.slot] for t in op.terms])

    def maxpool(self, op: MaxPoolOp, env, pixels):
        return F.max_pool2d(env[op.inp], op.kernel, op.stride)

    def sumpool(self, op: SumPoolOp, env, pixels):
        return (env[op.inp].double() - op.zero_point).sum(dim=(2, 3), keepdim=True)

    def window_sum(self, op: WindowSumPoolOp, env, pixels):
        """Exact window sums of centred codes: float32 while the bound allows, else float64."""
        bound = self.bounds[op.out]
        x = env[op.inp]
        if bound is None or bound > EXACT_INTEGERS[torch.float32]:
            x = x.double()
        x = x - op.zero_point if op.zero_point else x
        return F.avg_pool2d(x, op.kernel, op.stride, op.padding, count_include_pad=True,
                            divisor_override=1)

    def float_avg_pool(self, op: FloatAvgPoolOp, env, pixels):
        return torch.round(float_avg_pool(op, env[op.inp])).clamp_(op.lo, op.hi)

    def concat(self, op: ConcatOp, env, pixels):
        return torch.cat([env[slot] for slot in op.inps], dim=1)

    def lookup(self, op: LookupOp, env, pixels):
        index = (env[op.inp].long() - op.qmin).clamp_(0, len(op.table) - 1)
        return self.tables[op.out][index]

    def mul(self, op: MulOp, env, pixels):
        """Exact products of centred codes: float32 while the bound allows, else float64."""
        bound = self.bounds[op.out]
        wide = bound is None or bound > EXACT_INTEGERS[torch.float32]
        dtype = torch.float64 if wide else torch.float32
        a, b = (env[slot].to(dtype) - z if z else env[slot].to(dtype)
                for slot, z in zip(op.inps, op.zero_points, strict=True))
        return a * b

    def clamp(self, op: ClampOp, env, pixels):
        return torch.clamp(env[op.inp], op.lo, op.hi)

    def flatten(self, op: FlattenOp, env, pixels):
        return env[op.inp].flatten(1)

    def relu(self, op: ReluOp, env, pixels):
        return torch.clamp(env[op.inp], min=op.zero_point)


def _reads(op) -> list[str]:
    if isinstance(op, RequantOp):
        return [t.slot for t in op.terms]
    if isinstance(op, (ConcatOp, MulOp)):
        return list(op.inps)
    return [op.inp] if hasattr(op, "inp") else []


def _pool_before_requant(ops: tuple) -> tuple:
    """``ops`` with every max pool that alone reads a one-term requantization moved before it.

    Requantization is non-decreasing in its input within a channel (positive multipliers, round
    half up, clamp), so it commutes with a max over a window of that channel: pooling the
    accumulator first gives the same codes and requantizes a quarter of the elements."""
    readers: dict[str, list] = {}
    for op in ops:
        for slot in _reads(op):
            readers.setdefault(slot, []).append(op)
    position = {id(op): i for i, op in enumerate(ops)}
    out = list(ops)
    for i, op in enumerate(ops):
        after = readers.get(getattr(op, "out", None), [])
        if (isinstance(op, RequantOp) and len(op.terms) == 1 and not op.sign
                and op.rounding == "fixed"
                and len(after) == 1 and isinstance(after[0], MaxPoolOp)):
            pool = after[0]
            pooled = f"{pool.out}:accumulator"
            out[i] = replace(pool, out=pooled, inp=op.terms[0].slot)
            term = replace(op.terms[0], slot=pooled)
            out[position[id(pool)]] = replace(op, out=pool.out, terms=(term,))
    return tuple(out)


def _last_uses(ops: tuple) -> list[list[str]]:
    """For each op, the slots no later op reads."""
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for slot in _reads(op):
            last[slot] = i
    dead: list[list[str]] = [[] for _ in ops]
    for slot, i in last.items():
        dead[i].append(slot)
    return dead


def slot_bounds(program: Program) -> dict[str, int | None]:
    """A bound on ``max |v|`` of every slot the executor holds, from the program alone (None
    where it depends on the input size: the global sum pool)."""
    return _bounds(program.ops)


def _bounds(ops: tuple) -> dict[str, int | None]:
    bounds: dict[str, int | None] = {}
    for op in ops:
        if isinstance(op, InputOp) and op.table is not None:
            bounds[op.out] = _abs_max(op.table - op.zero_point.view(-1, 1))
        elif isinstance(op, InputOp):
            zp = op.zero_point.abs().max()
            bounds[op.out] = int(max(255 - op.zero_point.min(), zp))
        elif isinstance(op, (ConvOp, GroupConvOp, LinearOp)):
            inp = bounds[op.inp]
            bounds[op.out] = None if inp is None else (
                (inp + abs(op.in_zero_point)) * _row_abs_sum(op.weight) + _abs_max(op.bias))
        elif isinstance(op, RequantOp):
            bounds[op.out] = 1 if op.sign else max(abs(op.lo), abs(op.hi))
        elif isinstance(op, ReluOp):
            inp = bounds[op.inp]
            bounds[op.out] = None if inp is None else max(inp, abs(op.zero_point))
        elif isinstance(op, (MaxPoolOp, FlattenOp)):
            bounds[op.out] = bounds[op.inp]
        elif isinstance(op, SumPoolOp):
            bounds[op.out] = None
        elif isinstance(op, WindowSumPoolOp):
            inp = bounds[op.inp]
            bounds[op.out] = None if inp is None else (
                (inp + abs(op.zero_point)) * op.kernel[0] * op.kernel[1])
        elif isinstance(op, LookupOp):
            bounds[op.out] = _abs_max(op.table)
        elif isinstance(op, (ClampOp, FloatAvgPoolOp)):
            bounds[op.out] = max(abs(op.lo), abs(op.hi))
        elif isinstance(op, MulOp):
            a, b = (bounds[slot] for slot in op.inps)
            bounds[op.out] = None if a is None or b is None else (
                (a + abs(op.zero_points[0])) * (b + abs(op.zero_points[1])))
        elif isinstance(op, ConcatOp):
            parts = [bounds[slot] for slot in op.inps]
            bounds[op.out] = None if None in parts else max(parts)  # type: ignore[type-var]
    return bounds


def execute(program: Program, codes: torch.Tensor, keep: bool = False) -> dict[str, torch.Tensor]:
    """Run ``program`` on pixel codes (N, C, H, W); returns every slot as int64 (``keep``) or
    only the float32 logits."""
    return _Executor(program).run(codes, keep)


class ReferenceIntegerModel(IntegerModel):
    """Exact integer execution of a calibrated twin (any bit width <= 8).

    The program is lowered once per input shape (C, H, W) from the twin's current weights and
    scales; later changes to the twin are not seen (call ``to_integer`` again).
    """

    backend = "reference"

    def __init__(self, twin: nn.Module, input_shape: tuple[int, int, int] | None = None,
                 chunk: int = CHUNK) -> None:
        super().__init__(twin)
        self._twin = [twin]  # not a submodule: the integer model has no parameters
        self.widened = any(m.step > 1 for m in twin.modules() if isinstance(m, QuantInput))
        self.chunk = chunk
        self._programs: dict[tuple[int, ...], _Executor] = {}
        shape = input_shape or getattr(twin, "input_shape", None)
        if shape is not None:
            self.executor(tuple(shape))

    def executor(self, shape: tuple[int, ...]) -> _Executor:
        if shape not in self._programs:
            self._programs[shape] = _Executor(lower(self._twin[0], shape))  # type: ignore[arg-type]
        return self._programs[shape]

    def program(self, shape: tuple[int, ...]) -> Program:
        return self.executor(shape).program

    @torch.no_grad()
    def forward_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        run = self.executor(tuple(codes.shape[1:])).run
        outs = [run(codes[i:i + self.chunk])["logits"] for i in range(0, len(codes), self.chunk)]
        return torch.cat(outs) if outs else torch.empty(0)

    @torch.no_grad()
    def intermediate_codes(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every integer tensor of the program (slot name -> int64 codes) for pixel ``codes``."""
        run = self.executor(tuple(codes.shape[1:])).run
        parts = [run(codes[i:i + self.chunk], keep=True) for i in range(0, len(codes), self.chunk)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
