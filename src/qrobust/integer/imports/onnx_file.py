"""Import an int8 ONNX file (QDQ or QOperator, as written by ONNX Runtime's ``quantize_static``)
as an integer :class:`Program`.

The program follows what ONNX Runtime *runs*, not only what the file says: the file is first
given to ONNX Runtime's own graph optimizer (level 'extended', hardware independent), which
fuses each QDQ group (DequantizeLinear -> Conv -> QuantizeLinear, ...) into the QOperator
kernel that executes it (QLinearConv, QLinearAdd, ...), and the optimized graph is imported.
QDQ and QOperator files thus meet one importer, and a group ORT leaves unfused (a float
HardSwish between DequantizeLinear and QuantizeLinear) is imported as the float island it is.

What each op becomes (ORT's kernels requantize in float: ``rounding='float32'``, see
:class:`qrobust.integer.program.RequantOp` and docs/import.md):

- QuantizeLinear of the float input -> :class:`InputOp` with a per-channel table (pixel code
  -> input code) computed by ORT itself from the normalised pixel grid;
- QLinearConv -> ConvOp / GroupConvOp + RequantOp, multiplier ``float32(s_x s_w) / s_y``;
- QLinearMatMul, QGemm -> LinearOp + RequantOp (QGemm without output quantizer: float logits);
- QLinearAdd -> RequantOp of two code terms; QLinearMul -> MulOp + RequantOp;
- QLinearGlobalAveragePool -> SumPoolOp + RequantOp (ORT sums integers too); QLinearAveragePool ->
  FloatAvgPoolOp (ORT's float average, step by step);
- QLinearConcat -> a LookupOp per input whose scale differs (ORT's own table) + ConcatOp;
- QLinearSigmoid, QLinearLeakyRelu, and any chain of float elementwise ops between one
  DequantizeLinear and a QuantizeLinear (HardSwish, Sigmoid, Relu, Clip, ...) -> LookupOp
  whose 256 entries ORT computes by running those very nodes on every input code;
- MaxPool on codes -> MaxPoolOp; Flatten / Reshape to (N, K) -> FlattenOp;
- DequantizeLinear of the graph output -> OutputOp.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from qrobust.errors import ConfigError
from qrobust.integer.imports.base import Imported, InputSpec, check_unchanged, sha256
from qrobust.integer.program import (
    Codes,
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
    RequantOp,
    SumPoolOp,
    Term,
    fixed_point,
)

log = logging.getLogger(__name__)

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm",
                 "QLinearAdd", "QLinearMul", "ConvInteger", "MatMulInteger"}
# float ops allowed between one DequantizeLinear and a QuantizeLinear: elementwise, so that the
# island is a function of each code alone (a table)
ELEMENTWISE = ("Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Mul",
               "Add", "Sub", "Div", "Neg", "Abs", "Exp", "Min", "Max", "Identity")
TABLE_OPS = ("QLinearSigmoid", "QLinearLeakyRelu")
SUPPORTED = ("QuantizeLinear (of the input)", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
             "Conv / Gemm / MatMul / Add / Mul / MaxPool / AveragePool / GlobalAveragePool / "
             "Concat of DequantizeLinear inputs (left unfused by ORT)",
             "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
             "QLinearAveragePool", "QLinearConcat", *TABLE_OPS, "MaxPool", "Flatten", "Reshape",
             "Identity", "Transpose (NHWC input)",
             f"float {'/'.join(ELEMENTWISE)} between DequantizeLinear and QuantizeLinear")
CODE_RANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


@dataclass(frozen=True)
class Float:
    """A float tensor: the file's input (``source`` None) or an elementwise function of one
    code tensor, ``nodes`` (DequantizeLinear first) computing it."""

    source: str | None
    nodes: tuple[onnx.NodeProto, ...] = ()
    transposed: bool = False
    flat: bool = False  # flattened to (N, K) on the way (values unchanged)
    value: str = ""  # the tensor holding the values before any flattening


@dataclass(frozen=True)
class FloatSum:
    """A float Add of dequantized code tensors ORT left unfused: terms (slot, zero point,
    float32 scale)."""

    terms: tuple[tuple[str, int, np.float32], ...]


@dataclass(frozen=True)
class FloatPool:
    """A float AveragePool / GlobalAveragePool of dequantized codes ORT left unfused, waiting
    for its QuantizeLinear (a :class:`FloatAvgPoolOp`: within one code of ORT's float pool)."""

    node: onnx.NodeProto
    codes: Codes
    zero_point: int
    scale: float
    window: tuple


@dataclass(frozen=True)
class FloatConcat:
    """A float Concat of dequantized code tensors, waiting for its QuantizeLinear: each part
    requantized by a table (ORT running DequantizeLinear -> QuantizeLinear), then joined."""

    parts: tuple[tuple[Codes, onnx.NodeProto], ...]


@dataclass(frozen=True)
class Weights:
    """A dequantized constant: integer codes, scale and zero point (per tensor or per axis)."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray


@dataclass(frozen=True)
class FloatAcc:
    """The float output of a Conv / Gemm / MatMul ORT left unfused (DequantizeLinear inputs):
    the accumulator ``slot`` times ``scale`` (per channel), up to float32 rounding."""

    slot: str
    scale: np.ndarray  # float32 (C,)


@dataclass(frozen=True)
class FloatOut:
    """A float output of an integer op (QGemm without output quantizer): accumulator * scale."""

    slot: str
    scale: torch.Tensor


def load_model(path: Path) -> onnx.ModelProto:
    """The ONNX model at ``path`` with its external data; one-line errors for bad files."""
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: external data file missing ({err.filename or err}); keep "
                          "the .data files next to the .onnx file") from None
    except Exception as err:  # noqa: BLE001 - protobuf raises several types for bad bytes
        if "should be stored in" in str(err):  # onnx's check of external data locations
            raise ConfigError(f"{path}: external data file missing ({str(err).splitlines()[0]});"
                              " keep the .data files next to the .onnx file") from None
        raise ConfigError(f"{path} is not a readable ONNX file ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'truncated?'})") from None
    if not model.graph.node:
        raise ConfigError(f"{path} is not a readable ONNX file (no graph nodes; truncated?)")
    return model


def optimized_model(path: Path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs for the file: its 'extended' optimizations applied (QDQ
    groups fused into QLinear* kernels), written out by ORT itself."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
            raise ConfigError(f"ONNX Runtime cannot load {path}: "
                              f"{str(err).splitlines()[0]}") from None
        return onnx.load(opts.optimized_model_filepath)


def session(path: str | Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class OnnxRuntime:
    """Runs the original file with ONNX Runtime: float images (N, C, H, W) in [0, 1] -> float
    logits (np.ndarray). Images are read on the pixel grid (round(255 x) / 255), as the integer
    program reads them. Refuses a file that changed since import."""

    def __init__(self, path: str | Path, digest: str, spec: InputSpec) -> None:
        check_unchanged(path, digest)
        self.path, self.spec = str(path), spec
        self._session = session(path)

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        from qrobust.integer.base import pixel_codes

        feed = self.spec.feed(pixel_codes(x).numpy())
        return self._session.run(None, {self.spec.name: feed})[0]


def _run_nodes(nodes: list[onnx.NodeProto], inputs: dict[str, np.ndarray],
               inits: dict[str, np.ndarray], output: str, opsets) -> np.ndarray:
    """Run ``nodes`` alone in ONNX Runtime: how ORT computes a table."""
    import onnxruntime as ort

    names = {i for n in nodes for i in n.input if i} - set(inputs)
    graph = helper.make_graph(
        nodes, "table",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [onnx.ValueInfoProto(name=output)],
        [numpy_helper.from_array(inits[k], k) for k in sorted(names) if k in inits])
    model = helper.make_model(graph, opset_imports=list(opsets))
    model.ir_version = min(model.ir_version, 10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([output], inputs)[0]


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32).reshape(-1)


class _Importer:
    def __init__(self, model: onnx.ModelProto, spec: InputSpec, input_shape: tuple[int, ...],
                 source: str) -> None:
        self.model, self.spec, self.source = model, spec, source
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.env: dict[str, Codes | Float | FloatOut | OutputOp] = {spec.name: Float(None)}
        self.shapes: dict[str, tuple[int, ...]] = {spec.name: tuple(input_shape)}
        self.ops: list = []
        self.codes: dict[str, Codes] = {}
        self.input_shape = tuple(input_shape)
        self.s8_weights: list = []  # layers with int8 weights (u8 x s8 kernels in ORT)
        self.dq_consts: dict[str, Weights] = {}
        self.offset: dict[str, int] = {}  # slot -> zero point already subtracted
        self.nhwc_codes: set[str] = set()  # input codes the file holds NHWC (until transposed)

    # ---- helpers ----------------------------------------------------------------------------
    def init(self, node: onnx.NodeProto, i: int) -> np.ndarray:
        name = node.input[i] if i < len(node.input) else ""
        if name not in self.inits:
            raise ConfigError(f"{node.op_type} node '{node.name}': input {i} ('{name}') must be "
                              "a constant of the file")
        return self.inits[name]

    def optional(self, node: onnx.NodeProto, i: int) -> np.ndarray | None:
        return self.init(node, i) if i < len(node.input) and node.input[i] else None

    def codes_in(self, node: onnx.NodeProto, i: int = 0, nhwc_ok: bool = False) -> Codes:
        v = self.env.get(node.input[i])
        if isinstance(v, Codes) and v.slot in self.nhwc_codes and not nhwc_ok:
            raise ConfigError(f"{node.op_type} node '{node.name}' reads the NHWC input codes; "
                              "qrobust imports files that transpose their input to NCHW first")
        if not isinstance(v, Codes):
            raise ConfigError(f"{node.op_type} node '{node.name}' reads '{node.input[i]}', which "
                              "is not an int8/uint8 tensor of the graph (a float or constant "
                              "input is not supported there)")
        return v

    def emit(self, op, c: Codes, shape: tuple[int, ...]) -> Codes:
        self.ops.append(op)
        self.codes[c.slot] = c
        self.shapes[c.slot] = shape
        return c

    def requant(self, node: onnx.NodeProto, slot: str, terms: list[tuple[str, int, np.ndarray]],
                shape: tuple[int, ...], at: int) -> Codes:
        """RequantOp of ``terms`` (slot, zero point, float32 multiplier per channel or scalar) to
        the node's output quantizer (scale: input ``at``, zero point: input ``at + 1``)."""
        s_out, z_arr = self.init(node, at), self.init(node, at + 1)
        z_out = int(z_arr.reshape(-1)[0])
        lo, hi = CODE_RANGE[z_arr.dtype]
        channels = shape[0]
        real = torch.stack([torch.from_numpy(np.broadcast_to(m, (channels,)).astype(np.float64))
                            for _, _, m in terms])
        mult, shift = fixed_point(real)  # kept for fixed-point consumers; unused by 'float32'
        op_terms = tuple(Term(s, z, m, r) for (s, z, _), m, r in zip(terms, mult, real,
                                                                      strict=True))
        out = Codes(slot, float(s_out.reshape(-1)[0]), z_out, lo, hi)
        return self.emit(RequantOp(slot, op_terms, shift, z_out, lo, hi, rounding="float32"),
                         out, shape)

    def table(self, node_out: str, src: Codes, nodes: list[onnx.NodeProto],
              x_name: str) -> torch.Tensor:
        """Output codes of ``nodes`` (reading codes ``x_name``) for every code of ``src``,
        computed by ONNX Runtime."""
        offset = self.offset.get(src.slot, 0)  # the input slot holds centred codes
        lo = src.qmin + offset
        codes = (np.arange(src.qmin, src.qmax + 1) + offset).astype(
            np.uint8 if lo == 0 else np.int8)
        try:
            out = _run_nodes(nodes, {x_name: codes}, self.inits, node_out, self.model.opset_import)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"cannot tabulate {'/'.join(n.op_type for n in nodes)} (node "
                              f"'{nodes[-1].name}') as an elementwise function of codes: "
                              f"{str(err).splitlines()[0]}") from None
        return torch.from_numpy(out.astype(np.int64).reshape(-1))

    def lookup(self, slot: str, src: Codes, table: torch.Tensor, scale: float, zp: int,
               shape: tuple[int, ...], dtype) -> Codes:
        lo, hi = CODE_RANGE[np.dtype(dtype)]
        return self.emit(LookupOp(slot, src.slot, src.qmin, table),
                         Codes(slot, scale, zp, lo, hi), shape)

    # ---- the graph --------------------------------------------------------------------------
    def run(self) -> Program:
        graph = self.model.graph
        for node in graph.node:
            if node.op_type == "Constant":
                self.inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                if node.op_type in ELEMENTWISE:
                    handler = self.float_op
                elif node.op_type in TABLE_OPS:
                    handler = self.table_op
                else:
                    raise ConfigError(f"unsupported op {node.op_type} (node '{node.name}') in "
                                      f"{self.source}; supported: {', '.join(SUPPORTED)}")
            handler(node)
        if len(graph.output) != 1:
            raise ConfigError(f"{self.source} has {len(graph.output)} outputs; qrobust imports "
                              "classifiers with one output (the logits)")
        out = self.env.get(graph.output[0].name)
        if isinstance(out, Codes):
            out = OutputOp(out.slot, torch.tensor(1.0, dtype=torch.float64), 0)
        elif isinstance(out, FloatOut):
            out = OutputOp(out.slot, out.scale, 0)
        elif isinstance(out, FloatAcc):
            out = OutputOp(out.slot, torch.from_numpy(out.scale.astype(np.float64)), 0)
        if not isinstance(out, OutputOp):
            raise ConfigError(f"the output of {self.source} is a float tensor computed by float "
                              "ops; qrobust imports files whose output is dequantized codes")
        self.ops.append(out)
        return Program(tuple(self.ops), self.input_shape, self.codes)

    def op_Identity(self, node):
        self.env[node.output[0]] = self.env[node.input[0]]
        self.shapes[node.output[0]] = self.shapes[node.input[0]]

    def op_Transpose(self, node):
        v = self.env.get(node.input[0])
        perm = list(_attr(node, "perm", []))
        nhwc_input = (isinstance(v, Float) and v.source in (None, *self.nhwc_codes)) or (
            isinstance(v, Codes) and v.slot in self.nhwc_codes)
        if not (nhwc_input and self.spec.layout == "NHWC" and perm == [0, 3, 1, 2]):
            raise ConfigError(f"unsupported op Transpose (node '{node.name}'): only NHWC -> NCHW "
                              "of the input (--layout NHWC) is supported; supported: "
                              f"{', '.join(SUPPORTED)}")
        if isinstance(v, Codes):  # the input codes: the program holds them NCHW already
            self.nhwc_codes.discard(v.slot)
            self.env[node.output[0]] = v
            return
        if v.source is not None:  # their dequantized values: the same, NCHW
            self.env[node.output[0]] = v
            return
        self.env[node.output[0]] = Float(None, (node,), True, value=node.output[0])

    def op_QuantizeLinear(self, node):
        v = self.env.get(node.input[0])
        if isinstance(v, FloatAcc):  # ORT: float conv / gemm, then y / s_y: within one code
            real = v.scale / _f32(self.init(node, 1))[0]
            self.env[node.output[0]] = self.requant(node, node.output[0], [(v.slot, 0, real)],
                                                    self.shapes[v.slot], 1)
            return
        if isinstance(v, FloatPool):
            return self.float_pool(node, v)
        if isinstance(v, FloatConcat):
            return self.float_concat(node, v)
        if isinstance(v, FloatSum):  # ORT: float add of dequantized values: within one code
            s_y = _f32(self.init(node, 1))[0]
            terms = [(slot, z, _f32(scale / s_y)) for slot, z, scale in v.terms]
            shape = self.shapes[v.terms[0][0]]
            self.env[node.output[0]] = self.requant(node, node.output[0], terms, shape, 1)
            return
        if not isinstance(v, Float):
            raise ConfigError(f"QuantizeLinear node '{node.name}' reads a tensor that is not float")
        out = node.output[0]
        if v.source is None:
            self.quantize_input(node, v)
        else:
            src = self.codes_named(v.source)
            zp = self.init(node, 2)
            q = onnx.NodeProto()
            q.CopyFrom(node)
            q.input[0] = v.value  # the values before a Flatten (applied to the codes below)
            table = self.table(out, src, [*v.nodes, q], v.nodes[0].input[0])
            self.lookup(out, src, table, float(self.init(node, 1).reshape(-1)[0]),
                        int(zp.reshape(-1)[0]), self.shapes[src.slot], zp.dtype)
        self.env[out] = self.codes[out]
        if v.flat:  # a Flatten / Reshape among the float ops: applied to the codes after
            self.env[out] = self.flatten_codes(f"{out}:flat", self.codes[out])

    def float_layer(self, node, x_at: int, w: Weights, bias: np.ndarray | None, conv: bool):
        """Conv / Gemm / MatMul on a dequantized tensor with dequantized constant weights, which
        ORT runs in float: the integer layer, its float32 scale kept for the QuantizeLinear."""
        v = self.env.get(node.input[x_at])
        if not (isinstance(v, Float) and v.source is not None and len(v.nodes) == 1):
            raise ConfigError(f"unsupported op {node.op_type} (node '{node.name}'): its input is "
                              "not a dequantized int8 tensor")
        dq = v.nodes[0]
        sx = _f32(self.init(dq, 1))[0]
        zx = int(self.optional(dq, 2).reshape(-1)[0]) if self.optional(dq, 2) is not None else 0
        x = self.codes_named(v.source)
        if v.flat:
            x = self.flatten_codes(f"{node.output[0]}:flat", x)
        if conv:
            fake = helper.make_node("QLinearConv", [], [node.output[0]], name=node.name)
            fake.attribute.extend(node.attribute)
            self.inits_conv(fake, x, sx, zx, w, bias)
        else:
            slot = self.linear(node, x, zx, w.codes, w.zero_point.reshape(-1), bias, sx,
                               _f32(w.scale))
            self.env[node.output[0]] = FloatAcc(slot, np.float32(sx) * _f32(w.scale))

    def inits_conv(self, node, x: Codes, sx, zx: int, w: Weights, bias: np.ndarray | None):
        out_ch = w.codes.shape[0]
        self.check_channels(node, x, w.codes, int(_attr(node, "group", 1)))
        kernel, stride, padding, (ho, wo) = self.window(node, self.shapes[x.slot])
        zw = w.zero_point.astype(np.int64).reshape(-1)
        codes = w.codes.astype(np.int64)
        centred = torch.from_numpy(codes - zw.reshape(-1, 1, 1, 1) if zw.size > 1 else codes - zw[0])
        b = torch.zeros(out_ch, dtype=torch.long) if bias is None else torch.from_numpy(
            bias.astype(np.int64))
        sw = _f32(w.scale)
        acc_scale = torch.from_numpy(np.broadcast_to(np.float64(sx) * sw.astype(np.float64),
                                                     (out_ch,)).copy())
        slot = f"{node.output[0]}:acc"
        if w.codes.dtype == np.int8:
            self.s8_weights.append((slot, centred))
        groups = int(_attr(node, "group", 1))
        op = (GroupConvOp(slot, x.slot, self.in_zero_point(x, zx), centred, b, stride, padding,
                          acc_scale, groups) if groups > 1 else
              ConvOp(slot, x.slot, self.in_zero_point(x, zx), centred, b, stride, padding,
                     acc_scale))
        self.ops.append(op)
        self.shapes[slot] = (out_ch, ho, wo)
        self.env[node.output[0]] = FloatAcc(slot, np.broadcast_to(np.float32(sx) * sw,
                                                                  (out_ch,)).copy())

    def weights(self, node, i: int) -> Weights:
        w = self.dq_consts.get(node.input[i]) if i < len(node.input) else None
        if w is None:
            raise ConfigError(f"unsupported op {node.op_type} (node '{node.name}'): a float "
                              "layer whose weights are not dequantized int8 constants "
                              "(a float ONNX file, or a layer quantize_static excluded)")
        return w

    def float_bias(self, node, i: int) -> np.ndarray | None:
        if i >= len(node.input) or not node.input[i]:
            return None
        b = self.dq_consts.get(node.input[i])
        if b is None or b.codes.dtype != np.int32:
            raise ConfigError(f"{node.op_type} node '{node.name}': the bias must be a "
                              "dequantized int32 constant")
        return b.codes

    def op_Conv(self, node):
        self.float_layer(node, 0, self.weights(node, 1), self.float_bias(node, 2), conv=True)

    def op_Gemm(self, node):
        if _attr(node, "transA", 0) or float(_attr(node, "alpha", 1.0)) != 1.0:
            raise ConfigError(f"Gemm node '{node.name}': only transA=0, alpha=1 supported")
        w = self.weights(node, 1)
        if _attr(node, "transB", 0):
            w = Weights(w.codes.T, w.scale, w.zero_point)
        self.float_layer(node, 0, w, self.float_bias(node, 2), conv=False)

    def op_MatMul(self, node):
        self.float_layer(node, 0, self.weights(node, 1), None, conv=False)

    def codes_named(self, name: str) -> Codes:
        return self.codes[name]  # Float.source is a slot of the program

    def quantize_input(self, node, v: Float):
        """The file's input quantizer as a per-channel table over pixel codes 0..255, computed
        by ORT on the normalised pixel grid (exactly what the runtime computes per pixel)."""
        scale, zp = self.init(node, 1).reshape(-1), self.init(node, 2).reshape(-1)
        if scale.size != 1:
            raise ConfigError(f"input QuantizeLinear '{node.name}' is per-channel; only a "
                              "per-tensor input quantizer is supported")
        nhwc = self.spec.layout == "NHWC" and not v.transposed  # quantized before the transpose
        channels = self.input_shape[0]
        grid = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, channels, 1, 256))
        q = onnx.NodeProto()
        q.CopyFrom(node)
        q.input[0] = v.value or self.spec.name  # the values before a Flatten
        # the file's own float ops on its input (a transpose, a normalisation) run too
        codes = _run_nodes([*v.nodes, q], {self.spec.name: self.spec.feed(grid)}, self.inits,
                           node.output[0], self.model.opset_import)
        if nhwc:  # (1, 1, 256, C): the file transposes these codes next (op_Transpose)
            codes = codes.transpose(0, 3, 1, 2)
            self.nhwc_codes.add(node.output[0])
        table = torch.from_numpy(codes.reshape(channels, 256).astype(np.int64))
        z = int(zp[0])
        zero = torch.full((channels,), z, dtype=torch.long)
        op = InputOp(node.output[0], zero, 1, torch.zeros(channels, dtype=torch.long), table)
        lo, hi = CODE_RANGE[zp.dtype]
        # the slot holds centred codes u - z (the program's input convention): zero point 0
        self.env[node.output[0]] = self.emit(op, Codes(node.output[0], float(scale[0]), 0,
                                                       lo - z, hi - z), self.input_shape)
        self.input_zero_point, self.input_dtype = z, str(zp.dtype)
        self.offset[node.output[0]] = z
        self.input_scale = float(scale[0])

    def op_DequantizeLinear(self, node):
        if node.input[0] in self.inits:  # weights of a layer ORT runs in float
            zp = self.optional(node, 2)
            self.dq_consts[node.output[0]] = Weights(
                self.inits[node.input[0]], self.init(node, 1),
                np.zeros(1, np.int64) if zp is None else zp)
            return
        c = self.codes_in(node, nhwc_ok=True)
        scale, zp = self.init(node, 1).reshape(-1), self.optional(node, 2)
        z = 0 if zp is None else int(zp.reshape(-1)[0])
        if node.output[0] in {o.name for o in self.model.graph.output}:
            self.env[node.output[0]] = OutputOp(c.slot, torch.tensor(float(scale[0]),
                                                                     dtype=torch.float64),
                                                self.in_zero_point(c, z))
            return
        self.env[node.output[0]] = Float(c.slot, (node,), value=node.output[0])
        self.shapes[node.output[0]] = self.shapes[c.slot]

    def in_zero_point(self, c: Codes, z_file: int) -> int:
        """Zero point to subtract from slot ``c`` for a consumer whose file zero point is
        ``z_file``: the input slot (and its flattened / pooled copies) hold codes already
        centred by the input's own zero point."""
        return z_file - self.offset.get(c.slot, 0)

    def dequantized(self, name: str) -> tuple[Codes, int, np.float32] | None:
        """(codes, zero point for the program, float32 scale) of a pure DequantizeLinear output."""
        v = self.env.get(name)
        if not (isinstance(v, Float) and v.source is not None and len(v.nodes) == 1
                and not v.flat):
            return None
        dq = v.nodes[0]
        zp = self.optional(dq, 2)
        x = self.codes_named(v.source)
        z = 0 if zp is None else int(zp.reshape(-1)[0])
        return x, self.in_zero_point(x, z), _f32(self.init(dq, 1))[0]

    def float_op(self, node):
        pair = [self.dequantized(i) for i in node.input]
        if node.op_type in ("Add", "Mul") and len(pair) == 2 and None not in pair and (
                pair[0][0].slot != pair[1][0].slot):  # two tensors ORT left unfused
            (a, za, sa), (b, zb, sb) = pair  # type: ignore[misc]
            if node.op_type == "Add":
                self.env[node.output[0]] = FloatSum(((a.slot, za, sa), (b.slot, zb, sb)))
            else:
                slot = f"{node.output[0]}:product"
                self.ops.append(MulOp(slot, (a.slot, b.slot), (za, zb)))
                self.shapes[slot] = tuple(np.broadcast_shapes(self.shapes[a.slot],
                                                              self.shapes[b.slot]))
                self.env[node.output[0]] = FloatAcc(slot, _f32(sa * sb))
            return
        sources = {self.env[i].source if isinstance(self.env.get(i), Float) else "const"
                   for i in node.input if i and i not in self.inits}
        floats = [self.env[i] for i in node.input if isinstance(self.env.get(i), Float)]
        consts = [self.inits[i] for i in node.input if i in self.inits]
        on_input = sources == {None}  # float ops on the file's input: any constants
        if (len(sources) != 1 or "const" in sources
                or (not on_input and any(c.size != 1 for c in consts))):
            raise ConfigError(f"unsupported op {node.op_type} (node '{node.name}'): a float op "
                              "ONNX Runtime did not fuse is supported only as an elementwise "
                              "function of one dequantized tensor (with scalar constants); "
                              f"supported: {', '.join(SUPPORTED)}")
        nodes: list[onnx.NodeProto] = []
        for f in floats:  # union of the chains, in graph order
            nodes += [n for n in f.nodes if all(n is not m for m in nodes)]
        self.env[node.output[0]] = Float(floats[0].source, (*nodes, node),
                                         any(f.transposed for f in floats),
                                         any(f.flat for f in floats), node.output[0])

    def table_op(self, node):
        """QLinearSigmoid / QLinearLeakyRelu: ORT's own kernel on every input code."""
        src = self.codes_in(node)
        zp = self.init(node, 4)
        table = self.table(node.output[0], src, [node], node.input[0])
        self.env[node.output[0]] = self.lookup(node.output[0], src, table,
                                               float(self.init(node, 3).reshape(-1)[0]),
                                               int(zp.reshape(-1)[0]), self.shapes[src.slot],
                                               zp.dtype)

    def size_error(self, node, wants: str, got) -> str:
        return (f"{node.op_type} node '{node.name}' expects {wants} but gets {got} from images "
                f"of shape {self.input_shape}: the file was made for another input size than "
                "the dataset's")

    def check_channels(self, node, x: Codes, w: np.ndarray, groups: int) -> None:
        if w.shape[1] * groups != self.shapes[x.slot][0]:
            raise ConfigError(self.size_error(node, f"{w.shape[1] * groups} channels",
                                              self.shapes[x.slot][0]))

    def window(self, node, shape: tuple[int, ...]) -> tuple:
        """kernel, stride, padding and output shape of a 2-D window op; refuses what the
        program cannot express."""
        kernel = tuple(_attr(node, "kernel_shape"))
        stride = tuple(_attr(node, "strides", [1, 1]))
        pads = list(_attr(node, "pads", [0, 0, 0, 0]))
        auto_pad = _attr(node, "auto_pad", b"NOTSET")
        dil = list(_attr(node, "dilations", [1, 1]))
        if (auto_pad not in (b"NOTSET", "NOTSET") or pads[:2] != pads[2:] or dil != [1, 1]
                or _attr(node, "ceil_mode", 0) or _attr(node, "channels_last", 0)):
            raise ConfigError(f"{node.op_type} node '{node.name}': only symmetric explicit pads, "
                              "dilation 1, ceil_mode 0, NCHW are supported")
        _, h, w = shape
        ho = (h + 2 * pads[0] - kernel[0]) // stride[0] + 1
        wo = (w + 2 * pads[1] - kernel[1]) // stride[1] + 1
        if ho < 1 or wo < 1:
            raise ConfigError(self.size_error(node, f"at least a {kernel} window", (h, w)))
        return kernel, stride, (pads[0], pads[1]), (ho, wo)

    def op_QLinearConv(self, node):
        x = self.codes_in(node)
        sx, zx = _f32(self.init(node, 1))[0], int(self.init(node, 2).reshape(-1)[0])
        w = self.init(node, 3).astype(np.int64)
        sw, zw = _f32(self.init(node, 4)), self.init(node, 5).astype(np.int64).reshape(-1)
        bias = self.optional(node, 8)
        out_ch, groups = w.shape[0], int(_attr(node, "group", 1))
        self.check_channels(node, x, w, groups)
        kernel, stride, padding, (ho, wo) = self.window(node, self.shapes[x.slot])
        centred = torch.from_numpy(w - zw.reshape(-1, 1, 1, 1) if zw.size > 1 else w - zw[0])
        b = torch.zeros(out_ch, dtype=torch.long) if bias is None else torch.from_numpy(
            bias.astype(np.int64))
        acc_scale = torch.from_numpy(np.broadcast_to(np.float64(sx) * sw.astype(np.float64),
                                                     (out_ch,)).copy())
        slot = f"{node.output[0]}:acc"
        zp = self.in_zero_point(x, zx)
        if self.init(node, 3).dtype == np.int8:
            self.s8_weights.append((slot, centred))
        if groups > 1:
            self.ops.append(GroupConvOp(slot, x.slot, zp, centred, b, stride, padding, acc_scale,
                                        groups))
        else:
            self.ops.append(ConvOp(slot, x.slot, zp, centred, b, stride, padding, acc_scale))
        # ORT: output_scale[c] = x_scale * w_scale[c] / y_scale in float32
        real = (np.float32(sx) * sw) / _f32(self.init(node, 6))[0]
        self.env[node.output[0]] = self.requant(node, node.output[0], [(slot, 0, real)],
                                                (out_ch, ho, wo), 6)

    def linear(self, node, x: Codes, zx: int, weight_kn: np.ndarray, zw: np.ndarray,
               bias: np.ndarray | None, sx: np.float32, sw: np.ndarray) -> str:
        """LinearOp for codes x (K,) and integer weights (K, N) with zero points zw (N,) or ()."""
        if len(self.shapes[x.slot]) != 1:
            raise ConfigError(f"{node.op_type} node '{node.name}' multiplies a tensor of shape "
                              f"{self.shapes[x.slot]}; only (N, K) inputs (after Flatten) are "
                              "supported")
        if weight_kn.shape[0] != self.shapes[x.slot][0]:
            raise ConfigError(self.size_error(node, f"{weight_kn.shape[0]} inputs",
                                              self.shapes[x.slot][0]))
        w = (weight_kn.astype(np.int64) - zw.astype(np.int64).reshape(1, -1)).T
        n = w.shape[0]
        b = torch.zeros(n, dtype=torch.long) if bias is None else torch.from_numpy(
            bias.astype(np.int64).reshape(-1))
        acc_scale = torch.from_numpy(np.broadcast_to(np.float64(sx) * sw.astype(np.float64),
                                                     (n,)).copy())
        slot = f"{node.output[0]}:acc"
        if weight_kn.dtype == np.int8:
            self.s8_weights.append((slot, torch.from_numpy(np.ascontiguousarray(w))))
        self.ops.append(LinearOp(slot, x.slot, self.in_zero_point(x, zx),
                                 torch.from_numpy(np.ascontiguousarray(w)), b, acc_scale))
        self.shapes[slot] = (n,)
        return slot

    def op_QLinearMatMul(self, node):
        x = self.codes_in(node)
        sx, zx = _f32(self.init(node, 1))[0], int(self.init(node, 2).reshape(-1)[0])
        b, sb, zb = self.init(node, 3), _f32(self.init(node, 4)), self.init(node, 5)
        if b.ndim != 2:
            raise ConfigError(f"QLinearMatMul node '{node.name}': only a 2-D constant B supported")
        slot = self.linear(node, x, zx, b, zb.reshape(-1), None, sx, sb)
        real = (np.float32(sx) * sb) / _f32(self.init(node, 6))[0]
        self.env[node.output[0]] = self.requant(node, node.output[0], [(slot, 0, real)],
                                                self.shapes[slot], 6)

    def op_QGemm(self, node):
        x = self.codes_in(node)
        if _attr(node, "transA", 0) or float(_attr(node, "alpha", 1.0)) != 1.0:
            raise ConfigError(f"QGemm node '{node.name}': only transA=0, alpha=1 supported")
        sx, zx = _f32(self.init(node, 1))[0], int(self.init(node, 2).reshape(-1)[0])
        b, sb, zb = self.init(node, 3), _f32(self.init(node, 4)), self.init(node, 5)
        b = b.T if _attr(node, "transB", 0) else b
        bias = self.optional(node, 6)
        if bias is not None and bias.dtype != np.int32:
            raise ConfigError(f"QGemm node '{node.name}': only an int32 bias is supported")
        slot = self.linear(node, x, zx, b, zb.reshape(-1), bias, sx, sb)
        if len(node.input) > 7 and node.input[7]:
            real = (np.float32(sx) * sb) / _f32(self.init(node, 7))[0]
            self.env[node.output[0]] = self.requant(node, node.output[0], [(slot, 0, real)],
                                                    self.shapes[slot], 7)
        else:  # float output: acc * s_x s_w
            n = self.shapes[slot][0]
            scale = torch.from_numpy(np.broadcast_to((np.float32(sx) * sb).astype(np.float64),
                                                     (n,)).copy())
            self.env[node.output[0]] = FloatOut(slot, scale)

    def op_QLinearAdd(self, node):
        a, b = self.codes_in(node, 0), self.codes_in(node, 3)
        sa, za = _f32(self.init(node, 1))[0], int(self.init(node, 2).reshape(-1)[0])
        sb, zb = _f32(self.init(node, 4))[0], int(self.init(node, 5).reshape(-1)[0])
        sc = _f32(self.init(node, 6))[0]
        shape = self.broadcast(node, a, b)
        terms = [(a.slot, self.in_zero_point(a, za), _f32(sa / sc)),
                 (b.slot, self.in_zero_point(b, zb), _f32(sb / sc))]
        self.env[node.output[0]] = self.requant(node, node.output[0], terms, shape, 6)

    def broadcast(self, node, a: Codes, b: Codes) -> tuple[int, ...]:
        sa, sb = self.shapes[a.slot], self.shapes[b.slot]
        try:
            return tuple(np.broadcast_shapes(sa, sb))
        except ValueError:
            raise ConfigError(f"{node.op_type} node '{node.name}': shapes {sa} and {sb} do not "
                              "broadcast") from None

    def op_QLinearMul(self, node):
        a, b = self.codes_in(node, 0), self.codes_in(node, 3)
        sa, za = _f32(self.init(node, 1))[0], int(self.init(node, 2).reshape(-1)[0])
        sb, zb = _f32(self.init(node, 4))[0], int(self.init(node, 5).reshape(-1)[0])
        sc = _f32(self.init(node, 6))[0]
        shape = self.broadcast(node, a, b)
        slot = f"{node.output[0]}:product"
        self.ops.append(MulOp(slot, (a.slot, b.slot), (self.in_zero_point(a, za),
                                                        self.in_zero_point(b, zb))))
        self.env[node.output[0]] = self.requant(node, node.output[0],
                                                [(slot, 0, _f32((sa * sb) / sc))], shape, 6)

    def op_QLinearGlobalAveragePool(self, node):
        x = self.codes_in(node)
        if _attr(node, "channels_last", 0):
            raise ConfigError(f"QLinearGlobalAveragePool '{node.name}': channels_last unsupported")
        sx, zx = _f32(self.init(node, 1))[0], int(self.init(node, 2).reshape(-1)[0])
        c, h, w = self.shapes[x.slot]
        slot = f"{node.output[0]}:sum"
        self.ops.append(SumPoolOp(slot, x.slot, self.in_zero_point(x, zx)))
        real = _f32(sx / (_f32(self.init(node, 3))[0] * np.float32(h * w)))
        self.env[node.output[0]] = self.requant(node, node.output[0], [(slot, 0, real)],
                                                (c, 1, 1), 3)

    def op_QLinearAveragePool(self, node):
        """ORT averages dequantized floats: :class:`FloatAvgPoolOp` repeats its arithmetic."""
        x = self.codes_in(node)
        sx, zx = _f32(self.init(node, 1))[0], int(self.init(node, 2).reshape(-1)[0])
        sy, zy = self.init(node, 3), self.init(node, 4)
        kernel, stride, padding, (ho, wo) = self.window(node, self.shapes[x.slot])
        lo, hi = CODE_RANGE[zy.dtype]
        op = FloatAvgPoolOp(node.output[0], x.slot, self.in_zero_point(x, zx), float(sx),
                            float(_f32(sy)[0]), int(zy.reshape(-1)[0]), kernel, stride, padding,
                            bool(_attr(node, "count_include_pad", 0)), lo, hi)
        self.env[node.output[0]] = self.emit(
            op, Codes(node.output[0], float(_f32(sy)[0]), int(zy.reshape(-1)[0]), lo, hi),
            (self.shapes[x.slot][0], ho, wo))

    def op_QLinearConcat(self, node):
        if int(_attr(node, "axis")) not in (1, -3):
            raise ConfigError(f"QLinearConcat '{node.name}': only the channel axis is supported")
        sy, zy = self.init(node, 0), self.init(node, 1)
        parts, channels = [], 0
        for i in range(2, len(node.input), 3):
            x = self.codes_in(node, i)
            sx, zx = self.init(node, i + 1), self.init(node, i + 2)
            if x.slot in self.offset:
                raise ConfigError(f"QLinearConcat '{node.name}' of the input tensor unsupported")
            if (float(sx.reshape(-1)[0]) != float(sy.reshape(-1)[0])
                    or int(zx.reshape(-1)[0]) != int(zy.reshape(-1)[0])):
                # ORT requantizes this input with a table: run one-input QLinearConcat on it
                one = helper.make_node("QLinearConcat", [node.input[0], node.input[1],
                                                         *node.input[i:i + 3]],
                                       [f"{node.output[0]}:part{i}"], domain=node.domain,
                                       axis=0)
                table = self.table(one.output[0], x, [one], node.input[i])
                x = self.lookup(one.output[0], x, table, float(sy.reshape(-1)[0]),
                                int(zy.reshape(-1)[0]), self.shapes[x.slot], zy.dtype)
            parts.append(x)
            channels += self.shapes[x.slot][0]
        lo, hi = CODE_RANGE[zy.dtype]
        shape = (channels, *self.shapes[parts[0].slot][1:])
        self.env[node.output[0]] = self.emit(
            ConcatOp(node.output[0], tuple(p.slot for p in parts)),
            Codes(node.output[0], float(sy.reshape(-1)[0]), int(zy.reshape(-1)[0]), lo, hi), shape)

    def float_pool(self, q: onnx.NodeProto, v: FloatPool) -> None:
        sy, zy = self.init(q, 1), self.init(q, 2)
        lo, hi = CODE_RANGE[zy.dtype]
        kernel, stride, padding, (ho, wo) = v.window
        node = v.node
        op = FloatAvgPoolOp(q.output[0], v.codes.slot, v.zero_point, v.scale,
                            float(_f32(sy)[0]), int(zy.reshape(-1)[0]), kernel, stride, padding,
                            bool(_attr(node, "count_include_pad", 0)), lo, hi)
        self.env[q.output[0]] = self.emit(
            op, Codes(q.output[0], float(_f32(sy)[0]), int(zy.reshape(-1)[0]), lo, hi),
            (self.shapes[v.codes.slot][0], ho, wo))

    def float_concat(self, q: onnx.NodeProto, v: FloatConcat) -> None:
        sy, zy = self.init(q, 1), self.init(q, 2)
        parts = []
        for i, (c, dq) in enumerate(v.parts):
            one = onnx.NodeProto()
            one.CopyFrom(q)
            one.input[0], one.output[0] = dq.output[0], f"{q.output[0]}:part{i}"
            table = self.table(one.output[0], c, [dq, one], dq.input[0])
            parts.append(self.lookup(one.output[0], c, table, float(_f32(sy)[0]),
                                     int(zy.reshape(-1)[0]), self.shapes[c.slot], zy.dtype))
        lo, hi = CODE_RANGE[zy.dtype]
        shape = (sum(self.shapes[p.slot][0] for p in parts), *self.shapes[parts[0].slot][1:])
        self.env[q.output[0]] = self.emit(
            ConcatOp(q.output[0], tuple(p.slot for p in parts)),
            Codes(q.output[0], float(_f32(sy)[0]), int(zy.reshape(-1)[0]), lo, hi), shape)

    def pure_dq(self, node, i: int = 0):
        """(codes, program zero point, scale, the DequantizeLinear node) of a float input that
        is a dequantized code tensor, else a one-line error."""
        got = self.dequantized(node.input[i])
        if got is None:
            raise ConfigError(f"unsupported op {node.op_type} (node '{node.name}'): its input is "
                              "not a dequantized int8 tensor")
        return (*got, self.env[node.input[i]].nodes[0])

    def op_AveragePool(self, node):
        c, z, scale, _ = self.pure_dq(node)
        self.env[node.output[0]] = FloatPool(node, c, z, float(scale),
                                             self.window(node, self.shapes[c.slot]))

    def op_GlobalAveragePool(self, node):
        c, z, scale, _ = self.pure_dq(node)
        _, h, w = self.shapes[c.slot]
        self.env[node.output[0]] = FloatPool(node, c, z, float(scale),
                                             ((h, w), (1, 1), (0, 0), (1, 1)))

    def op_Concat(self, node):
        if int(_attr(node, "axis")) not in (1, -3):
            raise ConfigError(f"Concat '{node.name}': only the channel axis is supported")
        parts = []
        for i in range(len(node.input)):
            c, _, _, dq = self.pure_dq(node, i)
            parts.append((c, dq))
        self.env[node.output[0]] = FloatConcat(tuple(parts))

    def op_MaxPool(self, node):
        if isinstance(self.env.get(node.input[0]), Float):
            # max of dequantized codes = dequantized max of the codes (positive scale): pool the
            # codes, dequantize them again for what follows
            c, _, _, dq = self.pure_dq(node)
            kernel, stride, padding, (ho, wo) = self.window(node, self.shapes[c.slot])
            if padding != (0, 0):
                raise ConfigError(f"MaxPool '{node.name}': only pads=0 supported")
            slot = f"{node.output[0]}:codes"
            self.emit(MaxPoolOp(slot, c.slot, kernel, stride),
                      Codes(slot, c.scale, c.zero_point, c.qmin, c.qmax),
                      (self.shapes[c.slot][0], ho, wo))
            if c.slot in self.offset:
                self.offset[slot] = self.offset[c.slot]
            again = onnx.NodeProto()
            again.CopyFrom(dq)
            again.input[0], again.output[0] = slot, node.output[0]
            self.env[node.output[0]] = Float(slot, (again,), value=node.output[0])
            return
        x = self.codes_in(node)
        kernel, stride, padding, (ho, wo) = self.window(node, self.shapes[x.slot])
        if padding != (0, 0) or len(node.output) > 1 and node.output[1]:
            raise ConfigError(f"MaxPool '{node.name}': only pads=0 and no indices supported")
        if x.slot in self.offset:
            self.offset[node.output[0]] = self.offset[x.slot]
        self.env[node.output[0]] = self.emit(
            MaxPoolOp(node.output[0], x.slot, kernel, stride),
            Codes(node.output[0], x.scale, x.zero_point, x.qmin, x.qmax),
            (self.shapes[x.slot][0], ho, wo))

    def flatten_codes(self, slot: str, x: Codes) -> Codes:
        if x.slot in self.offset:
            self.offset[slot] = self.offset[x.slot]
        return self.emit(FlattenOp(slot, x.slot), Codes(slot, x.scale, x.zero_point, x.qmin,
                                                        x.qmax),
                         (int(np.prod(self.shapes[x.slot])),))

    def flatten(self, node):
        v = self.env.get(node.input[0])
        if isinstance(v, Float):  # flattened floats: the codes are flattened once quantized
            self.env[node.output[0]] = Float(v.source, v.nodes, v.transposed, True,
                                             v.value or self.spec.name)
            return
        self.env[node.output[0]] = self.flatten_codes(node.output[0], self.codes_in(node))

    def op_Flatten(self, node):
        if int(_attr(node, "axis", 1)) != 1:
            raise ConfigError(f"Flatten '{node.name}': only axis=1 supported")
        self.flatten(node)

    def op_Reshape(self, node):
        shape = self.init(node, 1).reshape(-1)
        v = self.env.get(node.input[0])
        if isinstance(v, Float):
            size = int(np.prod(self.shapes[v.source] if v.source else self.input_shape))
        else:
            size = int(np.prod(self.shapes[self.codes_in(node).slot]))
        if len(shape) != 2 or shape[1] not in (-1, size):
            raise ConfigError(f"Reshape '{node.name}' to {shape.tolist()}: only (N, -1) / "
                              "(N, C*H*W) flattening is supported")
        self.flatten(node)


