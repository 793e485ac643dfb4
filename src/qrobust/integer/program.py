"""Lowering: a calibrated fake-quant twin -> a straight-line integer program.

Every tensor of the program is integer. A value is either *codes* ``q`` with a real value
``(q - z) * s`` (per-tensor s, integer z) or an *accumulator* ``acc`` (int32/int64) with a
per-channel real value ``acc * s_c``. Convolutions and linear layers take centred codes
``q - z`` and integer weights ``w - z_w`` and produce accumulators (int32 sums of int8 x int8
products, bias added as the int32 ``round(b / (s_w s_x))``). Requantization maps a sum of
terms to codes with fixed-point multipliers (gemmlowp / TFLite style):

    q_out = clamp(((sum_t (v_t - z_t) * m_t) + 2^(S-1)) >> S) + z_out, lo, hi)

with integers ``m_t = round(M_t 2^S)``, ``M_t = s_t / s_out`` (per channel) and the shift ``S``
chosen per channel so that the largest m lies in [2^30, 2^31). ReLU is the lower clamp
``lo = max(qmin, z_out)``; a clamp to real bounds [a, b] (ReLU6, Hardtanh, torch.clamp) is
``lo = max(qmin, z_out + round(a / s_out))``, ``hi = min(qmax, z_out + round(b / s_out))``
(rounding is monotone, so clamping before or after it gives the same codes); where that
range is narrower than the quantizer's own (and not ReLU's), a separate :class:`ClampOp`
follows the requantization, so that exporters that read only the quantizer's range refuse it
by name. The sign quantizer (1 bit, signed) outputs +1 where the sum is >= 0 and -1
elsewhere.

Beyond the zoo's ops: grouped / depthwise convolutions are :class:`GroupConvOp`; average
pooling over k x k windows is an integer window sum whose 1/k^2 goes into the multiplier
(:class:`WindowSumPoolOp`); a channel concatenation requantizes each input to the output's
scale and joins the codes (:class:`ConcatOp`); an elementwise function f of codes (hard-swish,
sigmoid, ...) is a table ``q_out[q] = clamp(round(f((q - z) s) / s_out) + z_out, qmin, qmax)``
over the input codes, computed with the twin's own float64 arithmetic (:class:`LookupOp`); an
elementwise product ``x * y`` is the accumulator ``(q_x - z_x)(q_y - z_y)`` with scale
``s_x s_y`` (:class:`MulOp`). See docs/quantization.md.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from qrobust.errors import ConfigError
from qrobust.quant.convert import LOOKUP, cat_inputs, is_mul
from qrobust.quant.functional import round_half_up
from qrobust.quant.modules import QuantAct, QuantConv2d, QuantInput, QuantLinear

MAX_BITS = 8
ADD_TARGETS = (operator.add, torch.add, operator.iadd)


# ---- value descriptors (lowering time only) -------------------------------------------------
@dataclass(frozen=True)
class Codes:
    slot: str
    scale: float
    zero_point: int
    qmin: int
    qmax: int


@dataclass(frozen=True)
class Acc:
    slot: str
    scale: torch.Tensor  # (C,) float64


@dataclass(frozen=True)
class Pending:
    """A sum of values, maybe clamped to real bounds [lo, hi] (ReLU: lo = 0), waiting for the
    quantizer that materialises it."""

    terms: tuple[Codes | Acc, ...]
    lo: float = -math.inf
    hi: float = math.inf

    @property
    def clamped(self) -> bool:
        return self.lo > -math.inf or self.hi < math.inf


@dataclass(frozen=True)
class Mapped:
    """An elementwise function of codes, waiting for the quantizer of its output."""

    codes: Codes
    fn: nn.Module


@dataclass(frozen=True)
class Joined:
    """Values concatenated along channels, waiting for the quantizer that gives them one scale;
    ``channels``: each part's channel count."""

    parts: tuple[Codes | Acc | Pending, ...]
    channels: tuple[int, ...]


