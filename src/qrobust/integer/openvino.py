"""OpenVINO int8 backend: the same ONNX QDQ program, run by OpenVINO's CPU integer kernels.

A second deployment runtime beside ONNX Runtime (optional: ``pip install 'qrobust[openvino]'``).
OpenVINO reads the ONNX graph, recognises the Q/DQ pairs and runs the convolutions on uint8 x
int8 with int32 accumulation; its kernels (oneDNN) are blocked for small channel counts too, so
on resnet20's 16-channel stage it is faster than ORT (docs/quantization.md, "Speed").

Fidelity: OpenVINO fuses ``conv -> QuantizeLinear -> DequantizeLinear -> Add -> QuantizeLinear``
into one kernel with a sum post-op and drops the rounding of the conv output that the graph
asks for (measured on the CIFAR-10 resnet20: 34% of the first residual block's codes moved by
1 LSB, 0.8% of predictions changed). The backend therefore runs the ``qdq-rounded-add`` export,
which writes that rounding out as float ``Round``/``Clip`` ops that OpenVINO keeps as post-ops.
Non-integer parts run in float32 (``INFERENCE_PRECISION_HINT``), never bf16. Same limits as
ORT: 8-bit activations, symmetric weights of at most 8 bits.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from torch import nn

from qrobust.errors import ConfigError
from qrobust.integer.int8 import Int8Kernels, kernels
from qrobust.integer.onnx import export_int8, lower_for_export, weight_types
from qrobust.integer.onnx.session import ExportedIntegerModel


def require_openvino():
    """The openvino module, or a ConfigError that says how to install it (optional extra)."""
    try:
        import openvino as ov
    except ImportError as err:
        raise ConfigError("the openvino backend needs OpenVINO: pip install 'qrobust[openvino]'") from err
    return ov


def compile_onnx(proto: onnx.ModelProto, threads: int | None = None):
    """An OpenVINO CPU compiled model for ``proto``, float parts in float32 (not bf16)."""
    ov = require_openvino()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    return core.compile_model(core.read_model(proto.SerializeToString(), b""), "CPU", config)


@functools.cache
def int8_kernels() -> Int8Kernels:
    """OpenVINO's u8 x s8 convolution kernels on this CPU (probed once per process)."""
    ov = require_openvino()

    def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
        compiled = compile_onnx(proto, threads=1)
        return compiled({"x": x})[compiled.output(0)]

    return kernels(f"openvino {ov.__version__}", run)


class OpenVinoIntegerModel(ExportedIntegerModel):
    """OpenVINO int8 execution of a calibrated 8-bit twin (input shape fixed at export).

    OpenVINO has no exact integer kernel for weights whose u8 x s8 pair sums can saturate on a
    CPU without VNNI (given uint8 weights it falls back to float convolutions): such a twin is
    refused with the fix (a ``reduce-range`` recipe, or the onnx backend)."""

    backend = "openvino"

    def __init__(self, twin: nn.Module, input_shape: tuple[int, int, int] | None = None,
                 threads: int | None = None) -> None:
        super().__init__(twin)
        require_openvino()
        self.program = lower_for_export(twin, input_shape, "openvino")
        self.widened = self.program.input_op.step > 1
        self.kernels = int8_kernels()
        self.proto = export_int8(self.program, "qdq-rounded-add", self.kernels.exact_u8s8)
        unsafe = weight_types(self.proto).count("uint8")
        if unsafe:
            raise ConfigError(
                f"{self.kernels.runtime} cannot run this model exactly on this CPU "
                f"({self.kernels.cpu.describe()}): without VNNI its u8 x s8 kernels add product "
                f"pairs in saturating int16, which {unsafe} of {len(weight_types(self.proto))} "
                "layers' weights can overflow. Quantize with 7-bit "
                "weights (recipe 'w8a8,reduce-range', or `qrobust quantize --reduce-range on`), or "
                "use the onnx backend (exact u8 x u8 kernels)")
        self.compiled = compile_onnx(self.proto, threads)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        # a copy: OpenVINO reuses its output buffer on the next request
        return self.compiled({"pixels": pixels})[self.compiled.output(0)].copy()
