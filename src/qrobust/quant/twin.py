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
    level; bits=1 gives {-1, +1}); straight-through gradient inside [-1, 1].

    ``scaling`` names a reading of Gorsline et al.'s unstated details:
    ``"none"``: the grid as is; ``"fanin"``: the layer's product with its input is divided by
    sqrt(fan-in) (a fixed constant, the scale a default initialisation gives: with +-1
    weights, 784 inputs otherwise give logits in the hundreds and saturate the softmax);
    ``"scaled"``: the grid is scaled by alpha = max|w| (at most 1; mean|w| at 1 bit, the
    scaled binary weights of XNOR-Net), so the levels follow the weights' range."""

    def __init__(self, layer: nn.Module, bits: int, scaling: str = "none") -> None:
        super().__init__()
        self.layer, self.bits, self.scaling = layer, bits, scaling
        self.gain = 1.0
        if scaling == "fanin":
            self.gain = float(layer.weight[0].numel()) ** -0.5

    def q(self, w: torch.Tensor, scaled: bool = False) -> torch.Tensor:
        alpha = torch.ones(())
        if scaled:
            a = w.detach().abs()
            alpha = (a.mean() if self.bits == 1 else a.max()).clamp(1e-8, 1.0)
        step = 2.0 / (2**self.bits - 1)
        c = (w / alpha).clamp(-1.0, 1.0)
        return alpha * (c + (-1.0 + step * torch.round((c + 1.0) / step) - c).detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, scaled = self.layer, self.scaling == "scaled"
        w = self.q(layer.weight, scaled) * self.gain
        bias = None if layer.bias is None else self.q(layer.bias)
        if isinstance(layer, nn.Conv2d):
            return nn.functional.conv2d(x, w, bias, layer.stride, layer.padding, layer.dilation,
                                        layer.groups)
        return nn.functional.linear(x, w, bias)


def midrise_twin(model: nn.Module, bits: int, scaling: str = "none") -> nn.Module:
    """Every Linear/Conv2d of a copy of ``model`` wrapped in :class:`MidriseWeights`."""
    twin = copy.deepcopy(model)

    def rewrite(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                setattr(module, name, MidriseWeights(child, bits, scaling))
            else:
                rewrite(child)

    rewrite(twin)
    return twin.eval()


def make_twin(model: nn.Module, recipe: str, calib: torch.Tensor | None,
              gorsline_grid: str = "symmetric") -> nn.Module:
    """The fake-quant twin of ``model`` (float [0,1] NCHW -> logits, STE gradients), a new
    module; ``fp32``/``float`` give a copy of the float model.

    ``gorsline_grid="midrise"`` makes ``gorslineB`` recipes use :class:`MidriseWeights`
    (2^B levels in [-1, 1], no zero level; ``midrise-fanin`` / ``midrise-scaled`` its
    readings with a fan-in or a weight-range scale) instead of ``qrobust.quant``'s symmetric grid
    (2^(B-1)-1 levels per side and zero). Gorsline et al. do not state their grid; the
    symmetric one rounds default-initialised weights (|w| ~ 0.04) to zero for B = 2..5, so
    quantization-aware training from scratch never starts (measured: 8% on digits at B=2)."""
    if recipe in FLOAT_RECIPES:
        return copy.deepcopy(model).eval()
    m = re.fullmatch(r"gorsline(\d+)", recipe)
    if m and gorsline_grid.startswith("midrise"):
        scaling = gorsline_grid.partition("-")[2] or "none"
        return midrise_twin(model, int(m.group(1)), scaling)
    return quantize(model, recipe, calib=calib)