# ---- ops ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputOp:
    """Pixel codes p (any integers, 1/255 grid) -> centred input codes u - zero_point, with
    ``u = clamp(floor((p + offset + step / 2) / step), 0, 255)`` (:func:`input_codes`).

    ``table`` (C, 256) int64, when given, replaces that formula: ``u = table[c, clamp(p, 0,
    255)]``. Imported files (:mod:`qrobust.integer.imports`) quantize a normalised float input
    with their own scale, zero point and rounding, which no step / offset expresses; the table
    holds the codes the file's runtime computes for each pixel code."""

    out: str
    zero_point: torch.Tensor  # (C,) int64: round(255 mean_c) when step = 1
    step: int  # pixel codes per input code: a power of two (QuantInput.widen), 1 by default
    offset: torch.Tensor  # (C,) int64, step * zero_point - round(255 mean_c); 0 when step = 1
    table: torch.Tensor | None = None  # (C, 256) int64: pixel code -> input code u

    @property
    def pixel_zero_point(self) -> torch.Tensor:
        """round(255 mean_c): the pixel code of the channel mean."""
        return self.zero_point * self.step - self.offset


def input_codes(op: InputOp, pixels: torch.Tensor) -> torch.Tensor:
    """The program's input codes u in [0, 255] for pixel codes (round half up when step > 1;
    the pixel codes themselves, clipped, when step = 1)."""
    p = pixels.long()
    if op.table is not None:  # per channel: u = table[c, p]
        p = torch.clamp(p, 0, 255)
        channels = torch.arange(p.shape[1], device=p.device).view(1, -1, *([1] * (p.ndim - 2)))
        return op.table[channels, p]
    if op.step > 1:
        offset = op.offset.view(1, -1, *([1] * (p.ndim - 2)))
        p = torch.div(p + offset + op.step // 2, op.step, rounding_mode="floor")
    return torch.clamp(p, 0, 255)


@dataclass(frozen=True)
class ConvOp:
    out: str
    inp: str
    in_zero_point: int
    weight: torch.Tensor  # (O, I, kh, kw) int64, centred (w - z_w)
    bias: torch.Tensor  # (O,) int64 in accumulator units
    stride: tuple[int, int]
    padding: tuple[int, int]
    acc_scale: torch.Tensor  # (O,) float64: real value of one accumulator unit


@dataclass(frozen=True)
class GroupConvOp:
    """A grouped convolution (``groups`` > 1; depthwise: groups = channels): centred codes
    (N, C, H, W) and centred integer weights (O, C / groups, kh, kw) -> accumulator (N, O, Ho,
    Wo); output channel o reads input channels of group o // (O / groups). Separate from
    :class:`ConvOp` so that backends without grouped kernels refuse it by name."""

    out: str
    inp: str
    in_zero_point: int
    weight: torch.Tensor  # (O, C / groups, kh, kw) int64, centred (w - z_w)
    bias: torch.Tensor  # (O,) int64 in accumulator units
    stride: tuple[int, int]
    padding: tuple[int, int]
    acc_scale: torch.Tensor  # (O,) float64
    groups: int


@dataclass(frozen=True)
class LinearOp:
    out: str
    inp: str
    in_zero_point: int
    weight: torch.Tensor  # (O, I) int64, centred
    bias: torch.Tensor  # (O,) int64
    acc_scale: torch.Tensor  # (O,) float64


@dataclass(frozen=True)
class Term:
    slot: str
    zero_point: int
    multiplier: torch.Tensor  # (C,) int64
    real_multiplier: torch.Tensor  # (C,) float64, for backends with float requantization


ROUNDINGS = ("fixed", "tflite", "ruy", "float32")


@dataclass(frozen=True)
class RequantOp:
    """Codes ``clamp(r + zero_point, lo, hi)`` of a sum of terms, where r rounds
    ``x m 2^-S`` to an integer by ``rounding`` (per channel m, S; see
    :func:`qrobust.integer.reference.requantize`):

    - ``"fixed"`` (lowered twins): ``r = (sum_t (v_t - z_t) m_t + 2^(S-1)) >> S``, round half up;
    - ``"tflite"`` (imported TFLite files): TFLite's MultiplyByQuantizedMultiplier, two roundings
      of ``x = sum_t (v_t - z_t)`` shifted left by ``left_shift`` (and by TFLite's exponent
      ``31 - S`` where positive): gemmlowp's SaturatingRoundingDoublingHighMul (ties up), then
      RoundingDivideByPOT by ``S - 31`` (ties away from zero); every term carries one multiplier;
    - ``"ruy"``: the same two steps as ruy's int8 kernels round them (TFLite's builtin CONV_2D and
      FULLY_CONNECTED): ``h = (x' m + 2^30) >> 31``, then ``(h + 2^(S-32)) >> (S - 31)``, both
      ties up;
    - ``"float32"`` (imported ONNX files): ONNX Runtime's float requantization
      ``clamp(rne(sum_t float32(v_t - z_t) * float32(M_t)) + z_out, lo, hi)`` with the float32
      multipliers ``real_multiplier`` (products and sum in float32, in term order; round half
      to even; docs/import.md).
    """

    out: str
    terms: tuple[Term, ...]
    shift: torch.Tensor  # (C,) int64
    zero_point: int
    lo: int
    hi: int
    sign: bool = False
    rounding: str = "fixed"
    left_shift: int = 0  # "tflite" / "ruy": ADD scales its inputs by 2^20 before the multiplier

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"unknown requantization rounding {self.rounding!r}; valid: "
                              f"{', '.join(ROUNDINGS)}")


