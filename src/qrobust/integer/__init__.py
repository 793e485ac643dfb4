"""Integer execution of quantized twins: the exact reference executor, ONNX Runtime int8 and
(optional) OpenVINO int8.

``BACKENDS``: name -> factory ``(twin, **options) -> IntegerModel``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qrobust.integer.base import IntegerModel, pixel_codes
from qrobust.integer.program import Program, lower
from qrobust.registry import Registry

BACKENDS: Registry[Callable[..., IntegerModel]] = Registry("integer backend")


@BACKENDS.register("reference")
def _reference(twin: nn.Module, **options) -> IntegerModel:
    from qrobust.integer.reference import ReferenceIntegerModel

    return ReferenceIntegerModel(twin, **options)


@BACKENDS.register("onnx")
def _onnx(twin: nn.Module, **options) -> IntegerModel:
    from qrobust.integer.onnx import OnnxIntegerModel

    return OnnxIntegerModel(twin, **options)


@BACKENDS.register("openvino")
def _openvino(twin: nn.Module, **options) -> IntegerModel:
    from qrobust.integer.openvino import OpenVinoIntegerModel

    return OpenVinoIntegerModel(twin, **options)


__all__ = ["BACKENDS", "IntegerModel", "Program", "lower", "pixel_codes"]
