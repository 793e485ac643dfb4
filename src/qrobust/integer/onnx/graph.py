"""The graph builder of the ONNX int8 export: one integer-program op at a time into ONNX
nodes and initializers (codes as uint8 tensors with their scale and zero point), shared by
every format of :mod:`qrobust.integer.onnx.formats`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qrobust.errors import ConfigError
from qrobust.integer.int8 import u8s8_safe
from qrobust.integer.program import (
    ConvOp,
    LinearOp,
    OutputOp,
    Program,
    RequantOp,
    SumPoolOp,
)

OPSET = 17


MS = "com.microsoft"


@dataclass(frozen=True)
class U8Tensor:
    """An ONNX uint8 tensor holding codes: real = (u - zero_point) * scale."""

    name: str
    scale: float
    zero_point: int | np.ndarray  # array: per-feature zero points (the raw pixel input)
    real: str | None = None  # QDQ formats: the float tensor a conv's QuantizeLinear rounded


class GraphBuilder:
    """Nodes and initializers of one graph. ``exact_u8s8``: the target's u8 x s8 kernels are
    exact; if not, layers whose int16 pair sums could saturate get uint8 weights."""

    def __init__(self, exact_u8s8: bool = True) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.exact_u8s8 = exact_u8s8
        self.weight_types: list[str] = []  # per conv / linear layer: 'int8' or 'uint8'

    def weights(self, op: ConvOp | LinearOp, w8: np.ndarray, axis: int) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
        """(stored weights, zero points along ``axis``): int8 with zero point 0, or uint8
        ``w + 128`` with zero point 128 (u8 x u8 kernels: exact on every CPU)."""
        channels = w8.shape[axis]
        if self.exact_u8s8 or u8s8_safe(op.weight):
            self.weight_types.append("int8")
            return w8, np.zeros(channels, np.int8)
        self.weight_types.append("uint8")
        return (w8.astype(np.int16) + 128).astype(np.uint8), np.full(channels, 128, np.uint8)

    def const(self, value: np.ndarray, name: str) -> str:
        self.count += 1
        full = f"{name}_{self.count}"
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), full))
        return full

    def node(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        self.count += 1
        out = f"{name}_{op}_{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], domain=domain or None, **attrs))
        return out


def _u8_value(z: int) -> np.ndarray:
    return np.array(z, dtype=np.uint8)


def f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _weight_int8(op: ConvOp | LinearOp) -> np.ndarray:
    w = op.weight
    if int(w.min()) < -128 or int(w.max()) > 127:
        raise ConfigError("ONNX int8 export needs symmetric weights of at most 8 bits")
    return w.numpy().astype(np.int8)


def _input_padding(b: GraphBuilder, x: U8Tensor, op: ConvOp, shape: tuple[int, ...], extra: int) -> str:
    """Pad raw pixel codes with their per-channel zero points (explicitly), and add ``extra``
    all-zero channels (their weights are zero too)."""
    ph, pw = op.padding
    if not ph and not pw and not extra:
        return x.name
    c, h, w = shape
    pads = b.const(np.array([0, 0, ph, pw, 0, extra, ph, pw], dtype=np.int64), "pads")
    padded = b.node("Pad", [x.name, pads, b.const(_u8_value(0), "zero")], "pad")
    if not ph and not pw:
        return padded
    mask = np.ones((1, c + extra, h + 2 * ph, w + 2 * pw), dtype=bool)
    mask[:, :, ph:ph + h, pw:pw + w] = False
    mask[:, c:] = False
    z = np.concatenate([np.asarray(x.zero_point, dtype=np.uint8), np.zeros(extra, np.uint8)])
    fill = z.reshape(1, -1, 1, 1) * np.ones_like(mask, dtype=np.uint8)
    return b.node("Where", [b.const(mask, "border"), b.const(fill, "zfill"), padded], "padz")


def _conv_inputs(b: GraphBuilder, x: U8Tensor, op: ConvOp | LinearOp,
                 shape) -> tuple[str, int, np.ndarray, np.ndarray, list[int]]:
    """(input name, x zero point, int8 weight, int32 bias, pads) with per-channel input zero
    points folded into the bias."""
    w8 = _weight_int8(op)
    w = op.weight.numpy().astype(np.int64)
    bias = op.bias.numpy().astype(np.int64)
    pads = list(op.padding) * 2 if isinstance(op, ConvOp) else [0, 0, 0, 0]
    if isinstance(x.zero_point, np.ndarray):  # raw pixels: q - z_c, explicit padding
        z = x.zero_point.astype(np.int64)
        if isinstance(op, ConvOp):
            bias = bias - np.einsum("ochw,c->o", w, z)
            # ORT's int8 convolution is ~1.6x faster on 4 input channels than on 3 (RGB)
            extra = -w8.shape[1] % 4
            w8 = np.pad(w8, ((0, 0), (0, extra), (0, 0), (0, 0)))
            name = _input_padding(b, x, op, shape, extra)
            pads = [0, 0, 0, 0]
        else:
            bias = bias - w @ z
            name = x.name
        return name, 0, w8, bias.astype(np.int32), pads
    return x.name, int(x.zero_point), w8, bias.astype(np.int32), pads


def _out_repr(op: RequantOp) -> tuple[int, bool]:
    """uint8 zero point of the output codes and whether a signed range is stored shifted."""
    if op.sign or op.hi not in (127, 255):
        raise ConfigError("ONNX int8 export needs 8-bit activation quantizers (a w*a8 recipe); "
                          "use the reference backend for lower bit widths")
    shifted = op.lo < 0
    if op.lo > op.zero_point and op.zero_point != 0:
        raise ConfigError("ONNX int8 export: ReLU with a non-zero output zero point")
    return op.zero_point + (128 if shifted else 0), shifted


def add_requant(b: GraphBuilder, op: RequantOp, slots: dict[str, U8Tensor], accs: dict, shapes,
             scale: float, fmt: str) -> U8Tensor:
    """The op feeding a requantization (conv / linear, residual add, average pool) and the
    requantization itself: one QLinear* node, or (QDQ formats) DequantizeLinear -> float op ->
    QuantizeLinear, which ORT fuses into that same QLinear* kernel."""
    qdq = fmt != "qoperator"
    zp_out, _ = _out_repr(op)
    y_scale, y_zp = b.const(f32(scale), "ys"), b.const(_u8_value(zp_out), "yz")

    def operands(x: U8Tensor) -> list[str]:
        return [x.name, b.const(f32(x.scale), "s"), b.const(_u8_value(int(x.zero_point)), "z")]

    def quantize(real: str) -> str:
        return b.node("QuantizeLinear", [real, y_scale, y_zp], "q")

    if len(op.terms) == 2 and all(t.slot in slots for t in op.terms):
        xs = [slots[t.slot] for t in op.terms]
        real = [_rounded(b, x) if fmt == "qdq-rounded-add" and x.real else _dq(b, x) for x in xs]
        out = (quantize(b.node("Add", real, "add")) if qdq else
               b.node("QLinearAdd", [*operands(xs[0]), *operands(xs[1]), y_scale, y_zp], "add",
                      domain=MS))
        return U8Tensor(out, scale, zp_out)
    if len(op.terms) != 1 or op.terms[0].slot not in accs:
        raise ConfigError("ONNX int8 export: unsupported requantization pattern")
    src = accs[op.terms[0].slot]
    if isinstance(src, SumPoolOp):
        x = slots[src.inp]
        out = (quantize(b.node("GlobalAveragePool", [_dq(b, x)], "gap")) if qdq else
               b.node("QLinearGlobalAveragePool", [*operands(x), y_scale, y_zp], "gap", domain=MS,
                      channels_last=0))
        return U8Tensor(out, scale, zp_out)
    x = slots[src.inp]
    name, x_zp, w8, bias, pads = _conv_inputs(b, x, src, shapes.get(src.inp))
    o = w8.shape[0]
    if isinstance(src, LinearOp):  # as a 1x1 convolution
        name = b.node("Reshape", [name, b.const(np.array([-1, w8.shape[1], 1, 1]), "shape")],
                      "as4d")
        w8 = w8.reshape(o, -1, 1, 1)
    acc_scale = src.acc_scale.numpy()  # float64, rounded to float32 once, alike in both formats
    w_scale, x_scale, x_zero = f32(acc_scale / x.scale), f32(x.scale), _u8_value(x_zp)
    attrs = dict(pads=pads, strides=list(getattr(src, "stride", (1, 1))),
                 kernel_shape=list(w8.shape[2:]))
    w_stored, w_zero = b.weights(src, w8, axis=0)
    real = None
    if qdq:
        weight = _dq(b, b.const(w_stored, "w"), w_scale, w_zero, axis=0)
        bias = _dq(b, b.const(bias, "b"), f32(acc_scale), np.zeros(o, np.int32), axis=0)
        real = b.node("Conv", [_dq(b, name, x_scale, x_zero), weight, bias], "conv", **attrs)
        out = quantize(real)
    else:
        out = b.node("QLinearConv", [name, b.const(x_scale, "xs"), b.const(x_zero, "xz"),
                                     b.const(w_stored, "w"), b.const(w_scale, "ws"),
                                     b.const(w_zero, "wz"), y_scale, y_zp, b.const(bias, "b")],
                     "qconv", **attrs)
    if isinstance(src, LinearOp):
        out = b.node("Reshape", [out, b.const(np.array([-1, o]), "shape")], "as2d")
        real = None
    return U8Tensor(out, scale, zp_out, real)


def _rounded(b: GraphBuilder, x: U8Tensor) -> str:
    """DequantizeLinear(QuantizeLinear(real)) written out in float: Round(real / s) clipped to
    the uint8 range, times s. Same values (Round is half-to-even like QuantizeLinear), but a
    runtime that fuses a conv -> Q -> DQ -> Add chain into one kernel cannot drop the rounding:
    OpenVINO does (a sum post-op), and 1/3 of a residual block's output codes moved by 1 LSB."""
    z = int(x.zero_point)
    s = f32(x.scale)
    codes = b.node("Round", [b.node("Div", [x.real, b.const(s, "s")], "div")], "round")
    codes = b.node("Clip", [codes, b.const(f32(-z), "lo"), b.const(f32(255 - z), "hi")], "clip")
    return b.node("Mul", [codes, b.const(s, "s")], "dq")


