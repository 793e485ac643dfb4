"""The IntegerModel interface shared by the integer backends."""

from __future__ import annotations

import torch
from torch import nn

PIXEL_LEVELS = 255


def pixel_codes(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> int64 pixel codes round(255 x) (half up), clipped to [0, 255]."""
    return torch.clamp(torch.floor(x.detach().float() * PIXEL_LEVELS + 0.5), 0, PIXEL_LEVELS).long()


class IntegerModel(nn.Module):
    """A quantized model that computes in integers: float images or pixel codes -> logits.

    ``model(x)``: x float (N, C, H, W) in [0, 1] -> float32 logits (N, K), no autograd.
    ``model.forward_pixels(codes)``: integer codes on the 1/255 pixel grid (round(255 x)),
    any integer range (values outside [0, 255] are clipped inside the model) -> logits.
    """

    backend = "abstract"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pixels(pixel_codes(x))

    def forward_pixels(self, codes: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
