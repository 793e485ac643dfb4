"""Integer execution of quantized twins: the exact reference executor, ONNX Runtime int8 and
(optional) OpenVINO int8.

``to_integer(twin, backend)``: the integer model of a twin; ``BACKENDS``: name -> factory
``(twin, **options) -> IntegerModel``.
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


def to_integer(twin: nn.Module, backend: str = "reference", **options) -> IntegerModel:
    """The integer model of a calibrated twin: ``backend`` 'reference' (exact integer executor,
    any bit width <= 8), 'onnx' (ONNX Runtime int8 kernels, 8-bit symmetric recipes) or
    'openvino' (OpenVINO int8 kernels, same recipes; optional dependency)."""
    return BACKENDS.get(backend)(twin, **options)


@BACKENDS.register("openvino")
def _openvino(twin: nn.Module, **options) -> IntegerModel:
    from qrobust.integer.openvino import OpenVinoIntegerModel

    return OpenVinoIntegerModel(twin, **options)


__all__ = ["BACKENDS", "IntegerModel", "Program", "lower", "pixel_codes"]
