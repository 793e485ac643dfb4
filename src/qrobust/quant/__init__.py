"""Quantization: the k-bit fake-quant twin (PTQ, QAT) and the integer model that matches it.

``quantize(model, recipe, calib)`` -> twin (float images in [0, 1] -> logits, STE gradients);
``to_integer(twin, backend='reference' | 'onnx' | 'openvino')`` -> :class:`IntegerModel`.
See docs/quantization.md for the formulas, the requantization scheme and the tolerance.
"""

from qrobust.integer.base import IntegerModel
from qrobust.quant import functional
from qrobust.quant.checkpoint import save_quantized
from qrobust.quant.convert import QuantTwin, calibrate, quantize, set_generator, to_integer, widen_input
from qrobust.quant.functional import fake_quantize, round_ste, stochastic_round
from qrobust.quant.modules import QuantAct, QuantConv2d, QuantInput, QuantLinear
from qrobust.quant.observers import OBSERVERS, observe
from qrobust.quant.spec import Override, QuantSpec, Recipe, parse_recipe, resolve_reduce_range

__all__ = [
    "OBSERVERS", "IntegerModel", "Override", "QuantAct", "QuantConv2d", "QuantInput",
    "QuantLinear", "QuantSpec", "QuantTwin", "Recipe", "calibrate", "fake_quantize", "functional", "observe",
    "parse_recipe", "quantize", "resolve_reduce_range", "round_ste", "save_quantized", "set_generator",
    "stochastic_round",
    "to_integer", "widen_input",
]
