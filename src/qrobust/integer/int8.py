"""Whether a runtime's u8 x s8 kernels are exact on this CPU, and which layers it matters for.

Without VNNI, x86 int8 kernels add each pair of uint8 x int8 products in saturating int16
(``vpmaddubsw``; :mod:`qrobust.hardware`). A layer is safe anyway when no two weights of one
output channel can push a pair past int16 for inputs in [0, 255] (:func:`u8s8_safe`): weights of
at most 7 bits (|w| <= 63: 255 x 126 = 32130) always are, which is what ONNX Runtime's
``reduce_range`` and NNCF's overflow fix do, and what ``reduce-range`` recipes do here. Other
layers need a kernel without the int16 step: ONNX Runtime's u8 x u8 kernels (weights stored as
uint8 with zero point 128) widen to int16 before multiplying and are exact everywhere.

:func:`saturates` asks the runtime itself: a 1x1 convolution of 64 inputs at code 255 with
weights 127 must give the output code 200; a saturating kernel gives 101.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qrobust.hardware import CpuInfo, cpu_info

INT16_MAX = 32767
U8_MAX = 255
PROBE_CHANNELS = 64
PROBE_EXACT_CODE = 200


def pair_sum_bound(weight: torch.Tensor, x_max: int = U8_MAX) -> int:
    """The largest |x_a w_a + x_b w_b| over any two weights of one output channel (axis 0) and
    inputs x in [0, x_max]: the worst int16 pair sum, whatever order a kernel packs K in."""
    w = weight.reshape(weight.shape[0], -1).long()
    k = min(2, w.shape[1])
    pos = w.clamp(min=0).topk(k, dim=1).values.sum(1)
    neg = (-w).clamp(min=0).topk(k, dim=1).values.sum(1)
    return int(torch.maximum(pos, neg).max()) * x_max


def u8s8_safe(weight: torch.Tensor) -> bool:
    """True when a u8 x s8 kernel with int16 pair sums computes this layer exactly."""
    return pair_sum_bound(weight) <= INT16_MAX


@dataclass(frozen=True)
class Int8Kernels:
    """How one runtime's u8 x s8 kernels behave here: ``probe_saturates`` (the runtime's own
    answer) and the CPU's flags; exact only when both say so."""

    runtime: str
    cpu: CpuInfo
    probe_saturates: bool

    @property
    def exact_u8s8(self) -> bool:
        return not (self.probe_saturates or self.cpu.u8s8_pairs_saturate)

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "cpu": self.cpu.to_dict(),
                "u8s8_probe_saturates": self.probe_saturates, "u8s8_exact": self.exact_u8s8}


def probe_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """QDQ ``x (1, 64, 2, 4) uint8 -> DQ -> Conv 1x1 (int8 weights 127) -> Q -> DQ``: every
    output is (64 x 255 x 127) / scale = code 200 when exact, 101 when pairs saturate."""
    exact = PROBE_CHANNELS * U8_MAX * 127
    out_ch = 16
    consts = {
        "xs": np.array(1.0, np.float32), "xz": np.array(0, np.uint8),
        "w": np.full((out_ch, PROBE_CHANNELS, 1, 1), 127, np.int8),
        "ws": np.ones(out_ch, np.float32), "wz": np.zeros(out_ch, np.int8),
        "ys": np.array(exact / PROBE_EXACT_CODE, np.float32), "yz": np.array(0, np.uint8),
    }
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0),
             helper.make_node("Conv", ["xf", "wf"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    shape = [1, PROBE_CHANNELS, 2, 4]
    graph = helper.make_graph(
        nodes, "qrobust-u8s8-probe", [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto, np.full(shape, U8_MAX, np.uint8)


def saturates(run: Callable[[onnx.ModelProto, np.ndarray], np.ndarray]) -> bool:
    """Run the probe with ``run(proto, x) -> float output``; True when the codes are wrong."""
    proto, x = probe_model()
    scale = float(numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "ys")))
    codes = np.rint(np.asarray(run(proto, x), dtype=np.float64) / scale)
    return not bool(np.all(codes == PROBE_EXACT_CODE))


def kernels(runtime: str, run: Callable[[onnx.ModelProto, np.ndarray], np.ndarray],
            cpu: CpuInfo | None = None) -> Int8Kernels:
    return Int8Kernels(runtime, cpu or cpu_info(), saturates(run))