def live_nodes(nodes: list[onnx.NodeProto], output: str) -> list[onnx.NodeProto]:
    """The nodes ``output`` depends on (a conv whose rounding was written out in float leaves
    its QuantizeLinear unused)."""
    needed, keep = {output}, []
    for node in reversed(nodes):
        if needed & set(node.output):
            keep.append(node)
            needed |= set(node.input)
    return keep[::-1]


def add_output(b: GraphBuilder, op: OutputOp, slots: dict[str, U8Tensor], accs: dict, qdq: bool) -> None:
    """The last linear layer, float logits = acc * s_acc: ``MatMulInteger`` + int32 bias + one
    multiply, or (``qdq``) DQ(x) @ DQ(W)^T + DQ(bias), which ORT fuses into ``QGemm``."""
    src = accs.get(op.inp)
    if not isinstance(src, LinearOp):
        raise ConfigError("ONNX int8 export needs the model to end with a linear layer")
    x = slots[src.inp]
    name, x_zp, w8, bias, _ = _conv_inputs(b, x, src, None)
    w8 = np.ascontiguousarray(w8.T)
    w_stored, w_zero = b.weights(src, w8, axis=1)
    if qdq:
        acc_scale = op.scale.numpy() * np.ones(w8.shape[1])
        weight = _dq(b, b.const(w_stored, "wt"), f32(acc_scale / x.scale), w_zero, axis=1)
        real = b.node("MatMul", [_dq(b, name, f32(x.scale), _u8_value(x_zp)), weight], "matmul")
        bias = _dq(b, b.const(bias, "b"), f32(acc_scale), np.zeros(w8.shape[1], np.int32),
                   axis=0)
        b.nodes.append(helper.make_node("Add", [real, bias], ["logits"]))
        return
    acc = b.node("MatMulInteger", [name, b.const(w_stored, "wt"), b.const(_u8_value(x_zp), "az"),
                                   b.const(w_zero, "wz")], "mmi")
    acc = b.node("Add", [acc, b.const(bias, "b")], "bias")
    real = b.node("Cast", [acc], "cast", to=TensorProto.FLOAT)
    out = b.node("Mul", [real, b.const(f32(op.scale.numpy()), "scale")], "dq")
    b.nodes.append(helper.make_node("Identity", [out], ["logits"]))


def _dq(b: GraphBuilder, x: U8Tensor | str, scale=None, zero_point=None, axis: int | None = None) -> str:
    """DequantizeLinear of a uint8 slot (or of a named constant with explicit scale / zp)."""
    if isinstance(x, U8Tensor):
        name, scale, zero_point = x.name, f32(x.scale), _u8_value(int(x.zero_point))
    else:
        name = x
    attrs = {} if axis is None else {"axis": axis}
    return b.node("DequantizeLinear", [name, b.const(scale, "s"), b.const(zero_point, "z")], "dq",
                  **attrs)


def slot_scale(program: Program, slot: str) -> float:
    return float(program.codes[slot].scale)
