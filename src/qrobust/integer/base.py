"""The IntegerModel interface shared by the integer backends."""

from __future__ import annotations

import torch
from torch import nn

PIXEL_LEVELS = 255


def pixel_codes(x: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Float images in [0, 1] -> int64 pixel codes round(255 x) (half up), clipped to [0, 255]
    (``clip=False``: any real values, e.g. noisy images, on the same 1/255 grid)."""
    codes = torch.floor(x.detach().float() * PIXEL_LEVELS + 0.5)
    return (torch.clamp(codes, 0, PIXEL_LEVELS) if clip else codes).long()


class IntegerModel(nn.Module):
    """A quantized model that computes in integers: float images or pixel codes -> logits.

    ``model(x)``: x float (N, C, H, W) in [0, 1] (or beyond, for a widened input) -> float32
    logits (N, K), no autograd.
    ``model.forward_pixels(codes)``: integer codes on the 1/255 pixel grid (round(255 x)),
    any integer range (clipped inside the model to its input window: [0, 255], or the wider
    one of a twin widened with :func:`qrobust.quant.widen_input`) -> logits.
    """

    backend = "abstract"
    widened = False  # True when the input window is wider than [0, 255] (widen_input)

    def __init__(self, twin: nn.Module | None = None) -> None:
        super().__init__()
        self.recipe: str | None = getattr(getattr(twin, "recipe", None), "text", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pixels(pixel_codes(x, clip=False))

    def forward_pixels(self, codes: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def deployment(self) -> dict:
        """What runs this model, for results and certificates: the backend, and for int8
        runtimes the runtime version, the CPU and whether its int8 kernels are exact here."""
        return {"backend": self.backend, "recipe": self.recipe}
