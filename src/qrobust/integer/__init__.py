"""Integer execution of quantized twins: the exact reference executor, ONNX Runtime int8 and
(optional) OpenVINO int8.

``to_integer(twin, backend)``: the integer model of a twin; ``BACKENDS``: name -> factory
``(twin, **options) -> IntegerModel``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from qrobust.integer.base import IntegerModel, pixel_codes
from qrobust.integer.program import Program, lower
from qrobust.registry import Registry

log = logging.getLogger(__name__)

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


def integer_or_reason(twin: nn.Module, recipe: str, backend: str = "reference"
                      ) -> tuple[IntegerModel | None, str | None]:
    """(integer model, None), or (None, why there is none): a float recipe, float activations,
    or a conversion that failed (recorded with the results rather than stopping a study)."""
    from qrobust.quant.spec import FLOAT_RECIPES, recipe_bits

    if recipe in FLOAT_RECIPES:
        return None, None
    if recipe_bits(recipe)[1] is None:
        return None, f"recipe '{recipe}' keeps activations float: no integer-only model"
    try:
        return to_integer(twin, backend=backend), None
    except Exception as err:  # noqa: BLE001 - any conversion failure becomes a recorded note
        log.warning("to_integer(%s) failed: %s", recipe, err)
        return None, f"to_integer failed for '{recipe}': {type(err).__name__}: {err}"


@BACKENDS.register("openvino")
def _openvino(twin: nn.Module, **options) -> IntegerModel:
    from qrobust.integer.openvino import OpenVinoIntegerModel

    return OpenVinoIntegerModel(twin, **options)


__all__ = ["BACKENDS", "IntegerModel", "integer_or_reason", "to_integer", "Program", "lower", "pixel_codes"]
