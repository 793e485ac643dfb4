"""Every call the study runner makes into quant / attacks / defenses, in one place.

The grid (``qrobust.eval.grid``) never imports those packages directly: when their APIs
move, only this module changes.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qrobust.quant.spec import FLOAT_RECIPES, recipe_bits

log = logging.getLogger(__name__)


# -- names (config validation) ----------------------------------------------------------------
# -- quantization -------------------------------------------------------------------------
class MidriseWeights(nn.Module):
    """Linear/Conv2d whose weight and bias are clamped to [-1, 1] and rounded to the 2^bits
    uniform levels -1 + k * 2/(2^bits - 1), k = 0..2^bits-1 (a mid-rise grid without a zero
    level; bits=1 gives {-1, +1}); straight-through gradient inside [-1, 1]."""

    def __init__(self, layer: nn.Module, bits: int) -> None:
        super().__init__()
        self.layer, self.bits = layer, bits

    def q(self, w: torch.Tensor) -> torch.Tensor:
        step = 2.0 / (2**self.bits - 1)
        c = w.clamp(-1.0, 1.0)
        return c + (-1.0 + step * torch.round((c + 1.0) / step) - c).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        bias = None if layer.bias is None else self.q(layer.bias)
        if isinstance(layer, nn.Conv2d):
            return nn.functional.conv2d(x, self.q(layer.weight), bias, layer.stride,
                                        layer.padding, layer.dilation, layer.groups)
        return nn.functional.linear(x, self.q(layer.weight), bias)


def midrise_twin(model: nn.Module, bits: int) -> nn.Module:
    """Every Linear/Conv2d of a copy of ``model`` wrapped in :class:`MidriseWeights`."""
    twin = copy.deepcopy(model)

    def rewrite(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                setattr(module, name, MidriseWeights(child, bits))
            else:
                rewrite(child)

    rewrite(twin)
    return twin.eval()


def make_twin(model: nn.Module, recipe: str, calib: torch.Tensor | None,
              gorsline_grid: str = "symmetric") -> nn.Module:
    """The fake-quant twin of ``model`` (float [0,1] NCHW -> logits, STE gradients), a new
    module; ``fp32``/``float`` give a copy of the float model.

    ``gorsline_grid="midrise"`` makes ``gorslineB`` recipes use :class:`MidriseWeights`
    (2^B levels in [-1, 1], no zero level) instead of ``qrobust.quant``'s symmetric grid
    (2^(B-1)-1 levels per side and zero). Gorsline et al. do not state their grid; the
    symmetric one rounds default-initialised weights (|w| ~ 0.04) to zero for B = 2..5, so
    quantization-aware training from scratch never starts (measured: 8% on digits at B=2)."""
    if recipe in FLOAT_RECIPES:
        return copy.deepcopy(model).eval()
    m = re.fullmatch(r"gorsline(\d+)", recipe)
    if m and gorsline_grid == "midrise":
        return midrise_twin(model, int(m.group(1)))
    from qrobust.quant import quantize

    return quantize(model, recipe, calib=calib)


def make_integer(twin: nn.Module, recipe: str, backend: str) -> tuple[Callable | None, str | None]:
    """(integer model, None) or (None, the reason there is none)."""
    if recipe in FLOAT_RECIPES:
        return None, None
    if recipe_bits(recipe)[1] is None:
        return None, f"recipe '{recipe}' keeps activations float: no integer-only model"
    from qrobust.integer import to_integer

    try:
        return to_integer(twin, backend=backend), None
    except Exception as err:  # noqa: BLE001 - any conversion failure becomes a recorded note
        log.warning("to_integer(%s) failed: %s", recipe, err)
        return None, f"to_integer failed for '{recipe}': {type(err).__name__}: {err}"


# -- defenses ---------------------------------------------------------------------------------
def defend(model: Any, name: str, params: dict) -> Any:
    """``DEFENSES.get(name)(model, **params)``; ``none`` returns ``model``."""
    if name == "none":
        return model
    from qrobust.defenses import DEFENSES

    return DEFENSES.get(name)(model, **params)


# -- attacks ----------------------------------------------------------------------------------
def make_attack(name: str, model: Any, norm: str, eps: float, params: dict) -> Any:
    """``ATTACKS.get(name)(model, ThreatModel(norm, eps), **params)``: the attack picks EOT for
    randomized and BPDA for non-differentiable defenses itself (``auto_estimator``);
    ``params["eot_samples"]`` sets the number of EOT draws (default 10)."""
    from qrobust.attacks import ThreatModel
    from qrobust.attacks import make_attack as build

    return build(name, model, ThreatModel(norm, eps), params)


def attack_points(attack: Any, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """x_adv for every point of x (callers pass only points still robust) and the summed
    gradient statistics (and a suite's per-stage breaks) of the attack loop."""
    from qrobust.attacks.evaluate import _attack_points

    return _attack_points(attack, x, y, torch.arange(len(y)), batch_size, generator, False)


def describe(attack: Any) -> dict:
    return attack.describe()


def masking_warnings(model: Any, attack: Any, x: torch.Tensor, stats: dict) -> list[str]:
    """``qrobust.attacks.checks`` that need only this cell: vanishing gradients, and a random
    model attacked without EOT."""
    from qrobust.attacks import checks

    found = checks.vanishing_gradients(stats["zero_grad_fraction"], stats["small_grad_fraction"])
    is_random = checks.output_is_random(model, x[:64]) if len(x) else False
    found += checks.randomness_under_deterministic_attack(is_random,
                                                          describe(attack)["estimator"])
    return found


def accuracy_rises_with_eps(eps: list[float], acc: list[float], tolerance: float) -> list[str]:
    from qrobust.attacks import checks

    return checks.accuracy_rises_with_eps(eps, acc, tolerance)
