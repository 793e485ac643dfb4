"""Import int8 TFLite files (TensorFlow's converter, full-integer quantization) as integer programs
that compute what LiteRT computes, bit for bit.

The file is parsed with the ``tflite`` flatbuffer package and run with LiteRT (``ai-edge-litert``)
by its own TFLite kernels (``kernels="builtin"``: the optimized kernels with no delegate;
``"reference"``: TFLite's reference kernels, what TFLite Micro runs). The XNNPACK delegate, which
LiteRT applies by default, requantizes in float and is not the target (docs/import.md).

How each op becomes exact integer ops (program layout N C H W; the file's is N H W C):

- CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED: integer convolution / product of centred codes plus
  the int32 bias, then :class:`RequantOp` with TFLite's own multipliers (QuantizeMultiplier of
  the float64 ratio of the float32 scales) and its rounding; the fused activation is the clamp.
  SAME padding that pads one more row at the bottom (stride 2, even sizes) becomes symmetric
  padding and a kernel grown by a zero row at the top.
- ADD: TFLite scales both inputs by 2^20 and requantizes each (twice rounded) before summing and
  requantizing again: two wide "tflite" requantizations and a two-term one.
- MUL: the product of centred codes (also (1, 1, 1, C) times (1, H, W, C)), then one
  requantization.
- AVERAGE_POOL_2D, MEAN (over H, W): the output is a function of the integer window sum of raw
  codes alone, whatever the kernel computes inside (integer division or float32 arithmetic):
  a window / global sum, then a :class:`LookupOp` over every possible sum, filled by running the
  file's own op in LiteRT on inputs with those sums (per channel position where the kernel
  rounds some channels otherwise: the builtin MEAN's SIMD blocks and scalar tail).
- HARD_SWISH, LOGISTIC, TANH, LEAKY_RELU, RELU, RELU6, RELU_N1_TO_1, QUANTIZE (float input ->
  int8, int8 <-> uint8 / int8): tables over every input value, filled the same way; the float
  input's table is indexed by the pixel code p, for the image p / 255 in float32.
- MAX_POOL_2D, CONCATENATION (same scale), RESHAPE (to (1, F): columns permuted from the file's
  H W C order into the program's C H W order inside the next FULLY_CONNECTED), SOFTMAX (last op:
  the program outputs its input codes, whose argmax is the prediction), DEQUANTIZE (last op).
- SHAPE / STRIDED_SLICE / PACK on int32 shape tensors (Keras' Flatten) are skipped: RESHAPE
  reads its static output shape.

Program slot ``t{i}`` holds the codes of the file's tensor ``i``.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qrobust.errors import ConfigError
from qrobust.integer.base import pixel_codes as pixel_grid
from qrobust.integer.imports.base import Imported, InputSpec
from qrobust.integer.program import (
    ClampOp,
    Codes,
    ConcatOp,
    ConvOp,
    FlattenOp,
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
    WindowSumPoolOp,
)

UNARY = ("HARD_SWISH", "LEAKY_RELU", "LOGISTIC", "RELU", "RELU6", "RELU_N1_TO_1", "TANH")
SUPPORTED = tuple(sorted(("ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D",
                          "DEPTHWISE_CONV_2D", "DEQUANTIZE", "FULLY_CONNECTED", "MAX_POOL_2D",
                          "MEAN", "MUL", "QUANTIZE", "RESHAPE", "SOFTMAX", *UNARY)))
# int32 shape arithmetic in front of RESHAPE (Keras' Flatten)
SHAPE_OPS = ("CONCATENATION", "PACK", "SHAPE", "STRIDED_SLICE")
KERNELS = ("builtin", "reference")
INT8, INT32_RANGE = (-128, 127), (-(2**31), 2**31 - 1)
CODE_RANGE = {"int8": INT8, "uint8": (0, 255)}  # uint8: older files' input / output, QUANTIZEd
ADD_LEFT_SHIFT = 20  # TFLite's ADD of int8 scales both inputs by 2^20 first
# How each kernel set rounds the requantization of convolutions and matrix products, measured
# against LiteRT 2.3 (tests/integer/test_import_tflite.py): the builtin CONV_2D and FULLY_CONNECTED
# multiply in ruy, whose high product and rounding shift both round ties up ("ruy"); the
# reference FULLY_CONNECTED rounds once, ties up ("fixed"); TFLite's own kernels elsewhere round
# twice, the shift's ties away from zero (common.h's MultiplyByQuantizedMultiplier, "tflite")
ROUNDING = {"builtin": {"CONV_2D": "ruy", "FULLY_CONNECTED": "ruy"},
            "reference": {"FULLY_CONNECTED": "fixed"}}


def _need_packages():
    try:
        import tflite
        from ai_edge_litert import interpreter, schema_py_generated
    except ImportError as e:  # pragma: no cover - the [tflite] extra installs both
        raise ConfigError(f"importing TFLite files needs the 'tflite' and 'ai-edge-litert' "
                          f"packages: pip install 'qrobust[tflite]' ({e})") from e
    return tflite, interpreter, schema_py_generated


# ---- TFLite's arithmetic, to the bit ---------------------------------------------------------
def round_half_away(x: np.ndarray | float) -> np.ndarray:
    """std::round: to nearest, ties away from zero (exact for float64 input)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: ``real = q 2^(e - 31)`` with q in [2^30, 2^31]."""
    if real == 0.0:
        return 0, 0
    q, e = math.frexp(real)
    fixed = int(round_half_away(q * 2.0**31))
    if fixed == 2**31:
        fixed, e = fixed // 2, e + 1
    if e < -31:
        return 0, 0
    return fixed, e


def activation_range(act: int, scale: float, zero_point: int) -> tuple[int, int]:
    """TFLite's CalculateActivationRangeQuantized for int8 (act: ActivationFunctionType)."""
    def code(f: float) -> int:
        return zero_point + int(round_half_away(np.float32(f) / np.float32(scale)))
    lo, hi = INT8
    ranges = {0: (lo, hi), 1: (max(lo, code(0.0)), hi), 3: (max(lo, code(0.0)), min(hi, code(6.0))),
              2: (max(lo, code(-1.0)), min(hi, code(1.0)))}
    if act not in ranges:
        raise ConfigError(f"unsupported fused activation {act} (supported: NONE, RELU, RELU6, "
                          "RELU_N1_TO_1)")
    return ranges[act]


