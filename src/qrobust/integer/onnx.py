"""ONNX Runtime int8 backend: the lowered integer program as an ONNX graph of integer ops.

The graph is built directly with ``onnx.helper`` from the twin's own integer weights, scales
and zero points (no re-calibration, no torch.onnx), in one of two standard formats:

* ``qdq`` (default, the portable one): every conv / add / pool is
  ``DequantizeLinear -> float op -> QuantizeLinear`` with int8 per-channel weights and int32
  biases as ``DequantizeLinear`` constants; only default-domain ONNX ops. ORT fuses each group
  into its integer kernel (:func:`fused_op_types` shows the result; the tests assert that
  nothing is left in float but the last layer's float output);
* ``qoperator``: the fused ops written out: ``QLinearConv`` (uint8 activations x int8
  per-channel weights, int32 bias, requantization fused; linear layers as 1x1 convolutions),
  ``com.microsoft.QLinearAdd``, ``com.microsoft.QLinearGlobalAveragePool``, and
  ``MatMulInteger`` + int32 bias + one float multiply for the logits;
* ``qdq-rounded-add``: ``qdq`` except that a conv output feeding a residual add is requantized
  in float (``Round(y / s)``, ``Clip``, ``* s``) instead of by a Q -> DQ pair: the same values,
  written so that OpenVINO (which fuses conv -> Q -> DQ -> Add into one kernel and drops the
  rounding in between) computes them too. The OpenVINO backend runs this format.

Under ORT, ``qdq`` and ``qoperator`` give identical predictions and logits (tested);
``qdq-rounded-add`` the same predictions but for near-ties (ORT runs the convs whose rounding
is written out in float: 100% of CIFAR-10 predictions, logits within ~1% of their range).
Max-pooling and flatten run on uint8 directly. The input is uint8 pixel codes; the first
layer's per-channel zero point round(255 mean_c) is exact: the input is padded explicitly
with z_c and ``-sum w z_c`` is folded into the int32 bias, so the convolution sees
``q - z_c`` with zero padding.

Signed activation codes [-127, 127] are stored as uint8 with zero point 128. ORT requantizes
with a float multiplier and rounds half to even, the reference executor with a fixed-point
multiplier and round half up: codes can differ by 1 LSB on near-ties. Needs 8-bit
activations and weights of at most 8 bits with zero point 0 (symmetric).
:func:`float_model_proto` builds the same graph in float32 (dequantized weights, no
activation quantization) for speed comparisons.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qrobust.errors import ConfigError
from qrobust.integer.base import IntegerModel
from qrobust.integer.int8 import Int8Kernels, kernels, u8s8_safe
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
    input_codes,
    lower,
)

log = logging.getLogger(__name__)

OPSET = 17
MS = "com.microsoft"


@dataclass(frozen=True)
class _U8:
    """An ONNX uint8 tensor holding codes: real = (u - zero_point) * scale."""

    name: str
    scale: float
    zero_point: int | np.ndarray  # array: per-feature zero points (the raw pixel input)
    real: str | None = None  # QDQ formats: the float tensor a conv's QuantizeLinear rounded


class _Builder:
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


def _f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _weight_int8(op: ConvOp | LinearOp) -> np.ndarray:
    w = op.weight
    if int(w.min()) < -128 or int(w.max()) > 127:
        raise ConfigError("ONNX int8 export needs symmetric weights of at most 8 bits")
    return w.numpy().astype(np.int8)


def _input_padding(b: _Builder, x: _U8, op: ConvOp, shape: tuple[int, ...], extra: int) -> str:
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


def _conv_inputs(b: _Builder, x: _U8, op: ConvOp | LinearOp,
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


FORMATS = ("qdq", "qoperator", "qdq-rounded-add")
WEIGHT_TYPES = "qrobust.weight_types"


def build_int8_proto(program: Program, fmt: str = "qdq",
                     exact_u8s8: bool = True) -> onnx.ModelProto:
    """The ONNX int8 model of ``program``: input 'pixels' uint8 (N, C, H, W) -> 'logits'.

    ``exact_u8s8=False`` (a target CPU without VNNI, :mod:`qrobust.integer.int8`): layers whose
    u8 x s8 pair sums could saturate int16 store uint8 weights (zero point 128) instead. The
    model's metadata ``qrobust.weight_types`` lists the choice per layer."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown ONNX int8 format {fmt!r}; choose from {', '.join(FORMATS)}")
    b = _Builder(exact_u8s8)
    slots: dict[str, _U8] = {}
    accs: dict[str, ConvOp | LinearOp | SumPoolOp] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    c, h, w = program.input_shape
    for op in program.ops:
        if isinstance(op, InputOp):
            slots[op.out] = _U8("pixels", op.step / 255, op.zero_point.numpy().astype(np.int64))
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
            slots[op.out] = _requant(b, op, slots, accs, shapes, program.codes[op.out].scale,
                                     fmt=fmt)
        elif isinstance(op, OutputOp):
            _output(b, op, slots, accs, qdq=fmt != "qoperator")
        else:
            raise ConfigError(f"ONNX int8 export does not support {type(op).__name__}")
    nodes = _live(b.nodes, "logits")
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, f"qrobust-int8-{fmt}",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", None])],
        [t for t in b.inits if t.name in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    helper.set_model_props(model, {WEIGHT_TYPES: ",".join(b.weight_types)})
    return model


def weight_types(proto: onnx.ModelProto) -> list[str]:
    """Per conv / linear layer of a qrobust int8 export: 'int8' or 'uint8' weights."""
    props = {p.key: p.value for p in proto.metadata_props}
    return props.get(WEIGHT_TYPES, "").split(",") if props.get(WEIGHT_TYPES) else []


def _requant(b: _Builder, op: RequantOp, slots: dict[str, _U8], accs: dict, shapes,
             scale: float, fmt: str) -> _U8:
    """The op feeding a requantization (conv / linear, residual add, average pool) and the
    requantization itself: one QLinear* node, or (QDQ formats) DequantizeLinear -> float op ->
    QuantizeLinear, which ORT fuses into that same QLinear* kernel."""
    qdq = fmt != "qoperator"
    zp_out, _ = _out_repr(op)
    y_scale, y_zp = b.const(_f32(scale), "ys"), b.const(_u8_value(zp_out), "yz")

    def operands(x: _U8) -> list[str]:
        return [x.name, b.const(_f32(x.scale), "s"), b.const(_u8_value(int(x.zero_point)), "z")]

    def quantize(real: str) -> str:
        return b.node("QuantizeLinear", [real, y_scale, y_zp], "q")

    if len(op.terms) == 2 and all(t.slot in slots for t in op.terms):
        xs = [slots[t.slot] for t in op.terms]
        real = [_rounded(b, x) if fmt == "qdq-rounded-add" and x.real else _dq(b, x) for x in xs]
        out = (quantize(b.node("Add", real, "add")) if qdq else
               b.node("QLinearAdd", [*operands(xs[0]), *operands(xs[1]), y_scale, y_zp], "add",
                      domain=MS))
        return _U8(out, scale, zp_out)
    if len(op.terms) != 1 or op.terms[0].slot not in accs:
        raise ConfigError("ONNX int8 export: unsupported requantization pattern")
    src = accs[op.terms[0].slot]
    if isinstance(src, SumPoolOp):
        x = slots[src.inp]
        out = (quantize(b.node("GlobalAveragePool", [_dq(b, x)], "gap")) if qdq else
               b.node("QLinearGlobalAveragePool", [*operands(x), y_scale, y_zp], "gap", domain=MS,
                      channels_last=0))
        return _U8(out, scale, zp_out)
    x = slots[src.inp]
    name, x_zp, w8, bias, pads = _conv_inputs(b, x, src, shapes.get(src.inp))
    o = w8.shape[0]
    if isinstance(src, LinearOp):  # as a 1x1 convolution
        name = b.node("Reshape", [name, b.const(np.array([-1, w8.shape[1], 1, 1]), "shape")],
                      "as4d")
        w8 = w8.reshape(o, -1, 1, 1)
    acc_scale = src.acc_scale.numpy()  # float64, rounded to float32 once, alike in both formats
    w_scale, x_scale, x_zero = _f32(acc_scale / x.scale), _f32(x.scale), _u8_value(x_zp)
    attrs = dict(pads=pads, strides=list(getattr(src, "stride", (1, 1))),
                 kernel_shape=list(w8.shape[2:]))
    w_stored, w_zero = b.weights(src, w8, axis=0)
    real = None
    if qdq:
        weight = _dq(b, b.const(w_stored, "w"), w_scale, w_zero, axis=0)
        bias = _dq(b, b.const(bias, "b"), _f32(acc_scale), np.zeros(o, np.int32), axis=0)
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
    return _U8(out, scale, zp_out, real)


def _rounded(b: _Builder, x: _U8) -> str:
    """DequantizeLinear(QuantizeLinear(real)) written out in float: Round(real / s) clipped to
    the uint8 range, times s. Same values (Round is half-to-even like QuantizeLinear), but a
    runtime that fuses a conv -> Q -> DQ -> Add chain into one kernel cannot drop the rounding:
    OpenVINO does (a sum post-op), and 1/3 of a residual block's output codes moved by 1 LSB."""
    z = int(x.zero_point)
    s = _f32(x.scale)
    codes = b.node("Round", [b.node("Div", [x.real, b.const(s, "s")], "div")], "round")
    codes = b.node("Clip", [codes, b.const(_f32(-z), "lo"), b.const(_f32(255 - z), "hi")], "clip")
    return b.node("Mul", [codes, b.const(s, "s")], "dq")


def _live(nodes: list[onnx.NodeProto], output: str) -> list[onnx.NodeProto]:
    """The nodes ``output`` depends on (a conv whose rounding was written out in float leaves
    its QuantizeLinear unused)."""
    needed, keep = {output}, []
    for node in reversed(nodes):
        if needed & set(node.output):
            keep.append(node)
            needed |= set(node.input)
    return keep[::-1]


def _output(b: _Builder, op: OutputOp, slots: dict[str, _U8], accs: dict, qdq: bool) -> None:
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
        weight = _dq(b, b.const(w_stored, "wt"), _f32(acc_scale / x.scale), w_zero, axis=1)
        real = b.node("MatMul", [_dq(b, name, _f32(x.scale), _u8_value(x_zp)), weight], "matmul")
        bias = _dq(b, b.const(bias, "b"), _f32(acc_scale), np.zeros(w8.shape[1], np.int32),
                   axis=0)
        b.nodes.append(helper.make_node("Add", [real, bias], ["logits"]))
        return
    acc = b.node("MatMulInteger", [name, b.const(w_stored, "wt"), b.const(_u8_value(x_zp), "az"),
                                   b.const(w_zero, "wz")], "mmi")
    acc = b.node("Add", [acc, b.const(bias, "b")], "bias")
    real = b.node("Cast", [acc], "cast", to=TensorProto.FLOAT)
    out = b.node("Mul", [real, b.const(_f32(op.scale.numpy()), "scale")], "dq")
    b.nodes.append(helper.make_node("Identity", [out], ["logits"]))


def _dq(b: _Builder, x: _U8 | str, scale=None, zero_point=None, axis: int | None = None) -> str:
    """DequantizeLinear of a uint8 slot (or of a named constant with explicit scale / zp)."""
    if isinstance(x, _U8):
        name, scale, zero_point = x.name, _f32(x.scale), _u8_value(int(x.zero_point))
    else:
        name = x
    attrs = {} if axis is None else {"axis": axis}
    return b.node("DequantizeLinear", [name, b.const(scale, "s"), b.const(zero_point, "z")], "dq",
                  **attrs)


def float_model_proto(program: Program) -> onnx.ModelProto:
    """The same graph in float32 ('x' float (N, C, H, W) in [0, 1] -> 'logits'), with the
    dequantized weights and no activation quantization: ORT's fp32 baseline for speed."""
    b = _Builder()
    names: dict[str, str] = {}
    c, h, w = program.input_shape
    for op in program.ops:
        if isinstance(op, InputOp):
            zp = _f32(op.pixel_zero_point.numpy().reshape(1, -1, 1, 1) / 255.0)
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


def fused_op_types(proto: onnx.ModelProto) -> list[str]:
    """The op types ORT actually runs for ``proto`` after its (hardware-independent) graph
    optimizations: for a QDQ model, the integer kernels it fused the Q/DQ groups into."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


@functools.cache
def int8_kernels() -> Int8Kernels:
    """ONNX Runtime's u8 x s8 kernels on this CPU (probed once per process)."""
    import onnxruntime as ort

    def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
        return session(proto, threads=1).run(None, {"x": x})[0]

    return kernels(f"onnxruntime {ort.__version__}", run)


class OnnxIntegerModel(IntegerModel):
    """ONNX Runtime int8 execution of a calibrated 8-bit twin (input shape fixed at export).

    Weights are int8 (ORT's fast u8 x s8 kernels) where those are exact on this CPU or cannot
    saturate for the layer; otherwise uint8 (u8 x u8 kernels, exact, about 0.7x the speed):
    ``deployment()`` says which and why."""

    backend = "onnx"

    def __init__(self, twin: nn.Module, input_shape: tuple[int, int, int] | None = None,
                 threads: int | None = None, fmt: str = "qdq") -> None:
        super().__init__(twin)
        self.program = lower_for_export(twin, input_shape, "onnx")
        self.widened = self.program.input_op.step > 1
        self.kernels = int8_kernels()
        self.proto = export_int8(self.program, fmt, self.kernels.exact_u8s8)
        self.session = session(self.proto, threads)
        slow = weight_types(self.proto).count("uint8")
        if slow:
            log.warning("%s: u8 x s8 kernels saturate int16 pair sums on this CPU (%s); %d of %d "
                        "layers run exact u8 x u8 kernels instead (slower). Quantize with a "
                        "'reduce-range' recipe for the fast kernels.", self.kernels.runtime,
                        self.kernels.cpu.describe(), slow, len(weight_types(self.proto)))

    def deployment(self) -> dict:
        return {**super().deployment(), **self.kernels.to_dict(),
                "weight_types": weight_types(self.proto)}

    @torch.no_grad()
    def forward_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        u8 = input_codes(self.program.input_op, codes).to(torch.uint8).numpy()
        return torch.from_numpy(self.session.run(["logits"], {"pixels": u8})[0])


def lower_for_export(twin: nn.Module, input_shape: tuple[int, int, int] | None,
                     backend: str) -> Program:
    """The integer program of ``twin`` at a fixed input shape (an exported graph needs one)."""
    shape = input_shape or getattr(twin, "input_shape", None)
    if shape is None:
        raise ConfigError(f"the {backend} backend needs the input shape: to_integer(twin, "
                          f"'{backend}', input_shape=(C, H, W))")
    return lower(twin, tuple(shape))


def export_int8(program: Program, fmt: str = "qdq", exact_u8s8: bool = True) -> onnx.ModelProto:
    """Build and check the int8 ONNX model of ``program`` (:func:`build_int8_proto`)."""
    proto = build_int8_proto(program, fmt, exact_u8s8)
    onnx.checker.check_model(proto)
    return proto
