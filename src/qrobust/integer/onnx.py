"""ONNX Runtime int8 backend: the lowered integer program as an ONNX graph of integer ops.

The graph is built directly with ``onnx.helper`` from the twin's own integer weights, scales
and zero points (QOperator format, no re-calibration, no torch.onnx):

* conv and hidden linear layers: ``QLinearConv`` (uint8 activations x int8 per-channel
  weights, int32 bias, requantization fused; linear layers run as 1x1 convolutions);
* residual adds: ``com.microsoft.QLinearAdd``; global average pooling:
  ``com.microsoft.QLinearGlobalAveragePool``; max-pooling and flatten on uint8 directly;
* the last layer: ``MatMulInteger`` (uint8 x int8 -> int32) + int32 bias, then one float
  multiply by the accumulator scale gives the logits (exactly as the reference executor);
* the input: uint8 pixel codes; the first layer's per-channel zero point round(255 mean_c)
  is exact: the input is padded explicitly with z_c and ``-sum w z_c`` is folded into the
  int32 bias, so the convolution sees ``q - z_c`` with zero padding.

Signed activation codes [-127, 127] are stored as uint8 with zero point 128. ORT requantizes
with a float multiplier and rounds half to even, the reference executor with a fixed-point
multiplier and round half up: codes can differ by 1 LSB on near-ties. Needs 8-bit
activations and weights of at most 8 bits with zero point 0 (symmetric).
:func:`float_model_proto` builds the same graph in float32 (dequantized weights, no
activation quantization) for speed comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
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
    RequantOp,
    SumPoolOp,
    lower,
)

OPSET = 17
MS = "com.microsoft"


@dataclass(frozen=True)
class _U8:
    """An ONNX uint8 tensor holding codes: real = (u - zero_point) * scale."""

    name: str
    scale: float
    zero_point: int | np.ndarray  # array: per-feature zero points (the raw pixel input)


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

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


def _f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _weight_int8(op: ConvOp | LinearOp) -> np.ndarray:
    w = op.weight
    if int(w.min()) < -128 or int(w.max()) > 127:
        raise ConfigError("ONNX int8 export needs symmetric weights of at most 8 bits")
    return w.numpy().astype(np.int8)


def _input_padding(b: _Builder, x: _U8, op: ConvOp, shape: tuple[int, ...]) -> str:
    """Pad raw pixel codes with their per-channel zero points (explicitly)."""
    ph, pw = op.padding
    if not ph and not pw:
        return x.name
    c, h, w = shape
    pads = b.const(np.array([0, 0, ph, pw, 0, 0, ph, pw], dtype=np.int64), "pads")
    padded = b.node("Pad", [x.name, pads, b.const(_u8_value(0), "zero")], "pad")
    mask = np.ones((1, c, h + 2 * ph, w + 2 * pw), dtype=bool)
    mask[:, :, ph:ph + h, pw:pw + w] = False
    fill = (np.asarray(x.zero_point, dtype=np.uint8).reshape(1, c, 1, 1)
            * np.ones_like(mask, dtype=np.uint8))
    return b.node("Where", [b.const(mask, "border"), b.const(fill, "zfill"), padded], "padz")


def _conv_inputs(b: _Builder, x: _U8, op: ConvOp | LinearOp, shape) -> tuple[str, int, np.ndarray,
                                                                              list[int]]:
    """(input name, x zero point, int32 bias, pads) with per-channel input zero points folded."""
    w = op.weight.numpy().astype(np.int64)
    bias = op.bias.numpy().astype(np.int64)
    pads = list(op.padding) * 2 if isinstance(op, ConvOp) else [0, 0, 0, 0]
    if isinstance(x.zero_point, np.ndarray):  # raw pixels: q - z_c, explicit padding
        z = x.zero_point.astype(np.int64)
        if isinstance(op, ConvOp):
            bias = bias - np.einsum("ochw,c->o", w, z)
            name = _input_padding(b, x, op, shape)
            pads = [0, 0, 0, 0]
        else:
            bias = bias - w @ z
            name = x.name
        return name, 0, bias.astype(np.int32), pads
    return x.name, int(x.zero_point), bias.astype(np.int32), pads


def _out_repr(op: RequantOp) -> tuple[int, bool]:
    """uint8 zero point of the output codes and whether a signed range is stored shifted."""
    if op.sign or op.hi not in (127, 255):
        raise ConfigError("ONNX int8 export needs 8-bit activation quantizers (a w*a8 recipe); "
                          "use the reference backend for lower bit widths")
    shifted = op.lo < 0
    if op.lo > op.zero_point and op.zero_point != 0:
        raise ConfigError("ONNX int8 export: ReLU with a non-zero output zero point")
    return op.zero_point + (128 if shifted else 0), shifted


def build_int8_proto(program: Program) -> onnx.ModelProto:
    """The ONNX int8 model of ``program``: input 'pixels' uint8 (N, C, H, W) -> 'logits'."""
    b = _Builder()
    slots: dict[str, _U8] = {}
    accs: dict[str, ConvOp | LinearOp | SumPoolOp] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    c, h, w = program.input_shape
    for op in program.ops:
        if isinstance(op, InputOp):
            slots[op.out] = _U8("pixels", 1.0 / 255, op.zero_point.numpy().astype(np.int64))
            shapes[op.out] = (c, h, w)
        elif isinstance(op, (ConvOp, LinearOp, SumPoolOp)):
            accs[op.out] = op
        elif isinstance(op, MaxPoolOp):
            x = slots[op.inp]
            out = b.node("MaxPool", [x.name], "maxpool", kernel_shape=list(op.kernel),
                         strides=list(op.stride))
            slots[op.out] = _U8(out, x.scale, x.zero_point)
        elif isinstance(op, FlattenOp):
            x = slots[op.inp]
            zp = x.zero_point
            if isinstance(zp, np.ndarray):
                zp = np.repeat(zp, int(np.prod(shapes[op.inp][1:])))
            slots[op.out] = _U8(b.node("Flatten", [x.name], "flatten", axis=1), x.scale, zp)
        elif isinstance(op, RequantOp):
            slots[op.out] = _requant(b, op, slots, accs, shapes, program.codes[op.out].scale)
        elif isinstance(op, OutputOp):
            _output(b, op, slots, accs)
        else:
            raise ConfigError(f"ONNX int8 export does not support {type(op).__name__}")
    graph = helper.make_graph(
        b.nodes, "qrobust-int8",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", None])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return model


def _requant(b: _Builder, op: RequantOp, slots: dict[str, _U8], accs: dict, shapes,
             scale: float) -> _U8:
    zp_out, _ = _out_repr(op)
    y_scale, y_zp = b.const(_f32(scale), "ys"), b.const(_u8_value(zp_out), "yz")
    if len(op.terms) == 2 and all(t.slot in slots for t in op.terms):
        ins = []
        for t in op.terms:
            x = slots[t.slot]
            ins += [x.name, b.const(_f32(x.scale), "s"), b.const(_u8_value(int(x.zero_point)), "z")]
        out = b.node("QLinearAdd", [*ins, y_scale, y_zp], "add", domain=MS)
        return _U8(out, scale, zp_out)
    if len(op.terms) != 1 or op.terms[0].slot not in accs:
        raise ConfigError("ONNX int8 export: unsupported requantization pattern")
    src = accs[op.terms[0].slot]
    if isinstance(src, SumPoolOp):
        x = slots[src.inp]
        out = b.node("QLinearGlobalAveragePool", [x.name, b.const(_f32(x.scale), "s"),
                                                  b.const(_u8_value(int(x.zero_point)), "z"),
                                                  y_scale, y_zp], "gap", domain=MS,
                     channels_last=0)
        return _U8(out, scale, zp_out)
    x = slots[src.inp]
    name, x_zp, bias, pads = _conv_inputs(b, x, src, shapes.get(src.inp))
    w8 = _weight_int8(src)
    o = w8.shape[0]
    if isinstance(src, LinearOp):
        name = b.node("Reshape", [name, b.const(np.array([-1, w8.shape[1], 1, 1]), "shape")],
                      "as4d")
        w8 = w8.reshape(o, -1, 1, 1)
    w_scale = _f32(src.acc_scale.numpy() / x.scale)
    out = b.node("QLinearConv", [name, b.const(_f32(x.scale), "xs"), b.const(_u8_value(x_zp), "xz"),
                                 b.const(w8, "w"), b.const(w_scale, "ws"),
                                 b.const(np.zeros(o, dtype=np.int8), "wz"), y_scale, y_zp,
                                 b.const(bias, "b")], "qconv",
                 pads=pads, strides=list(getattr(src, "stride", (1, 1))),
                 kernel_shape=list(w8.shape[2:]))
    if isinstance(src, LinearOp):
        out = b.node("Reshape", [out, b.const(np.array([-1, o]), "shape")], "as2d")
    return _U8(out, scale, zp_out)


def _output(b: _Builder, op: OutputOp, slots: dict[str, _U8], accs: dict) -> None:
    src = accs.get(op.inp)
    if not isinstance(src, LinearOp):
        raise ConfigError("ONNX int8 export needs the model to end with a linear layer")
    x = slots[src.inp]
    name, x_zp, bias, _ = _conv_inputs(b, x, src, None)
    w8 = _weight_int8(src)
    acc = b.node("MatMulInteger", [name, b.const(np.ascontiguousarray(w8.T), "wt"),
                                   b.const(_u8_value(x_zp), "az")], "mmi")
    acc = b.node("Add", [acc, b.const(bias, "b")], "bias")
    real = b.node("Cast", [acc], "cast", to=TensorProto.FLOAT)
    out = b.node("Mul", [real, b.const(_f32(op.scale.numpy()), "scale")], "dq")
    b.nodes.append(helper.make_node("Identity", [out], ["logits"]))


def float_model_proto(program: Program) -> onnx.ModelProto:
    """The same graph in float32 ('x' float (N, C, H, W) in [0, 1] -> 'logits'), with the
    dequantized weights and no activation quantization: ORT's fp32 baseline for speed."""
    b = _Builder()
    names: dict[str, str] = {}
    c, h, w = program.input_shape
    for op in program.ops:
        if isinstance(op, InputOp):
            zp = _f32(op.zero_point.numpy().reshape(1, -1, 1, 1) / 255.0)
            names[op.out] = b.node("Sub", ["x", b.const(zp, "mean")], "center")
        elif isinstance(op, (ConvOp, LinearOp)):
            scale = op.acc_scale.numpy()  # real weights: codes * s_w = codes * s_acc / s_x
            x_name = names[op.inp]
            s_x = _slot_scale(program, op.inp)
            wr = _f32(op.weight.numpy() * (scale / s_x).reshape(-1, *([1] * (op.weight.ndim - 1))))
            br = _f32(op.bias.numpy() * scale)
            if isinstance(op, ConvOp):
                names[op.out] = b.node("Conv", [x_name, b.const(wr, "w"), b.const(br, "b")], "conv",
                                       pads=list(op.padding) * 2, strides=list(op.stride),
                                       kernel_shape=list(wr.shape[2:]))
            else:
                names[op.out] = b.node("Gemm", [x_name, b.const(wr, "w"), b.const(br, "b")],
                                       "gemm", transB=1)
        elif isinstance(op, RequantOp):
            ins = [names[t.slot] for t in op.terms]
            out = ins[0] if len(ins) == 1 else b.node("Add", ins, "add")
            names[op.out] = b.node("Relu", [out], "relu") if op.lo == op.zero_point else out
        elif isinstance(op, MaxPoolOp):
            names[op.out] = b.node("MaxPool", [names[op.inp]], "maxpool",
                                   kernel_shape=list(op.kernel), strides=list(op.stride))
        elif isinstance(op, SumPoolOp):
            names[op.out] = b.node("GlobalAveragePool", [names[op.inp]], "gap")
        elif isinstance(op, FlattenOp):
            names[op.out] = b.node("Flatten", [names[op.inp]], "flatten", axis=1)
        elif isinstance(op, OutputOp):
            b.nodes.append(helper.make_node("Identity", [names[op.inp]], ["logits"]))
    graph = helper.make_graph(
        b.nodes, "qrobust-fp32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", None])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def _slot_scale(program: Program, slot: str) -> float:
    return float(program.codes[slot].scale)


def session(proto: onnx.ModelProto, threads: int | None = None):
    """An ONNX Runtime CPU session for ``proto`` (all graph optimizations on)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


class OnnxIntegerModel(IntegerModel):
    """ONNX Runtime int8 execution of a calibrated 8-bit twin (input shape fixed at export)."""

    backend = "onnx"

    def __init__(self, twin: nn.Module, input_shape: tuple[int, int, int] | None = None,
                 threads: int | None = None) -> None:
        super().__init__()
        shape = input_shape or getattr(twin, "input_shape", None)
        if shape is None:
            raise ConfigError("the ONNX backend needs the input shape: to_integer(twin, 'onnx', "
                              "input_shape=(C, H, W))")
        self.program = lower(twin, tuple(shape))
        self.proto = export_int8(self.program)
        self.session = session(self.proto, threads)

    @torch.no_grad()
    def forward_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        u8 = torch.clamp(codes.long(), 0, 255).to(torch.uint8).numpy()
        return torch.from_numpy(self.session.run(["logits"], {"pixels": u8})[0])


def export_int8(program: Program) -> onnx.ModelProto:
    """Build and check the int8 ONNX model of ``program``."""
    proto = build_int8_proto(program)
    onnx.checker.check_model(proto)
    return proto
