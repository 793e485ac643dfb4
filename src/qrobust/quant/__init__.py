"""Quantization: the k-bit fake-quant twin (PTQ, QAT) and the integer model that matches it.

``quantize(model, recipe, calib)`` -> twin (float images in [0, 1] -> logits, STE gradients);
its integer model is :func:`qrobust.integer.to_integer` (one layer up: integer imports quant).
See docs/quantization.md for the formulas, the requantization scheme and the tolerance.
"""

from qrobust.quant import functional
from qrobust.quant.checkpoint import save_quantized
from qrobust.quant.convert import QuantTwin, calibrate, quantize, set_generator, widen_input
from qrobust.quant.functional import fake_quantize, round_ste, stochastic_round
from qrobust.quant.modules import QuantAct, QuantConv2d, QuantInput, QuantLinear
from qrobust.quant.observers import OBSERVERS, observe
from qrobust.quant.spec import (
    FLOAT_RECIPES,
    Override,
    QuantSpec,
    Recipe,
    parse_recipe,
    recipe_bits,
    resolve_reduce_range,
)
from qrobust.quant.twin import MidriseWeights, make_twin
from qrobust.quant.user import quantize_user, user_model_meta

__all__ = [
    "FLOAT_RECIPES", "OBSERVERS", "MidriseWeights", "make_twin", "Override", "QuantAct", "QuantConv2d", "QuantInput",
    "QuantLinear", "QuantSpec", "QuantTwin", "Recipe", "calibrate", "fake_quantize", "functional", "observe",
    "parse_recipe", "quantize", "recipe_bits", "resolve_reduce_range", "round_ste", "save_quantized", "set_generator",
    "stochastic_round", "quantize_user", "user_model_meta",
    "widen_input",
]