@dataclass(frozen=True)
class MaxPoolOp:
    out: str
    inp: str
    kernel: tuple[int, int]
    stride: tuple[int, int]


@dataclass(frozen=True)
class SumPoolOp:
    """Global sum over H, W of centred codes -> accumulator (N, C, 1, 1)."""

    out: str
    inp: str
    zero_point: int


@dataclass(frozen=True)
class WindowSumPoolOp:
    """Sum of centred codes (N, C, H, W) over kh x kw windows, zero-padded (average pooling
    with ``count_include_pad``: the 1 / (kh kw) goes into the requantization) -> accumulator
    (N, C, Ho, Wo)."""

    out: str
    inp: str
    zero_point: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class FloatAvgPoolOp:
    """ONNX Runtime's QLinearAveragePool, reproduced step by step (its kernel averages floats,
    which no integer sum rounds like): codes dequantized in float32 ``scale * (q - zero_point)``,
    added over each kh x kw window in row-major order in float32 (padding adds nothing), divided
    by the count (kh kw with ``count_include_pad``, else the window's in-image positions), then
    ``clamp(rne(y / out_scale + out_zero_point), lo, hi)`` in float32 (:func:`float_avg_pool`).
    Only imported ONNX files use it."""

    out: str
    inp: str
    zero_point: int
    scale: float  # float32 values
    out_scale: float
    out_zero_point: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    count_include_pad: bool
    lo: int
    hi: int


