"""The ONNX int8 formats of an integer program (``qdq``, ``qoperator``, ``qdq-rounded-add``;
see :mod:`qrobust.integer.onnx`) and the float32 graph of the same network."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from torch import nn

from qrobust.errors import ConfigError
from qrobust.integer.onnx.graph import (
    MS,
    OPSET,
    GraphBuilder,
    U8Tensor,
    add_output,
    add_requant,
    f32,
    live_nodes,
    slot_scale,
)
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

FORMATS = ("qdq", "qoperator", "qdq-rounded-add")


WEIGHT_TYPES = "qrobust.weight_types"



def _fixed_rounding(op: RequantOp) -> None:
    """ONNX requantizes as qrobust's own programs round; imported files' roundings differ."""
    if op.rounding != "fixed":
        raise ConfigError(f"ONNX int8 export supports the 'fixed' requantization rounding only; "
                          f"'{op.out}' rounds as {op.rounding!r} (an imported file: run it with "
                          "the reference executor or its own runtime)")

def build_int8_proto(program: Program, fmt: str = "qdq",
                     exact_u8s8: bool = True) -> onnx.ModelProto:
    """The ONNX int8 model of ``program``: input 'pixels' uint8 (N, C, H, W) -> 'logits'.

    ``exact_u8s8=False`` (a target CPU without VNNI, :mod:`qrobust.integer.int8`): layers whose
    u8 x s8 pair sums could saturate int16 store uint8 weights (zero point 128) instead. The
    model's metadata ``qrobust.weight_types`` lists the choice per layer."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown ONNX int8 format {fmt!r}; choose from {', '.join(FORMATS)}")
    b = GraphBuilder(exact_u8s8)
    slots: dict[str, U8Tensor] = {}
    accs: dict[str, ConvOp | LinearOp | SumPoolOp] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    c, h, w = program.input_shape
    for op in program.ops:
        if isinstance(op, InputOp):
            slots[op.out] = U8Tensor("pixels", op.step / 255, op.zero_point.numpy().astype(np.int64))
            shapes[op.out] = (c, h, w)
        elif isinstance(op, (ConvOp, LinearOp, SumPoolOp)):
            accs[op.out] = op
        elif isinstance(op, MaxPoolOp):
            x = slots[op.inp]
            out = b.node("MaxPool", [x.name], "maxpool", kernel_shape=list(op.kernel),
                         strides=list(op.stride))
            slots[op.out] = U8Tensor(out, x.scale, x.zero_point)
        elif isinstance(op, FlattenOp):
            x = slots[op.inp]
            zp = x.zero_point
            if isinstance(zp, np.ndarray):
                zp = np.repeat(zp, int(np.prod(shapes[op.inp][1:])))
            slots[op.out] = U8Tensor(b.node("Flatten", [x.name], "flatten", axis=1), x.scale, zp)
        elif isinstance(op, RequantOp):
            _fixed_rounding(op)
            slots[op.out] = add_requant(b, op, slots, accs, shapes, program.codes[op.out].scale,
                                     fmt=fmt)
        elif isinstance(op, OutputOp):
            add_output(b, op, slots, accs, qdq=fmt != "qoperator")
        else:
            raise ConfigError(f"ONNX int8 export does not support {type(op).__name__}")
    nodes = live_nodes(b.nodes, "logits")
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


def float_model_proto(program: Program) -> onnx.ModelProto:
    """The same graph in float32 ('x' float (N, C, H, W) in [0, 1] -> 'logits'), with the
    dequantized weights and no activation quantization: ORT's fp32 baseline for speed."""
    b = GraphBuilder()
    names: dict[str, str] = {}
    c, h, w = program.input_shape
    for op in program.ops:
        if isinstance(op, InputOp):
            zp = f32(op.pixel_zero_point.numpy().reshape(1, -1, 1, 1) / 255.0)
            names[op.out] = b.node("Sub", ["x", b.const(zp, "mean")], "center")
        elif isinstance(op, (ConvOp, LinearOp)):
            scale = op.acc_scale.numpy()  # real weights: codes * s_w = codes * s_acc / s_x
            x_name = names[op.inp]
            s_x = slot_scale(program, op.inp)
            wr = f32(op.weight.numpy() * (scale / s_x).reshape(-1, *([1] * (op.weight.ndim - 1))))
            br = f32(op.bias.numpy() * scale)
            if isinstance(op, ConvOp):
                names[op.out] = b.node("Conv", [x_name, b.const(wr, "w"), b.const(br, "b")], "conv",
                                       pads=list(op.padding) * 2, strides=list(op.stride),
                                       kernel_shape=list(wr.shape[2:]))
            else:
                names[op.out] = b.node("Gemm", [x_name, b.const(wr, "w"), b.const(br, "b")],
                                       "gemm", transB=1)
        elif isinstance(op, RequantOp):
            _fixed_rounding(op)
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
        else:
            raise ConfigError(f"ONNX float export does not support {type(op).__name__}")
    graph = helper.make_graph(
        b.nodes, "qrobust-fp32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", None])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


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
