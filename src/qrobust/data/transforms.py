"""Batched tensor augmentations. Every random function takes an explicit generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the input size at a random offset per image."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (n, 1, 1, w)
    batch = torch.arange(n)[:, None, None, None]
    chan = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flip each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """Additive N(0, sigma^2) noise in [0, 1] pixel space (no clipping: as in Cohen et al.)."""
    return x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)