def float_avg_pool(op: FloatAvgPoolOp, codes: torch.Tensor) -> torch.Tensor:
    """The float32 ``y / out_scale + out_zero_point`` of :class:`FloatAvgPoolOp` before its
    rounding, for codes (N, C, H, W) held in a float tensor (differentiable)."""
    n, c, h, w = codes.shape
    x = (codes.double() - op.zero_point).float() * torch.tensor(op.scale, dtype=torch.float32)
    cols = torch.nn.functional.unfold(x, op.kernel, padding=op.padding, stride=op.stride)
    cols = cols.view(n, c, op.kernel[0] * op.kernel[1], -1)
    total = cols[:, :, 0]
    for k in range(1, cols.shape[2]):  # ORT's order: one float32 addition at a time
        total = total + cols[:, :, k]
    if op.count_include_pad:
        count = torch.tensor(float(op.kernel[0] * op.kernel[1]))
    else:
        ones = torch.ones(1, 1, h, w, device=codes.device)
        count = torch.nn.functional.unfold(ones, op.kernel, padding=op.padding,
                                           stride=op.stride).sum(1)
    ho = (h + 2 * op.padding[0] - op.kernel[0]) // op.stride[0] + 1
    y = (total / count).view(n, c, ho, -1)
    return y / torch.tensor(op.out_scale, dtype=torch.float32) + float(op.out_zero_point)


@dataclass(frozen=True)
class ConcatOp:
    """Codes with one scale and zero point, joined along channels (axis 1), in order."""

    out: str
    inps: tuple[str, ...]


@dataclass(frozen=True)
class LookupOp:
    """Codes q in [qmin, qmin + len(table) - 1] -> ``table[q - qmin]`` (output codes)."""

    out: str
    inp: str
    qmin: int
    table: torch.Tensor  # (qmax - qmin + 1,) int64


@dataclass(frozen=True)
class MulOp:
    """Elementwise product of two centred code tensors (broadcasting, e.g. (N, C, H, W) by
    (N, C, 1, 1)) -> accumulator ``(a - z_a)(b - z_b)`` with scale ``s_a s_b``."""

    out: str
    inps: tuple[str, str]
    zero_points: tuple[int, int]


@dataclass(frozen=True)
class ClampOp:
    """Codes clamped to [lo, hi] (a ReLU6 / Hardtanh bound inside the quantizer's range)."""

    out: str
    inp: str
    lo: int
    hi: int


@dataclass(frozen=True)
class FlattenOp:
    out: str
    inp: str


@dataclass(frozen=True)
class ReluOp:
    out: str
    inp: str
    zero_point: int


@dataclass(frozen=True)
class OutputOp:
    inp: str
    scale: torch.Tensor  # (C,) float64 or scalar
    zero_point: int


Op = (InputOp | ConvOp | GroupConvOp | LinearOp | RequantOp | MaxPoolOp | SumPoolOp
      | WindowSumPoolOp | FloatAvgPoolOp | ConcatOp | LookupOp | MulOp | ClampOp | FlattenOp
      | ReluOp | OutputOp)


