"""A model's fake-quant twin by recipe name, the one construction studies and commands use;
and the mid-rise weight grid of Gorsline et al.'s ``gorslineB`` recipes."""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from qrobust.quant.convert import quantize
from qrobust.quant.spec import FLOAT_RECIPES


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
    return quantize(model, recipe, calib=calib)