def pixel_codes(scale: float, zero_point: int, dtype: str = "int8") -> np.ndarray:
    """(256,) int64: the int8 (or uint8) input code of each pixel code p, quantizing the float32
    image value p / 255 as TFLite's QUANTIZE does: round(x / scale) + zero_point, clamped."""
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    q = round_half_away((x / np.float32(scale)).astype(np.float64)) + zero_point
    return np.clip(q, *CODE_RANGE[dtype]).astype(np.int64)


def _image_values() -> np.ndarray:
    """The float32 image value of each pixel code, as the runtime feeds it."""
    return np.arange(256, dtype=np.float32) / np.float32(255)


# ---- the file ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Value:
    """An int8 tensor of the file held in a program slot; ``order`` (2-D only): the program
    column of each file column (a flatten of H W C into C H W permutes them)."""

    slot: str
    scale: float
    zero_point: int
    shape: tuple[int, ...]
    order: np.ndarray | None = None


class _File:
    """Read access to subgraph 0 of a TFLite flatbuffer."""

    def __init__(self, buf: bytes, name: str) -> None:
        tflite, _, _ = _need_packages()
        self.tflite = tflite
        self.name = name
        if len(buf) < 8 or buf[4:8] != b"TFL3":
            raise ConfigError(f"{name}: not a TFLite flatbuffer (no 'TFL3' identifier); expected "
                              "a .tflite file written by TensorFlow's converter")
        self.buf = buf
        self.model = tflite.Model.GetRootAs(buf, 0)
        if self.model.SubgraphsLength() < 1:
            raise ConfigError(f"{name}: the TFLite file has no subgraph")
        self.graph = self.model.Subgraphs(0)
        self.op_names = {v: k for k, v in vars(tflite.BuiltinOperator).items()
                         if not k.startswith("_")}
        self.type_names = {v: k for k, v in vars(tflite.TensorType).items()
                           if not k.startswith("_")}
        self.tensors = [self.graph.Tensors(i) for i in range(self.graph.TensorsLength())]
        for t in self.tensors:  # touch every field the importer reads: a truncation fails here
            t.ShapeAsNumpy(), t.Type(), t.Quantization(), t.Buffer()

    def op_name(self, op) -> str:
        oc = self.model.OperatorCodes(op.OpcodeIndex())
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        return self.op_names.get(code, f"builtin code {code}")

    def shape(self, i: int) -> tuple[int, ...]:
        t = self.tensors[i]
        return tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()

    def type(self, i: int) -> str:
        return self.type_names.get(self.tensors[i].Type(), "UNKNOWN")

    def quant(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Scales (float32) and zero points (int64) of tensor i; empty when unquantized."""
        q = self.tensors[i].Quantization()
        if q is None or q.ScaleLength() == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return q.ScaleAsNumpy().astype(np.float32), q.ZeroPointAsNumpy().astype(np.int64)

    def data(self, i: int, dtype) -> np.ndarray:
        """The constant data of tensor i, shaped."""
        b = self.model.Buffers(self.tensors[i].Buffer())
        if b.DataLength():
            raw = b.DataAsNumpy().tobytes()
        elif b.Offset() > 1:  # large models keep buffers after the flatbuffer
            raw = self.buf[b.Offset():b.Offset() + b.Size()]
        else:
            raise ConfigError(f"{self.name}: tensor {i} should be constant but has no data")
        return np.frombuffer(raw, dtype=dtype).reshape(self.shape(i))

    def options(self, op, cls_name: str):
        table = op.BuiltinOptions()
        opts = getattr(self.tflite, cls_name)()
        if table is not None:
            opts.Init(table.Bytes, table.Pos)
        return opts


def _parse(buf: bytes, name: str) -> _File:
    try:
        return _File(buf, name)
    except ConfigError:
        raise
    except Exception as e:  # flatbuffers reads past the end of a truncated file
        what = " ".join(str(e).split())
        raise ConfigError(f"{name}: malformed or truncated TFLite file ({type(e).__name__}: "
                          f"{what}); re-export it with TensorFlow's converter") from None


# ---- one-op sub-models: an op's exact outputs over all its inputs, by LiteRT ------------------
class _OneOp:
    """Runs single ops of the file in LiteRT on chosen inputs (tables of exact outputs)."""

    def __init__(self, buf: bytes, kernels: str) -> None:
        _, self.interpreter, self.schema = _need_packages()
        self.model = self.schema.ModelT.InitFromPackedBuf(buf, 0)
        self.resolver = _resolver(kernels)

    def run(self, op_index: int, x: np.ndarray, out_shape: tuple[int, ...],
            valid_padding: bool = False) -> np.ndarray:
        """The op's output for input ``x`` (batch first), in batches of at most 16 MB."""
        rows = max(1, min(len(x), 2**24 // max(1, x[0].nbytes)))
        interp = self.interpreter_for(op_index, (rows, *x.shape[1:]), (rows, *out_shape[1:]),
                                      valid_padding)
        inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
        parts = []
        for start in range(0, len(x), rows):
            chunk = x[start:start + rows]
            pad = rows - len(chunk)
            interp.set_tensor(inp, np.concatenate([chunk, chunk[:1].repeat(pad, 0)]) if pad
                              else chunk)
            interp.invoke()
            parts.append(interp.get_tensor(out)[:len(chunk)].copy())
        return np.concatenate(parts)

    def interpreter_for(self, op_index: int, in_shape: tuple[int, ...],
                        out_shape: tuple[int, ...], valid_padding: bool):
        """A LiteRT interpreter of a model holding the file's op ``op_index`` alone, its first
        input resized to ``in_shape``."""
        import flatbuffers

        graph = self.model.subgraphs[0]
        op = copy.deepcopy(graph.operators[op_index])
        tensors, buffers = [], [self.schema.BufferT()]

        def take(i: int, shape: tuple[int, ...] | None) -> int:
            t = copy.deepcopy(graph.tensors[i])
            t.buffer, t.shapeSignature = 0, None
            if shape is not None:
                t.shape = list(shape)
            else:  # a constant operand (MEAN's axes): keep its data
                buffers.append(copy.deepcopy(self.model.buffers[graph.tensors[i].buffer]))
                t.buffer = len(buffers) - 1
            tensors.append(t)
            return len(tensors) - 1

        op.inputs = [take(op.inputs[0], in_shape)] + [take(i, None) for i in op.inputs[1:] if i >= 0]
        op.outputs = [take(op.outputs[0], out_shape)]
        if valid_padding:
            op.builtinOptions.padding = self.schema.Padding.VALID
        sub = self.schema.SubGraphT()
        sub.tensors, sub.inputs, sub.outputs, sub.operators = tensors, [0], [len(tensors) - 1], [op]
        model = self.schema.ModelT()
        model.version, model.operatorCodes = 3, self.model.operatorCodes
        model.subgraphs, model.buffers = [sub], buffers
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        interp = self.interpreter.Interpreter(model_content=bytes(builder.Output()),
                                              experimental_op_resolver_type=self.resolver)
        interp.allocate_tensors()
        return interp


def _resolver(kernels: str):
    _, interpreter, _ = _need_packages()
    kinds = {"builtin": interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
             "reference": interpreter.OpResolverType.BUILTIN_REF}
    if kernels not in kinds:
        raise ConfigError(f"unknown TFLite kernels {kernels!r}; valid: {', '.join(KERNELS)}")
    return kinds[kernels]


def _sum_inputs(n: int, window: tuple[int, int], channels: int) -> np.ndarray:
    """int8 inputs (K, *window, channels), K = 255 n + 1 (n = window cells): in batch k every
    channel's n codes sum to k - 128 n, so each raw sum of n int8 codes comes once."""
    k = np.arange(255 * n + 1)
    cells = np.clip(k[:, None] - 255 * np.arange(n)[None, :], 0, 255) - 128  # (K, n): greedy
    x = cells.astype(np.int8).reshape(len(k), *window, 1)
    return np.ascontiguousarray(np.broadcast_to(x, (*x.shape[:-1], channels)))


# ---- the lowering --------------------------------------------------------------------------
class _Importer:
    def __init__(self, f: _File, kernels: str) -> None:
        self.f = f
        self.kernels = kernels
        self.one_op = _OneOp(f.buf, kernels)
        self.ops: list = []
        self.codes: dict[str, Codes] = {}
        self.env: dict[int, _Value] = {}
        self.float_input: int | None = None
        self.output: OutputOp | None = None
        self.softmax_out: int | None = None

    def fail(self, k: int, what: str) -> ConfigError:
        return ConfigError(f"{self.f.name}: operator {k}: {what}")

    def emit(self, op, index: int, scale: float, zero_point: int, shape: tuple[int, ...],
             lo: int = INT8[0], hi: int = INT8[1], order: np.ndarray | None = None) -> _Value:
        self.ops.append(op)
        slot = op.out
        self.codes[slot] = Codes(slot, scale, zero_point, lo, hi)
        value = _Value(slot, scale, zero_point, shape, order)
        self.env[index] = value
        return value

    def value(self, k: int, i: int) -> _Value:
        if i not in self.env:
            raise self.fail(k, f"reads tensor {i} ({self.f.type(i)}), which is not an int8 "
                               "activation of the program (float or int16 parts are not supported)")
        return self.env[i]

    def out_quant(self, i: int, types: tuple[str, ...] = ("INT8",)) -> tuple[float, int]:
        scales, zps = self.f.quant(i)
        if self.f.type(i) not in types or len(scales) != 1:
            raise ConfigError(f"{self.f.name}: tensor {i} is {self.f.type(i)} with {len(scales)} "
                              "scales; the importer needs per-tensor int8 activations")
        return float(scales[0]), int(zps[0])

    # -- input
    def input(self) -> tuple[int, ...]:
        g = self.f.graph
        if g.InputsLength() != 1 or g.OutputsLength() != 1:
            raise ConfigError(f"{self.f.name}: the importer needs one input and one output, got "
                              f"{g.InputsLength()} and {g.OutputsLength()}")
        i = int(g.Inputs(0))
        shape = self.f.shape(i)
        if len(shape) != 4 or shape[0] != 1:
            raise ConfigError(f"{self.f.name}: input tensor shape {list(shape)}; the importer needs "
                              "one NHWC image (1, H, W, C)")
        c = shape[3]
        zeros = torch.zeros(c, dtype=torch.long)
        self.ops.append(InputOp("input", zeros, 1, zeros))
        self.codes["input"] = Codes("input", 1.0 / 255.0, 0, 0, 255)
        if self.f.type(i) == "FLOAT32":
            self.float_input = i
        elif self.f.type(i) in ("INT8", "UINT8"):
            scale, zp = self.out_quant(i, ("INT8", "UINT8"))
            dtype = self.f.type(i).lower()
            table = torch.from_numpy(pixel_codes(scale, zp, dtype))
            self.emit(LookupOp(f"t{i}", "input", 0, table), i, scale, zp, shape,
                      *CODE_RANGE[dtype])
        else:
            raise ConfigError(f"{self.f.name}: input type {self.f.type(i)}; supported: INT8, "
                              "UINT8, FLOAT32 followed by QUANTIZE")
        return shape

    # -- ops
    def lower(self) -> None:
        g = self.f.graph
        for k in range(g.OperatorsLength()):
            op = g.Operators(k)
            name = self.f.op_name(op)
            ins = [int(i) for i in op.InputsAsNumpy()] if op.InputsLength() else []
            outs = [int(i) for i in op.OutputsAsNumpy()]
            if name in SHAPE_OPS and all(self.f.type(i) == "INT32" for i in outs):
                continue
            if name not in SUPPORTED:
                raise ConfigError(f"{self.f.name}: unsupported TFLite op {name} (operator {k}); "
                                  f"supported: {', '.join(SUPPORTED)}")
            if self.output is not None and not (name == "DEQUANTIZE"
                                                and ins[0] == self.softmax_out):
                raise self.fail(k, f"{name} after the model's output op (SOFTMAX / DEQUANTIZE "
                                   "must come last)")
            lower = self.elementwise if name in UNARY else getattr(self, name.lower())
            lower(k, op, ins, outs)
        out = int(g.Outputs(0))
        if self.output is None:
            v = self.value(g.OperatorsLength(), out)
            self.output = OutputOp(v.slot, torch.tensor(v.scale, dtype=torch.float64), v.zero_point)
        self.ops.append(self.output)

    def requant(self, slot: str, terms: tuple[Term, ...], exponent: np.ndarray, zero_point: int,
                lo: int, hi: int, rounding: str = "tflite", left_shift: int = 0) -> RequantOp:
        return RequantOp(slot, terms, torch.from_numpy(31 - exponent.astype(np.int64)), zero_point,
                         lo, hi, rounding=rounding, left_shift=left_shift)

    def conv_like(self, k: int, op, ins: list[int], outs: list[int], kind: str) -> None:
        x = self.value(k, ins[0])
        s_out, z_out = self.out_quant(outs[0])
        w_scales, w_zps = self.f.quant(ins[1])
        if self.f.type(ins[1]) != "INT8" or np.any(w_zps != 0):
            raise self.fail(k, f"{kind} needs symmetric int8 weights")
        w = self.f.data(ins[1], np.int8).astype(np.int64)
        out_ch = w.shape[-1] if kind == "DEPTHWISE_CONV_2D" else w.shape[0]
        w_scales = np.broadcast_to(w_scales, (out_ch,)).astype(np.float32)
        bias = (self.f.data(ins[2], np.int32).astype(np.int64) if len(ins) > 2 and ins[2] >= 0
                else np.zeros(out_ch, np.int64))
        real = np.float64(x.scale) * w_scales.astype(np.float64) / np.float64(s_out)
        mult, exponent = np.array([quantize_multiplier(r) for r in real]).T
        acc_scale = torch.from_numpy(np.float64(x.scale) * w_scales.astype(np.float64))
        slot = f"t{outs[0]}:acc"
        if kind == "FULLY_CONNECTED":
            opts = self.f.options(op, "FullyConnectedOptions")
            if opts.WeightsFormat() != 0:
                raise self.fail(k, "FULLY_CONNECTED with shuffled weights is not supported")
            x = self.flat(k, x, f"t{outs[0]}:flat")
            centred = np.empty_like(w)
            centred[:, x.order] = w  # file column f is program column order[f]
            self.ops.append(LinearOp(slot, x.slot, x.zero_point, torch.from_numpy(centred),
                                     torch.from_numpy(bias), acc_scale))
            shape = (1, out_ch)
        else:
            cls = "DepthwiseConv2DOptions" if kind == "DEPTHWISE_CONV_2D" else "Conv2DOptions"
            opts = self.f.options(op, cls)
            if opts.DilationHFactor() != 1 or opts.DilationWFactor() != 1:
                raise self.fail(k, f"{kind} with dilation is not supported")
            stride = (opts.StrideH(), opts.StrideW())
            kh, kw = w.shape[1:3]
            shape = self.f.shape(outs[0])
            pads = self.padding(opts.Padding(), x.shape, shape, (kh, kw), stride)
            # depthwise (1, kh, kw, O) -> (O, 1, kh, kw); conv OHWI -> OIHW
            oihw = w[0].transpose(2, 0, 1)[:, None] if kind == "DEPTHWISE_CONV_2D" else w.transpose(
                0, 3, 1, 2)
            oihw, padding = self.symmetric(oihw, pads)
            weight = torch.from_numpy(np.ascontiguousarray(oihw))
            if kind == "DEPTHWISE_CONV_2D":
                self.ops.append(GroupConvOp(slot, x.slot, x.zero_point, weight,
                                            torch.from_numpy(bias), stride, padding, acc_scale,
                                            x.shape[3]))
            else:
                self.ops.append(ConvOp(slot, x.slot, x.zero_point, weight, torch.from_numpy(bias),
                                       stride, padding, acc_scale))
        lo, hi = activation_range(opts.FusedActivationFunction(), s_out, z_out)
        term = Term(slot, 0, torch.from_numpy(mult), torch.from_numpy(real))
        rounding = ROUNDING[self.kernels].get(kind, "tflite")
        self.emit(self.requant(f"t{outs[0]}", (term,), exponent, z_out, lo, hi, rounding),
                  outs[0], s_out, z_out, shape, lo, hi)

    def conv_2d(self, k, op, ins, outs):
        self.conv_like(k, op, ins, outs, "CONV_2D")

    def depthwise_conv_2d(self, k, op, ins, outs):
        self.conv_like(k, op, ins, outs, "DEPTHWISE_CONV_2D")

    def fully_connected(self, k, op, ins, outs):
        self.conv_like(k, op, ins, outs, "FULLY_CONNECTED")

    def padding(self, mode: int, in_shape, out_shape, kernel, stride) -> list[tuple[int, int]]:
        """(before, after) padding of H and W: none for VALID; for SAME, TFLite's total split
        with the odd cell after (bottom / right)."""
        if mode == 1:  # VALID
            return [(0, 0), (0, 0)]
        pads = []
        for size, out, kk, s in zip(in_shape[1:3], out_shape[1:3], kernel, stride, strict=True):
            total = max((out - 1) * s + kk - size, 0)
            pads.append((total // 2, total - total // 2))
        return pads

    @staticmethod
    def symmetric(weight: np.ndarray, pads: list[tuple[int, int]]):
        """Weights (O, I, kh, kw) and symmetric padding that convolve as the (before, after)
        padding ``pads``: pad both sides by the larger amount and grow the kernel by zero rows /
        columns on the side padded less (they read only the extra padding)."""
        grow = [(p - b, p - a) for (b, a), p in ((ba, max(ba)) for ba in pads)]
        return np.pad(weight, [(0, 0), (0, 0), *grow]), (max(pads[0]), max(pads[1]))

    def flat(self, k: int, x: _Value, slot: str) -> _Value:
        """x as (1, F) with its column order: a 4-D NHWC tensor is flattened (program C H W)."""
        if len(x.shape) == 2:
            return x if x.order is not None else _Value(x.slot, x.scale, x.zero_point, x.shape,
                                                        np.arange(x.shape[1]))
        if len(x.shape) != 4:
            raise self.fail(k, f"cannot flatten a tensor of shape {list(x.shape)}")
        _, h, w, c = x.shape
        order = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
        self.ops.append(FlattenOp(slot, x.slot))
        self.codes[slot] = Codes(slot, x.scale, x.zero_point, *INT8)
        return _Value(slot, x.scale, x.zero_point, (1, h * w * c), order)

    def reshape(self, k, op, ins, outs):
        x = self.value(k, ins[0])
        shape = self.f.shape(outs[0])
        if len(shape) != 2 or shape[0] != 1 or int(np.prod(x.shape)) != shape[1]:
            raise self.fail(k, f"RESHAPE {list(x.shape)} -> {list(shape)}; supported: to (1, F)")
        flat = self.flat(k, x, f"t{outs[0]}")
        self.env[outs[0]] = _Value(flat.slot, x.scale, x.zero_point, shape, flat.order)

    def add(self, k, op, ins, outs):
        a, b = self.value(k, ins[0]), self.value(k, ins[1])
        if a.shape != b.shape or len(a.shape) not in (2, 4):
            raise self.fail(k, f"ADD of shapes {list(a.shape)} and {list(b.shape)}; supported: "
                               "equal shapes")
        if len(a.shape) == 2 and not np.array_equal(a.order, b.order):
            raise self.fail(k, "ADD of (1, F) tensors flattened in different orders")
        s_out, z_out = self.out_quant(outs[0])
        channels = a.shape[-1] if len(a.shape) == 4 else a.shape[1]
        # TFLite's Prepare: float32 scales, ratios in float64 (add.cc)
        twice_max = np.float64(2 * max(np.float32(a.scale), np.float32(b.scale)))
        terms = []
        for side, v in (("a", a), ("b", b)):
            real = np.float64(np.float32(v.scale)) / twice_max
            m, e = quantize_multiplier(real)
            slot = f"t{outs[0]}:{side}"
            term = Term(v.slot, v.zero_point, torch.full((channels,), m, dtype=torch.long),
                        torch.full((channels,), real * 2**ADD_LEFT_SHIFT, dtype=torch.float64))
            self.ops.append(self.requant(slot, (term,), np.full(channels, e), 0, *INT32_RANGE,
                                         left_shift=ADD_LEFT_SHIFT))
            terms.append(slot)
        real = twice_max / np.float64(np.float32(2**ADD_LEFT_SHIFT) * np.float32(s_out))
        m, e = quantize_multiplier(real)
        mult = torch.full((channels,), m, dtype=torch.long)
        reals = torch.full((channels,), real, dtype=torch.float64)
        lo, hi = activation_range(self.f.options(op, "AddOptions").FusedActivationFunction(),
                                  s_out, z_out)
        self.emit(self.requant(f"t{outs[0]}", tuple(Term(t, 0, mult, reals) for t in terms),
                               np.full(channels, e), z_out, lo, hi), outs[0], s_out, z_out,
                  a.shape, lo, hi, a.order)

    def mul(self, k, op, ins, outs):
        a, b = self.value(k, ins[0]), self.value(k, ins[1])
        # (1, 1, 1, C) broadcasts over (1, H, W, C) (squeeze-and-excitation), as (N, C, 1, 1)
        # over (N, C, H, W) in the program
        per_channel = {(1, 1, 1, a.shape[-1]), (1, 1, 1, b.shape[-1])}
        if not (a.shape == b.shape and len(a.shape) in (2, 4)) and not (
                len(a.shape) == len(b.shape) == 4 and a.shape[-1] == b.shape[-1]
                and (a.shape in per_channel or b.shape in per_channel)):
            raise self.fail(k, f"MUL of shapes {list(a.shape)} and {list(b.shape)}; supported: "
                               "equal shapes, or (1, 1, 1, C) times (1, H, W, C)")
        s_out, z_out = self.out_quant(outs[0])
        channels = a.shape[-1] if len(a.shape) == 4 else a.shape[1]
        slot = f"t{outs[0]}:prod"
        self.ops.append(MulOp(slot, (a.slot, b.slot), (a.zero_point, b.zero_point)))
        real = np.float64(np.float32(a.scale)) * np.float64(np.float32(b.scale)) / np.float64(
            np.float32(s_out))
        m, e = quantize_multiplier(real)
        term = Term(slot, 0, torch.full((channels,), m, dtype=torch.long),
                    torch.full((channels,), real, dtype=torch.float64))
        lo, hi = activation_range(self.f.options(op, "MulOptions").FusedActivationFunction(),
                                  s_out, z_out)
        self.emit(self.requant(f"t{outs[0]}", (term,), np.full(channels, e), z_out, lo, hi),
                  outs[0], s_out, z_out, self.f.shape(outs[0]), lo, hi, a.order)

    def table(self, k: int, x: _Value, outs: list[int], table: np.ndarray, qmin: int,
              slot: str | None = None) -> None:
        s_out, z_out = self.out_quant(outs[0], ("INT8", "UINT8"))
        t = torch.from_numpy(table.astype(np.int64).reshape(-1))
        self.emit(LookupOp(slot or f"t{outs[0]}", x.slot, qmin, t), outs[0], s_out, z_out,
                  self.f.shape(outs[0]) if len(x.shape) == 4 else x.shape,
                  int(t.min()), int(t.max()), x.order)

    def elementwise(self, k, op, ins, outs):
        """A function of each int8 (or uint8) code: its table over all 256 codes, by LiteRT."""
        x = self.value(k, ins[0])
        lo = 0 if self.f.type(ins[0]) == "UINT8" else -128
        codes = (np.arange(256) + lo).astype(np.uint8 if lo == 0 else np.int8).reshape(1, 256)
        self.table(k, x, outs, self.one_op.run(k, codes, (1, 256)), lo)


    def quantize(self, k, op, ins, outs):
        if ins[0] == self.float_input:  # the image p / 255 in float32 -> codes, by LiteRT
            x = _image_values().reshape(1, 256)
            scale, zp = self.out_quant(outs[0])
            table = self.one_op.run(k, x, (1, 256)).astype(np.int64).reshape(-1)
            self.emit(LookupOp(f"t{outs[0]}", "input", 0, torch.from_numpy(table)), outs[0],
                      scale, zp, self.f.shape(outs[0]))
        else:
            self.elementwise(k, op, ins, outs)

    def max_pool_2d(self, k, op, ins, outs):
        x = self.value(k, ins[0])
        opts = self.f.options(op, "Pool2DOptions")
        kernel, stride = (opts.FilterHeight(), opts.FilterWidth()), (opts.StrideH(), opts.StrideW())
        shape = self.f.shape(outs[0])
        if self.padding(opts.Padding(), x.shape, shape, kernel, stride) != [(0, 0), (0, 0)]:
            raise self.fail(k, "MAX_POOL_2D with padding is not supported")
        s_out, z_out = self.out_quant(outs[0])
        if (s_out, z_out) != (x.scale, x.zero_point):
            raise self.fail(k, "MAX_POOL_2D that changes the scale is not supported")
        lo, hi = activation_range(opts.FusedActivationFunction(), s_out, z_out)
        slot = f"t{outs[0]}" if (lo, hi) == INT8 else f"t{outs[0]}:pool"
        self.emit(MaxPoolOp(slot, x.slot, kernel, stride), outs[0], s_out, z_out, shape)
        if (lo, hi) != INT8:
            self.emit(ClampOp(f"t{outs[0]}", slot, lo, hi), outs[0], s_out, z_out, shape, lo, hi)

    def sum_table(self, k: int, x: _Value, sum_slot: str, outs: list[int], table: np.ndarray,
                  n: int, slot: str | None = None) -> None:
        """Codes of an op whose output is a function of the raw sum of n codes: ``table`` (K, C)
        holds its outputs for sums -128 n .. 127 n per channel. Channels with one table read it
        by a lookup of the sum; where the kernel computes some channels otherwise (TFLite's
        float MEAN: SIMD blocks of 8 channels, then a scalar tail), each channel's sum is first
        offset into its own copy of the table by a 1 x 1 depthwise convolution."""
        tables, which = np.unique(table.T.astype(np.int64), axis=0, return_inverse=True)
        which = which.reshape(-1)
        c, size = table.shape[1], table.shape[0]
        if len(tables) > 1:
            ones = torch.ones(c, 1, 1, 1, dtype=torch.long)
            offset = torch.from_numpy(which.astype(np.int64) * size)
            self.ops.append(GroupConvOp(f"{sum_slot}:offset", sum_slot, 0, ones, offset, (1, 1),
                                        (0, 0), torch.ones(c, dtype=torch.float64), c))
            sum_slot = f"{sum_slot}:offset"
        self.table(k, _Value(sum_slot, x.scale, 0, x.shape), outs, tables.reshape(-1), -128 * n,
                   slot)

    def average_pool_2d(self, k, op, ins, outs):
        x = self.value(k, ins[0])
        opts = self.f.options(op, "Pool2DOptions")
        kernel, stride = (opts.FilterHeight(), opts.FilterWidth()), (opts.StrideH(), opts.StrideW())
        shape = self.f.shape(outs[0])
        if self.padding(opts.Padding(), x.shape, shape, kernel, stride) != [(0, 0), (0, 0)]:
            raise self.fail(k, "AVERAGE_POOL_2D with padding (TFLite divides by the count of "
                               "real cells) is not supported")
        n, c = kernel[0] * kernel[1], x.shape[3]
        self.ops.append(WindowSumPoolOp(f"t{outs[0]}:sum", x.slot, 0, kernel, stride, (0, 0)))
        table = self.one_op.run(k, _sum_inputs(n, kernel, c), (255 * n + 1, 1, 1, c),
                                valid_padding=True)
        self.sum_table(k, _Value(f"t{outs[0]}:sum", x.scale, 0, shape), f"t{outs[0]}:sum", outs,
                       table.reshape(-1, c), n)

    def mean(self, k, op, ins, outs):
        x = self.value(k, ins[0])
        axes = sorted(int(a) % 4 for a in self.f.data(ins[1], np.int32).reshape(-1))
        keep = self.f.options(op, "ReducerOptions").KeepDims()
        if len(x.shape) != 4 or axes != [1, 2]:
            raise self.fail(k, f"MEAN over axes {axes} of shape {list(x.shape)}; supported: the "
                               "spatial axes [1, 2] of an NHWC tensor")
        _, h, w, c = x.shape
        n, size = h * w, 255 * h * w + 1
        self.ops.append(SumPoolOp(f"t{outs[0]}:sum", x.slot, 0))
        table = self.one_op.run(k, _sum_inputs(n, (h, w), c), (size, 1, 1, c) if keep else (size, c))
        means = f"t{outs[0]}" if keep else f"t{outs[0]}:nchw"
        self.sum_table(k, _Value(f"t{outs[0]}:sum", x.scale, 0, (1, 1, 1, c)), f"t{outs[0]}:sum",
                       outs, table.reshape(size, c), n, means)
        if not keep:  # (1, C): the program's (N, C, 1, 1) flattened, order unchanged
            v = self.env[outs[0]]
            flat = self.flat(k, _Value(v.slot, v.scale, v.zero_point, (1, 1, 1, c)),
                             f"t{outs[0]}")
            self.env[outs[0]] = _Value(flat.slot, v.scale, v.zero_point, self.f.shape(outs[0]),
                                       flat.order)

    def concatenation(self, k, op, ins, outs):
        parts = [self.value(k, i) for i in ins]
        s_out, z_out = self.out_quant(outs[0])
        opts = self.f.options(op, "ConcatenationOptions")
        ndim = len(parts[0].shape)
        if any((p.scale, p.zero_point) != (s_out, z_out) for p in parts):
            raise self.fail(k, "CONCATENATION of inputs with other scales than the output's is "
                               "not supported")
        if opts.Axis() % ndim != ndim - 1 or ndim not in (2, 4) or opts.FusedActivationFunction():
            raise self.fail(k, "CONCATENATION supported along channels (the last axis), with no "
                               "activation")
        if ndim == 2 and any(not np.array_equal(p.order, np.arange(p.shape[1])) for p in parts
                             if p.order is not None):
            raise self.fail(k, "CONCATENATION of flattened image tensors is not supported")
        self.emit(ConcatOp(f"t{outs[0]}", tuple(p.slot for p in parts)), outs[0], s_out, z_out,
                  self.f.shape(outs[0]))

    def softmax(self, k, op, ins, outs):
        x = self.value(k, ins[0])
        if outs[0] not in self.final(k):
            raise self.fail(k, "SOFTMAX is supported as the last op only (or before the last "
                               "DEQUANTIZE)")
        self.softmax_out = outs[0]
        self.output = OutputOp(x.slot, torch.tensor(x.scale, dtype=torch.float64), x.zero_point)

    def dequantize(self, k, op, ins, outs):
        if ins[0] == self.softmax_out:  # float probabilities: the program keeps the logits
            return
        x = self.value(k, ins[0])
        if outs[0] != int(self.f.graph.Outputs(0)):
            raise self.fail(k, "DEQUANTIZE is supported as the last op only")
        self.output = OutputOp(x.slot, torch.tensor(x.scale, dtype=torch.float64), x.zero_point)

    def final(self, k: int) -> set[int]:
        """The model's output tensor, and the input of a DEQUANTIZE that is the last op."""
        g, out = self.f.graph, int(self.f.graph.Outputs(0))
        last = g.Operators(g.OperatorsLength() - 1)
        ok = {out}
        if self.f.op_name(last) == "DEQUANTIZE" and int(last.Outputs(0)) == out:
            ok.add(int(last.Inputs(0)))
        return ok


def input_table(program: Program, spec: InputSpec) -> np.ndarray:
    """(256,) int64: the file's input code of each pixel code. A float-input file quantizes
    ``p / 255`` itself (the program's first lookup holds what LiteRT's QUANTIZE computes); an
    int8 / uint8 input is fed the codes :func:`pixel_codes` computes."""
    if spec.dtype == "float32":
        first = next(op for op in program.ops if isinstance(op, LookupOp) and op.inp == "input")
        return first.table.numpy()
    return pixel_codes(spec.scale, spec.zero_point, spec.dtype)


def _runtime(buf: bytes, kernels: str, spec: InputSpec):
    """float images (N, C, H, W) in [0, 1] -> the file's outputs (N, classes), dequantized, by
    LiteRT; pixels are snapped to the 1/255 grid (round(255 x), half up, clipped) as qrobust's
    integer models see them. A float input is fed p / 255, an int8 / uint8 one the codes of
    :func:`pixel_codes`."""
    _, interpreter, _ = _need_packages()
    table = None if spec.dtype == "float32" else pixel_codes(spec.scale, spec.zero_point, spec.dtype)
    interp = interpreter.Interpreter(model_content=buf,
                                     experimental_op_resolver_type=_resolver(kernels))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    o_scale, o_zp = out["quantization"]

    def run(x) -> np.ndarray:
        p = pixel_grid(torch.as_tensor(np.asarray(x))).numpy().transpose(0, 2, 3, 1)  # NHWC
        feed = (_image_values()[p] if spec.dtype == "float32" else table[p].astype(spec.dtype))
        outs = []
        for image in feed:
            interp.set_tensor(inp["index"], image[None])
            interp.invoke()
            y = interp.get_tensor(out["index"])[0]
            outs.append((y.astype(np.float64) - o_zp) * o_scale if out["dtype"] != np.float32
                        else y.astype(np.float64))
        return np.stack(outs) if outs else np.zeros((0, int(np.prod(out["shape"][1:]))))

    return run


class TfliteRuntime:
    """The original file under LiteRT (builtin kernels) for an imported checkpoint: float images
    (N, C, H, W) in [0, 1] -> outputs (np.ndarray); refuses a file changed since the import."""

    def __init__(self, path: str | Path, digest: str, spec: InputSpec) -> None:
        from qrobust.integer.imports.base import check_unchanged

        check_unchanged(path, digest)
        self.path, self.spec = str(path), spec
        self._run = _runtime(Path(path).read_bytes(), "builtin", spec)

    def __call__(self, x) -> np.ndarray:
        return self._run(x)


def read_tflite(path: str | Path, kernels: str = "builtin", mean: tuple[float, ...] = (0.0,),
                std: tuple[float, ...] = (1.0,), layout: str | None = None,
                input_shape: tuple[int, int, int] | None = None) -> Imported:
    """Import an int8 TFLite file: its integer program (bit-exact with LiteRT's ``kernels``:
    "builtin" or "reference"), its input spec and its LiteRT runtime. TFLite inputs are NHWC
    (``layout`` is not asked) and read ``x = p / 255`` as it is (``mean`` 0, ``std`` 1: other
    values are refused); ``input_shape`` (C, H, W), when given, must be the file's. Raises a
    one-line :class:`ConfigError` for unsupported ops, malformed or truncated files."""
    if any(float(m) != 0.0 for m in mean) or any(float(v) != 1.0 for v in std):
        raise ConfigError("TFLite files are fed x = p / 255 as they are; --mean / --std other "
                          "than 0 / 1 are not supported for .tflite (fold the normalization "
                          "into the model before converting)")
    path = Path(path).resolve()
    _resolver(kernels)
    try:
        buf = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read TFLite file {path}: {e.strerror}") from None
    f = _parse(buf, str(path))
    try:
        imported = _import(f, path, kernels)
    except ConfigError:
        raise
    except Exception as e:  # reads past the end or of nonsense values (LiteRT's own check too)
        what = " ".join(str(e).split())
        raise ConfigError(f"{path}: malformed or truncated TFLite file ({type(e).__name__}: "
                          f"{what})") from None
    if input_shape is not None and tuple(input_shape) != imported.program.input_shape:
        raise ConfigError(f"{path}: the file takes images of shape (C, H, W) = "
                          f"{imported.program.input_shape}, the data has {tuple(input_shape)}")
    return imported


def _import(f: _File, path: Path, kernels: str) -> Imported:
    imp = _Importer(f, kernels)
    shape = imp.input()
    imp.lower()
    i = int(f.graph.Inputs(0))
    name = (f.tensors[i].Name() or b"input").decode(errors="replace")
    if imp.float_input is not None:  # the file reads x = p / 255 and quantizes it itself
        first = next(op for op in imp.ops if isinstance(op, LookupOp) and op.inp == "input")
        scale, zp = imp.codes[first.out].scale, imp.codes[first.out].zero_point
        spec = InputSpec((0.0,), (1.0,), "NHWC", name, scale, zp, "float32")
    else:
        scale, zp = imp.out_quant(i, ("INT8", "UINT8"))
        spec = InputSpec((0.0,), (1.0,), "NHWC", name, scale, zp, f.type(i).lower())
    program = Program(tuple(imp.ops), (shape[3], shape[1], shape[2]), imp.codes)
    runtime = _runtime(f.buf, kernels, spec)  # LiteRT loads the whole file: its check too
    return Imported(program, spec, str(path), hashlib.sha256(f.buf).hexdigest(), "tflite", runtime,
                    runtime_softmax=imp.softmax_out is not None)
