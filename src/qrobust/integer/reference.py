"""The reference integer executor: runs a lowered :class:`Program` with integer tensors only.

Convolutions and matrix products of integer tensors run as float32 (or float64) BLAS/oneDNN
products, which is **exact**, not approximate: every partial sum of ``sum_k x_k w_k`` is an
integer of magnitude at most ``max|x| * max_o sum_k |w_ok|``, and where that bound is <= 2^24
(float32) or 2^53 (float64) every such integer and every sum of them is represented exactly,
whatever order the kernel adds in (:func:`exact_dtype` checks the bound per call; resnet20's
layers stay below 2^24). Unlike int8 kernels this does not depend on the CPU (no int16
saturation, :mod:`qrobust.integer.int8`). Reduced-precision float32 modes (bf16/tf32 that a
user may switch on) and NNPACK's Winograd/FFT convolutions are excluded. Requantization is the
fixed-point scheme of :mod:`qrobust.integer.program`, in int64. The only float operation on
values is the final ``logits = acc * s`` (the accumulator is the integer output code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError
from qrobust.integer.base import IntegerModel
from qrobust.integer.program import (
    ConvOp,
    FlattenOp,
    InputOp,
    LinearOp,
    MaxPoolOp,
    OutputOp,
    Program,
    ReluOp,
    RequantOp,
    SumPoolOp,
    input_codes,
    lower,
)
from qrobust.quant.modules import QuantInput

CHUNK = 32  # images per chunk: small tensors are reused by the allocator (2x faster than 256)
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
    return int(t.abs().max()) if t.numel() else 0


def _row_abs_sum(w: torch.Tensor) -> int:
    """max over output channels (axis 0) of sum |w|: with max|x| it bounds every partial sum."""
    return int(w.abs().flatten(1).sum(1).max()) if w.numel() else 0


def float_conv2d(x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int],
                 padding: tuple[int, int], row_abs_sum: int | None = None) -> torch.Tensor:
    """Exact integer convolution with zero padding, as a float tensor: x (N, C, H, W) and w
    (O, C, kh, kw) hold integers; the result (N, O, Ho, Wo) holds the exact integer sums."""
    bound = _abs_max(x) * (_row_abs_sum(w) if row_abs_sum is None else row_abs_sum)
    dtype = exact_dtype(bound)
    with torch.backends.nnpack.flags(enabled=False):  # Winograd / FFT would round
        return F.conv2d(x.to(dtype), w.to(dtype), stride=stride, padding=padding)


def float_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product (M, K) @ (K, N) as a float tensor (a, b hold integers)."""
    dtype = exact_dtype(_abs_max(a) * _row_abs_sum(b.t()))
    return a.to(dtype) @ b.to(dtype)


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product (M, K) @ (K, N) -> int64."""
    return float_matmul(a, b).long()


def int_conv2d(x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int],
               padding: tuple[int, int]) -> torch.Tensor:
    """Exact integer convolution with zero padding -> int64 (N, O, Ho, Wo)."""
    return float_conv2d(x, w, stride, padding).long()


def _channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


def requantize(values: list[torch.Tensor], op: RequantOp) -> torch.Tensor:
    """Fixed-point requantization of a sum of integer terms (see program.py):
    ``clamp(((sum_t (v_t - z_t) m_t + 2^(S-1)) >> S) + z_out, lo, hi)``, or the sign of the sum.

    Computed in float64 as ``t = sum_t (v_t - z_t) (m_t 2^-S)`` (each ``m_t 2^-S`` is exact;
    the products and the sum round by at most ``2^-51 (E + 1)``, E = sum_t max|v_t - z_t|
    max_c m_t 2^-S). Wherever ``t + 1/2`` (for the sign: ``t``) lies within ``2^-48 (E + 1)``
    of a rounding boundary, that element is recomputed in int64: the result is the exact
    fixed-point one. ``values``: same-shape tensors holding integers. Returns float32 codes
    (float64 for a range beyond 2^24)."""
    shift = torch.pow(2.0, -op.shift.double())
    t, bound = None, 1.0
    for v, term in zip(values, op.terms, strict=True):
        scale = term.multiplier.double() * shift
        centred = v - term.zero_point if term.zero_point else v  # exact: small integers
        part = centred * _channel(scale, v.ndim)  # a new float64 tensor: values stay intact
        bound += max(float(v.max()) - term.zero_point, term.zero_point - float(v.min()), 0.0) * float(scale.max())
        t = part if t is None else t.add_(part)
    assert t is not None
    err = 2.0**-48 * bound
    if op.sign:
        out, near = torch.where(t >= 0, 1.0, -1.0), t.abs() <= err
    else:
        out = torch.floor(t.add_(0.5))
        near = t.sub_(out).sub_(0.5).abs_() >= 0.5 - err  # within err of an integer boundary
    if bool(near.any()):
        out[near] = _requantize_exact(values, op, near.nonzero(as_tuple=True)).double()
    if not op.sign:
        out = out.add_(op.zero_point).clamp_(op.lo, op.hi)
    small = op.sign or max(abs(op.lo), abs(op.hi)) <= EXACT_INTEGERS[torch.float32]
    return out.float() if small else out


def _requantize_exact(values: list[torch.Tensor], op: RequantOp, where: tuple) -> torch.Tensor:
    """int64 fixed-point requantization (before zero point and clamp) at indices ``where``."""
    channel = where[1]
    total = sum((v[where].long() - term.zero_point) * term.multiplier[channel]
                for v, term in zip(values, op.terms, strict=True))
    if op.sign:
        return torch.where(total >= 0, 1, -1)
    s = op.shift[channel]
    return torch.bitwise_right_shift(total + torch.bitwise_left_shift(torch.ones_like(s), s - 1), s)


class _Executor:
    """Runs one program: codes are float32 tensors and accumulators float64 tensors, both
    holding exact integers; float weights and their bounds are prepared once."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.weights = {op.out: (op.weight.float(), op.weight.double(), _row_abs_sum(op.weight))
                        for op in program.ops if isinstance(op, (ConvOp, LinearOp))}
        self.kernels = {InputOp: self.input, ConvOp: self.conv, LinearOp: self.linear,
                        RequantOp: self.requant, MaxPoolOp: self.maxpool, SumPoolOp: self.sumpool,
                        FlattenOp: self.flatten, ReluOp: self.relu}

    def weight(self, op: ConvOp | LinearOp, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        w32, w64, row_sum = self.weights[op.out]
        dtype = exact_dtype(_abs_max(x) * row_sum)
        return (w32 if dtype == torch.float32 else w64), dtype

    def run(self, codes: torch.Tensor, keep: bool = False) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {}
        for op in self.program.ops:
            if isinstance(op, OutputOp):
                scale = op.scale if op.scale.ndim == 0 else op.scale.view(1, -1)
                env["logits"] = ((env[op.inp].double() - op.zero_point) * scale).float()
            else:
                env[op.out] = self.kernels[type(op)](op, env, codes)
        if not keep:
            return {"logits": env["logits"]}
        return {k: v if k == "logits" else v.long() for k, v in env.items()}

    def input(self, op: InputOp, env, pixels):
        return (input_codes(op, pixels) - _channel(op.zero_point, pixels.ndim)).float()

    def conv(self, op: ConvOp, env, pixels):
        x = env[op.inp] - op.in_zero_point if op.in_zero_point else env[op.inp]
        w, dtype = self.weight(op, x)
        with torch.backends.nnpack.flags(enabled=False):  # Winograd / FFT would round
            acc = F.conv2d(x.to(dtype), w, stride=op.stride, padding=op.padding)
        return acc.double().add_(_channel(op.bias.double(), acc.ndim))

    def linear(self, op: LinearOp, env, pixels):
        x = env[op.inp] - op.in_zero_point if op.in_zero_point else env[op.inp]
        w, dtype = self.weight(op, x)
        return (x.to(dtype) @ w.t()).double().add_(op.bias.double().view(1, -1))

    def requant(self, op: RequantOp, env, pixels):
        return requantize([env[t.slot] for t in op.terms], op)

    def maxpool(self, op: MaxPoolOp, env, pixels):
        return F.max_pool2d(env[op.inp], op.kernel, op.stride)

    def sumpool(self, op: SumPoolOp, env, pixels):
        return (env[op.inp].double() - op.zero_point).sum(dim=(2, 3), keepdim=True)

    def flatten(self, op: FlattenOp, env, pixels):
        return env[op.inp].flatten(1)

    def relu(self, op: ReluOp, env, pixels):
        return torch.clamp(env[op.inp], min=op.zero_point)


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
