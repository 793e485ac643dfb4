"""Running an ONNX int8 model: the ONNX Runtime session, what ORT fused it into, its int8
kernels on this CPU, and :class:`OnnxIntegerModel`, the ``onnx`` integer backend."""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx
import torch
from torch import nn

from qrobust.integer.base import IntegerModel
from qrobust.integer.int8 import Int8Kernels, kernels
from qrobust.integer.onnx.formats import export_int8, lower_for_export, weight_types
from qrobust.integer.program import input_codes

log = logging.getLogger(__name__)


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


class ExportedIntegerModel(IntegerModel):
    """An integer program exported as an int8 graph (``self.proto``) and run by a runtime
    whose int8 kernels on this CPU are ``self.kernels``: subclasses set both and ``run``."""

    program: object
    proto: onnx.ModelProto
    kernels: Int8Kernels

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Logits (N, classes) of uint8 input codes (N, C, H, W), in an array of its own."""
        raise NotImplementedError

    def deployment(self) -> dict:
        return {**super().deployment(), **self.kernels.to_dict(),
                "weight_types": weight_types(self.proto)}

    @torch.no_grad()
    def forward_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        u8 = input_codes(self.program.input_op, codes).to(torch.uint8).numpy()
        return torch.from_numpy(self.run(u8))


class OnnxIntegerModel(ExportedIntegerModel):
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

    def run(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"pixels": pixels})[0]
