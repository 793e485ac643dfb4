"""The reference integer executor: runs a lowered :class:`Program` with integer tensors only.

Matrix products use ``torch._int_mm`` (int8 x int8 -> int32 accumulation) when both operands
fit in int8 after a constant offset (8-bit unsigned activations are offset by 128 and the
offset's contribution ``128 * sum_k w_k`` is added back exactly); otherwise (the first layer's
9-bit centred pixels, wider codes) an int64 matmul. Requantization is the fixed-point scheme
of :mod:`qrobust.integer.program`. The only float operation is the final
``logits = acc * s`` (the accumulator is the integer output code).
"""

from __future__ import annotations

from functools import singledispatch

import torch
import torch.nn.functional as F
from torch import nn

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

CHUNK = 64  # images per chunk (bounds the im2col buffer)


def _fits_int8_after_offset(lo: int, hi: int) -> bool:
    return hi - lo <= 255


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product (M, K) @ (K, N) -> int64, via int8 x int8 -> int32 when possible."""
    a_lo, a_hi = int(a.min()), int(a.max())
    b_lo, b_hi = int(b.min()), int(b.max())
    if _fits_int8_after_offset(a_lo, a_hi) and b_lo >= -128 and b_hi <= 127 and a.shape[0] > 0:
        offset = a_lo + 128
        a8 = (a - offset).to(torch.int8)
        out = torch._int_mm(a8.contiguous(), b.to(torch.int8).contiguous()).long()
        return out + offset * b.long().sum(0, keepdim=True)
    return a.long() @ b.long()


def int_conv2d(x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int],
               padding: tuple[int, int]) -> torch.Tensor:
    """Integer conv via im2col: x (N, C, H, W), w (O, C, kh, kw) -> (N, O, Ho, Wo) int64.

    Zero padding is exact. When x's range (with the padding zeros) spans at most 256 values,
    x is offset into int8 before im2col (8x less memory) and the offset's contribution
    ``offset * sum(w)`` is added back.
    """
    n = x.shape[0]
    o, _, kh, kw = w.shape
    ph, pw = padding
    lo, hi = min(int(x.min()), 0), max(int(x.max()), 0)
    fits = _fits_int8_after_offset(lo, hi)
    offset = lo + 128 if fits else 0
    xs = (x - offset).to(torch.int8) if fits else x
    xp = F.pad(xs, (pw, pw, ph, ph), value=-offset) if ph or pw else xs
    cols = xp.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])  # N, C, Ho, Wo, kh, kw
    ho, wo = cols.shape[2], cols.shape[3]
    cols = cols.permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, -1)
    wm = w.reshape(o, -1).t()
    out = int_matmul(cols, wm) + offset * wm.long().sum(0, keepdim=True)
    return out.view(n, ho, wo, o).permute(0, 3, 1, 2)


def _channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


def requantize(values: list[torch.Tensor], op: RequantOp) -> torch.Tensor:
    """Fixed-point requantization of a sum of integer terms (see program.py)."""
    total = None
    for v, term in zip(values, op.terms, strict=True):
        part = (v - term.zero_point) * _channel(term.multiplier, v.ndim)
        total = part if total is None else total + part
    assert total is not None
    if op.sign:
        return torch.where(total >= 0, 1, -1).long()
    shift = _channel(op.shift, total.ndim)
    rounded = torch.bitwise_right_shift(total + torch.bitwise_left_shift(torch.ones_like(shift), shift - 1), shift)
    return torch.clamp(rounded + op.zero_point, op.lo, op.hi)


@singledispatch
def run_op(op, env: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor | None:
    raise TypeError(f"no integer kernel for {type(op).__name__}")


@run_op.register
def _(op: InputOp, env, x):
    return input_codes(op, x) - _channel(op.zero_point, x.ndim)


@run_op.register
def _(op: ConvOp, env, x):
    acc = int_conv2d(env[op.inp] - op.in_zero_point, op.weight, op.stride, op.padding)
    return acc + _channel(op.bias, acc.ndim)


@run_op.register
def _(op: LinearOp, env, x):
    return int_matmul(env[op.inp] - op.in_zero_point, op.weight.t()) + op.bias.view(1, -1)


@run_op.register
def _(op: RequantOp, env, x):
    return requantize([env[t.slot] for t in op.terms], op)


@run_op.register
def _(op: MaxPoolOp, env, x):
    (kh, kw), (sh, sw) = op.kernel, op.stride
    return env[op.inp].unfold(2, kh, sh).unfold(3, kw, sw).amax(dim=(-2, -1))


@run_op.register
def _(op: SumPoolOp, env, x):
    return (env[op.inp] - op.zero_point).sum(dim=(2, 3), keepdim=True)


@run_op.register
def _(op: FlattenOp, env, x):
    return env[op.inp].flatten(1)


@run_op.register
def _(op: ReluOp, env, x):
    return torch.clamp(env[op.inp], min=op.zero_point)


def execute(program: Program, codes: torch.Tensor, keep: bool = False) -> dict[str, torch.Tensor]:
    """Run ``program`` on pixel codes (N, C, H, W); returns every slot (``keep``) or the output."""
    env: dict[str, torch.Tensor] = {}
    for op in program.ops:
        if isinstance(op, OutputOp):
            scale = op.scale if op.scale.ndim == 0 else op.scale.view(1, -1)
            env["logits"] = ((env[op.inp] - op.zero_point).double() * scale).float()
        else:
            env[op.out] = run_op(op, env, codes)
    return env if keep else {"logits": env["logits"]}


class ReferenceIntegerModel(IntegerModel):
    """Exact integer execution of a calibrated twin (any bit width <= 8).

    The program is lowered once per input shape (C, H, W) from the twin's current weights and
    scales; later changes to the twin are not seen (call ``to_integer`` again).
    """

    backend = "reference"

    def __init__(self, twin: nn.Module, input_shape: tuple[int, int, int] | None = None,
                 chunk: int = CHUNK) -> None:
        super().__init__()
        self._twin = [twin]  # not a submodule: the integer model has no parameters
        self.widened = any(m.step > 1 for m in twin.modules() if isinstance(m, QuantInput))
        self.chunk = chunk
        self._programs: dict[tuple[int, ...], Program] = {}
        shape = input_shape or getattr(twin, "input_shape", None)
        if shape is not None:
            self.program(tuple(shape))

    def program(self, shape: tuple[int, ...]) -> Program:
        if shape not in self._programs:
            self._programs[shape] = lower(self._twin[0], shape)  # type: ignore[arg-type]
        return self._programs[shape]

    @torch.no_grad()
    def forward_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        program = self.program(tuple(codes.shape[1:]))
        outs = [execute(program, codes[i:i + self.chunk])["logits"]
                for i in range(0, len(codes), self.chunk)]
        return torch.cat(outs) if outs else torch.empty(0)

    @torch.no_grad()
    def intermediate_codes(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every integer tensor of the program (slot name -> codes) for pixel ``codes``."""
        program = self.program(tuple(codes.shape[1:]))
        parts = [execute(program, codes[i:i + self.chunk], keep=True)
                 for i in range(0, len(codes), self.chunk)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