def _input_shape(model: onnx.ModelProto, path: Path, layout: str,
                 want: tuple[int, int, int] | None) -> tuple[str, tuple[int, int, int]]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ConfigError(f"{path} has {len(inputs)} inputs; qrobust imports image classifiers "
                          "with one input")
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ConfigError(f"{path}: input '{inputs[0].name}' has {len(dims)} dims; expected "
                          "images (N, C, H, W) or (N, H, W, C) with --layout NHWC")
    chw = tuple(dims[1:]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
    if want is not None:
        fixed = [a for a, b in zip(chw, want, strict=True) if a is not None and a != b]
        if fixed:
            raise ConfigError(f"{path} takes inputs of shape (C, H, W) = {chw} ({layout}); the "
                              f"dataset's images are {tuple(want)}")
        return inputs[0].name, tuple(want)  # type: ignore[return-value]
    if None in chw:
        raise ConfigError(f"{path}: input '{inputs[0].name}' has dynamic dims {chw}; give a "
                          "dataset (--data) whose images fill them")
    return inputs[0].name, chw  # type: ignore[return-value]


def _warn_saturation(layers: list, path: Path) -> None:
    """Without VNNI, ORT's u8 x s8 kernels add pairs of products in saturating int16: layers
    whose weights can overflow a pair compute differently from the exact program."""
    from qrobust.integer.int8 import u8s8_safe
    from qrobust.integer.onnx.session import int8_kernels

    unsafe = [slot for slot, w in layers if not u8s8_safe(w)]
    if unsafe and not int8_kernels().exact_u8s8:
        warnings.warn(f"{path}: ONNX Runtime's u8 x s8 kernels saturate int16 pair sums on this "
                      f"CPU (no VNNI) and {len(unsafe)} layer(s) have 8-bit weights that can "
                      f"overflow them ({unsafe[0]}, ...): the runtime will disagree with the exact "
                      "integer program; quantize with reduce_range=True (7-bit weights) or uint8 "
                      "weights", stacklevel=3)


def read_onnx(path: str | Path, mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,),
              layout: str = "NCHW", input_shape: tuple[int, int, int] | None = None) -> Imported:
    """Import the int8 ONNX file at ``path``: images x in [0, 1] reach the file as
    ``(x - mean) / std`` in ``layout``; ``input_shape`` (C, H, W) fills dynamic dims (and must
    match fixed ones). Raises ConfigError (one line) for files it cannot import."""
    path = Path(path).resolve()
    if layout not in ("NCHW", "NHWC"):
        raise ConfigError(f"input layout '{layout}' unknown; valid: NCHW, NHWC")
    model = load_model(path)
    if not any(n.op_type in QUANTIZED_OPS for n in model.graph.node):
        raise ConfigError(f"{path} is a float ONNX model (no QuantizeLinear / QLinear* ops): "
                          "quantize it with onnxruntime.quantization.quantize_static first, or "
                          "give qrobust the PyTorch model and quantize it with `qrobust quantize`")
    name, shape = _input_shape(model, path, layout, input_shape)
    digest = sha256(path)
    optimized = optimized_model(path)
    probe = InputSpec(tuple(mean), tuple(std), layout, name, 1.0, 0, "uint8")
    importer = _Importer(optimized, probe, shape, str(path))
    program = importer.run()
    if not any(isinstance(op, InputOp) for op in program.ops):
        raise ConfigError(f"{path}: the input is not quantized by a QuantizeLinear node")
    spec = InputSpec(tuple(mean), tuple(std), layout, name, importer.input_scale,
                     importer.input_zero_point, importer.input_dtype)
    _warn_saturation(importer.s8_weights, path)
    log.info("imported %s: %d integer ops", path, len(program.ops))
    return Imported(program, spec, str(path), digest, "onnx", OnnxRuntime(path, digest, spec))
