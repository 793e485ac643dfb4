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

import onnx
import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.integer.base import IntegerModel
from qrobust.integer.onnx import export_int8, lower_for_export
from qrobust.integer.program import input_codes


def compile_onnx(proto: onnx.ModelProto, threads: int | None = None):
    """An OpenVINO CPU compiled model for ``proto``, float parts in float32 (not bf16)."""
    try:
        import openvino as ov
    except ImportError as err:  # optional dependency
        raise ConfigError("the openvino backend needs OpenVINO: pip install 'qrobust[openvino]'") from err
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    return core.compile_model(core.read_model(proto.SerializeToString(), b""), "CPU", config)


class OpenVinoIntegerModel(IntegerModel):
    """OpenVINO int8 execution of a calibrated 8-bit twin (input shape fixed at export)."""

    backend = "openvino"

    def __init__(self, twin: nn.Module, input_shape: tuple[int, int, int] | None = None,
                 threads: int | None = None) -> None:
        super().__init__()
        self.program = lower_for_export(twin, input_shape, "openvino")
        self.widened = self.program.input_op.step > 1
        self.proto = export_int8(self.program, "qdq-rounded-add")
        self.compiled = compile_onnx(self.proto, threads)

    @torch.no_grad()
    def forward_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        u8 = input_codes(self.program.input_op, codes).to(torch.uint8).numpy()
        return torch.from_numpy(self.compiled({"pixels": u8})[self.compiled.output(0)].copy())