@dataclass(frozen=True)
class Program:
    ops: tuple[Op, ...]
    input_shape: tuple[int, int, int]
    codes: dict  # slot -> Codes descriptor (scales/zero points of materialised tensors)

    @property
    def input_op(self) -> InputOp:
        return next(op for op in self.ops if isinstance(op, InputOp))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def fixed_point(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel shift S and the integers round(M 2^S) for real multipliers M (T, C) > 0:
    the largest multiplier of each channel lands in [2^30, 2^31)."""
    top = real.max(0).values.clamp(min=1e-30)
    shift = (30 - torch.floor(torch.log2(top))).clamp(1, 62).long()
    mult = torch.round(real * torch.pow(2.0, shift.double())).long()
    return mult, shift


class _ShapeRecorder(fx.Interpreter):
    """Runs the twin once and records every node's output shape in ``node.meta['shape']``."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["shape"] = tuple(result.shape)
        return result


class _Lowering:
    def __init__(self, twin: fx.GraphModule, input_shape: tuple[int, int, int]) -> None:
        self.gm = twin
        self.ops: list[Op] = []
        self.env: dict[fx.Node, Codes | Acc | Pending | Joined | Mapped] = {}
        self.codes: dict[str, Codes] = {}
        with torch.no_grad():
            _ShapeRecorder(twin).run(torch.zeros(1, *input_shape))

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def value(self, node: fx.Node) -> Codes | Acc | Pending | Joined | Mapped:
        return self.env[node.args[0]]  # type: ignore[index]

    def codes_in(self, node: fx.Node) -> Codes:
        v = self.value(node)
        if not isinstance(v, Codes):
            raise ConfigError(f"'{node.target}' consumes an unquantized tensor; the twin has no "
                              "activation quantizer there (a weight-only recipe?)")
        return v

    def emit_codes(self, op: Op, c: Codes) -> Codes:
        self.ops.append(op)
        self.codes[c.slot] = c
        return c

    def lower(self) -> list[Op]:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                self.output(node)
                break
            self.env[node] = self.lower_node(node)
        return self.ops

    def lower_node(self, node: fx.Node) -> Codes | Acc | Pending | Joined | Mapped:
        name = node.name
        if node.op == "call_function" and node.target in ADD_TARGETS:
            a, b = (self.env[arg] for arg in node.args)
            if isinstance(a, (Joined, Mapped)) or isinstance(b, (Joined, Mapped)):
                raise ConfigError("an add of a concatenation or of an elementwise function needs "
                                  "a quantizer in between")
            terms = tuple(t for v in (a, b) for t in (v.terms if isinstance(v, Pending) else (v,)))
            if any(isinstance(v, Pending) and v.clamped for v in (a, b)):
                raise ConfigError("an add of a ReLU / clamp output needs a quantizer in between")
            return Pending(terms)
        cat = cat_inputs(node)
        if cat is not None:
            return self.concat(node, *cat)
        if is_mul(node):
            a, b = (self.env[arg] for arg in node.args)
            if not (isinstance(a, Codes) and isinstance(b, Codes)):
                raise ConfigError(f"'{node.name}' multiplies an unquantized tensor; both factors "
                                  "of an elementwise product must be quantized")
            self.ops.append(MulOp(name, (a.slot, b.slot), (a.zero_point, b.zero_point)))
            channels = node.meta["shape"][1]
            return Acc(name, torch.full((channels,), a.scale * b.scale, dtype=torch.float64))
        if node.op == "call_method" and node.target == "float":
            return self.value(node)
        if node.op != "call_module":
            raise ConfigError(f"cannot lower {node.op} '{node.target}' to integers; supported: "
                              "conv (grouped too), linear, ReLU / ReLU6 / Hardtanh / clamp, add, "
                              "torch.cat along channels, max-pool, average pool, flatten, "
                              "Hardswish / Hardsigmoid / Sigmoid / SiLU / Tanh, x * y")
        m = self.module(node)
        if isinstance(m, QuantInput):
            zp = m.code_zero_point.reshape(-1).round().long()
            offset = m.offset.reshape(-1).round().long()
            return self.emit_codes(InputOp(name, zp, m.step, offset),
                                   Codes(name, float(m.scale), 0, -255, 255))
        if isinstance(m, (QuantConv2d, QuantLinear)):
            return self.layer(node, m)
        if isinstance(m, QuantAct):
            return self.requant(node, m)
        if isinstance(m, LOOKUP):
            return Mapped(self.codes_in(node), m)
        if isinstance(m, (nn.ReLU, nn.Hardtanh)):  # nn.ReLU6 is a Hardtanh(0, 6)
            v = self.value(node)
            if isinstance(v, (Joined, Mapped)):
                raise ConfigError(f"'{node.target}' clamps a concatenation or an elementwise "
                                  "function before its quantizer")
            if isinstance(m, nn.ReLU) and isinstance(v, Codes):
                return self.emit_codes(ReluOp(name, v.slot, v.zero_point),
                                       Codes(name, v.scale, v.zero_point,
                                             max(v.qmin, v.zero_point), v.qmax))
            lo, hi = (0.0, math.inf) if isinstance(m, nn.ReLU) else (float(m.min_val),
                                                                     float(m.max_val))
            prev = v if isinstance(v, Pending) else Pending((v,))
            return Pending(prev.terms, max(prev.lo, lo), min(prev.hi, hi))
        if isinstance(m, (nn.Dropout, nn.Identity)):
            return self.value(node)
        if isinstance(m, nn.MaxPool2d):
            c = self.codes_in(node)
            if m.padding not in (0, (0, 0)) or m.dilation not in (1, (1, 1)) or m.ceil_mode:
                raise ConfigError("integer max-pool supports padding=0, dilation=1 only")
            stride = _pair(m.stride if m.stride is not None else m.kernel_size)
            return self.emit_codes(MaxPoolOp(name, c.slot, _pair(m.kernel_size), stride),
                                   Codes(name, c.scale, c.zero_point, c.qmin, c.qmax))
        if isinstance(m, nn.AdaptiveAvgPool2d):
            c = self.codes_in(node)
            channels, h, w = node.args[0].meta["shape"][1:]
            size = tuple(d if o is None else o for o, d in zip(_pair(m.output_size), (h, w),
                                                               strict=True))
            if size == (1, 1):
                self.ops.append(SumPoolOp(name, c.slot, c.zero_point))
                return Acc(name, torch.full((channels,), c.scale / (h * w), dtype=torch.float64))
            if h % size[0] or w % size[1]:
                raise ConfigError(f"integer adaptive average pooling needs the output size "
                                  f"{size} to divide the input size {(h, w)}")
            kernel = (h // size[0], w // size[1])
            return self.window_pool(node, c, kernel, kernel, (0, 0))
        if isinstance(m, nn.AvgPool2d):
            c = self.codes_in(node)
            kernel = _pair(m.kernel_size)
            padding = _pair(m.padding)
            if m.ceil_mode or m.divisor_override or (padding != (0, 0)
                                                     and not m.count_include_pad):
                raise ConfigError(f"integer average pooling '{node.target}' supports "
                                  "ceil_mode=False, no divisor_override and, with padding, "
                                  f"count_include_pad=True only, got {m}")
            return self.window_pool(node, c, kernel, _pair(m.stride or kernel), padding)
        if isinstance(m, nn.Flatten):
            c = self.codes_in(node)
            if m.start_dim != 1 or m.end_dim != -1:
                raise ConfigError("integer flatten supports start_dim=1, end_dim=-1 only")
            return self.emit_codes(FlattenOp(name, c.slot), Codes(name, c.scale, c.zero_point,
                                                                 c.qmin, c.qmax))
        raise ConfigError(f"cannot lower module '{node.target}' ({type(m).__name__}) to integers")

    def window_pool(self, node: fx.Node, c: Codes, kernel: tuple[int, int],
                    stride: tuple[int, int], padding: tuple[int, int]) -> Acc:
        """Average pooling: a window sum of centred codes, 1 / (kh kw) in the accumulator
        scale."""
        channels = node.args[0].meta["shape"][1]
        self.ops.append(WindowSumPoolOp(node.name, c.slot, c.zero_point, kernel, stride, padding))
        return Acc(node.name, torch.full((channels,), c.scale / (kernel[0] * kernel[1]),
                                         dtype=torch.float64))

    def concat(self, node: fx.Node, inputs: list[fx.Node], dim: int) -> Joined:
        ndim = len(node.meta["shape"])
        if dim not in (1, 1 - ndim):
            raise ConfigError(f"integer torch.cat supports concatenation along channels (dim=1) "
                              f"only, got dim={dim}")
        parts = tuple(self.env[a] for a in inputs)
        if any(isinstance(p, Joined) for p in parts):
            raise ConfigError("a concatenation of a concatenation needs a quantizer in between")
        return Joined(parts, tuple(a.meta["shape"][1] for a in inputs))  # type: ignore[arg-type]

    def layer(self, node: fx.Node, m: QuantConv2d | QuantLinear) -> Acc:
        c = self.codes_in(node)
        if m.wspec is None or m.wspec.bits > MAX_BITS:
            raise ConfigError(f"layer '{node.target}' has float or >{MAX_BITS}-bit weights; the "
                              f"integer executor needs weights of at most {MAX_BITS} bits")
        if m.bspec is not None:
            raise ConfigError("recipes with quantized biases (bias, gorsline) are float-activation "
                              "settings and have no integer model")
        codes, w_scale, w_zero = m.weight_codes()
        out_ch = codes.shape[0]
        w_scale = w_scale.double().expand(out_ch) if w_scale.ndim == 0 else w_scale.double()
        w_zero = w_zero.expand(out_ch) if w_zero.ndim == 0 else w_zero
        centred = (codes - w_zero.view(-1, *([1] * (codes.ndim - 1)))).round().long()
        acc_scale = w_scale * c.scale
        bias = (torch.zeros(out_ch, dtype=torch.long) if m.bias is None else
                round_half_up(m.bias.detach().double() / acc_scale).long())
        if isinstance(m, QuantConv2d) and m.groups > 1:
            self.ops.append(GroupConvOp(node.name, c.slot, c.zero_point, centred, bias,
                                        _pair(m.stride), _pair(m.padding), acc_scale, m.groups))
        elif isinstance(m, QuantConv2d):
            self.ops.append(ConvOp(node.name, c.slot, c.zero_point, centred, bias,
                                   _pair(m.stride), _pair(m.padding), acc_scale))
        else:
            self.ops.append(LinearOp(node.name, c.slot, c.zero_point, centred, bias, acc_scale))
        return Acc(node.name, acc_scale)

    def requant(self, node: fx.Node, q: QuantAct) -> Codes:
        spec = q.spec
        if spec.bits > MAX_BITS:
            raise ConfigError(f"activation quantizer '{node.target}' has {spec.bits} bits; the "
                              f"integer executor supports at most {MAX_BITS}")
        if not bool(q.calibrated):
            raise ConfigError("the twin is not calibrated; quantize it with calib=images first")
        v = self.value(node)
        s_out, z_out = float(q.scale.detach()), int(round(float(q.zero_point)))
        if isinstance(v, Joined):  # each part to the shared scale, then join the codes
            parts = [self.requant_to(f"{node.name}:part{i}", p, spec, s_out, z_out, channels)
                     for i, (p, channels) in enumerate(zip(v.parts, v.channels, strict=True))]
            out = Codes(node.name, s_out, z_out, min(p.qmin for p in parts), spec.qmax)
            return self.emit_codes(ConcatOp(node.name, tuple(p.slot for p in parts)), out)
        if isinstance(v, Mapped):
            table = lookup_table(v.codes, v.fn, spec, s_out, z_out)
            return self.emit_codes(LookupOp(node.name, v.codes.slot, v.codes.qmin, table),
                                   Codes(node.name, s_out, z_out, int(table.min()),
                                         int(table.max())))
        return self.requant_to(node.name, v, spec, s_out, z_out, node.meta["shape"][1])

    def requant_to(self, slot: str, v: Codes | Acc | Pending, spec, s_out: float, z_out: int,
                   channels: int) -> Codes:
        """Emit the requantization of ``v`` (``channels`` channels) to codes with scale
        ``s_out`` and zero point ``z_out`` in slot ``slot``."""
        pending = v if isinstance(v, Pending) else Pending((v,))
        reals, zps = [], []
        for t in pending.terms:
            scale = (t.scale.double() if isinstance(t, Acc) else
                     torch.full((channels,), t.scale, dtype=torch.float64))
            reals.append(scale / s_out)
            zps.append(t.zero_point if isinstance(t, Codes) else 0)
        real = torch.stack(reals)
        mult, shift = fixed_point(real)
        terms = tuple(Term(t.slot, z, m_, r) for t, z, m_, r in zip(pending.terms, zps, mult, real,
                                                                    strict=True))
        lo, hi = _clamp_codes(pending, spec.qmin, spec.qmax, s_out, z_out)
        if spec.is_sign or (lo in (spec.qmin, max(spec.qmin, z_out)) and hi == spec.qmax):
            return self.emit_codes(RequantOp(slot, terms, shift, z_out, lo, hi,
                                             sign=spec.is_sign), Codes(slot, s_out, z_out, lo, hi))
        lo0 = lo if lo == max(spec.qmin, z_out) else spec.qmin  # ReLU's bound stays inside
        full = self.emit_codes(RequantOp(f"{slot}:unclamped", terms, shift, z_out, lo0,
                                         spec.qmax), Codes(f"{slot}:unclamped", s_out, z_out, lo0,
                                                           spec.qmax))
        return self.emit_codes(ClampOp(slot, full.slot, lo, hi), Codes(slot, s_out, z_out, lo, hi))

    def output(self, node: fx.Node) -> None:
        v = self.env[node.args[0]]
        if isinstance(v, (Pending, Joined, Mapped)):
            raise ConfigError("the model output is an unquantized sum; end with a linear layer")
        scale = v.scale if isinstance(v, Acc) else torch.tensor(v.scale, dtype=torch.float64)
        self.ops.append(OutputOp(v.slot, scale, v.zero_point if isinstance(v, Codes) else 0))


def lookup_table(c: Codes, fn: nn.Module, spec, s_out: float, z_out: int) -> torch.Tensor:
    """Output codes (int64, one per input code qmin..qmax of ``c``) of ``fn`` followed by the
    quantizer (s_out, z_out, ``spec``), computed as the twin computes them: the input value
    ``(q - z) s`` and ``fn`` in float64, then ``floor(y / s_out + 1/2) + z_out`` clamped (the
    sign quantizer: +1 where y >= 0, else -1)."""
    q = torch.arange(c.qmin, c.qmax + 1, dtype=torch.float64)
    with torch.no_grad():
        y = fn((q - float(c.zero_point)) * c.scale)
    s = torch.tensor(s_out, dtype=torch.float64)
    if spec.is_sign:
        return torch.where(y / s >= 0, 1, -1).long()
    return ((y / s).add_(0.5).floor_().add_(z_out)).clamp_(spec.qmin, spec.qmax).long()


def _clamp_codes(pending: Pending, qmin: int, qmax: int, s_out: float,
                 z_out: int) -> tuple[int, int]:
    """Code range [lo, hi] of a requantization whose sum is clamped to real [a, b] first:
    ``z_out + floor(a / s_out + 1/2)`` (the twin's rounding of the clamped value, in float64)."""
    lo, hi = qmin, qmax
    if pending.lo > -math.inf:
        lo = max(qmin, z_out + math.floor(pending.lo / s_out + 0.5))
    if pending.hi < math.inf:
        hi = min(qmax, z_out + math.floor(pending.hi / s_out + 0.5))
    return lo, hi


def lower(twin: nn.Module, input_shape: tuple[int, int, int]) -> Program:
    """The integer program of a calibrated twin for images of shape ``input_shape`` (C, H, W)."""
    if not isinstance(twin, fx.GraphModule) or not any(
            isinstance(m, QuantInput) for m in twin.modules()):
        raise ConfigError("to_integer needs a twin with quantized activations, made by "
                          "quantize(model, 'wNaM', calib); weight-only recipes stay float")
    lowering = _Lowering(twin, tuple(input_shape))
    ops = lowering.lower()
    return Program(tuple(ops), tuple(input_shape), lowering.codes)


def output_scale_note(program: Program) -> str:
    """Human-readable summary: bit widths of the materialised tensors."""
    widths = sorted({math.ceil(math.log2(c.qmax - c.qmin + 1)) for c in program.codes.values()})
    return f"{len(program.ops)} integer ops, code widths {widths} bits"
