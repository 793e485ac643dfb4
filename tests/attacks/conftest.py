"""Fixtures for attack tests: tiny models trained on the embedded digits data in seconds."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class Scaled(nn.Module):
    """Logits multiplied by a constant: same decisions, saturated softmax (gradient masking)."""

    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.factor


class Binarize(nn.Module):
    """1-bit input quantizer without a straight-through estimator: zero gradient everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0.5).to(x.dtype)


def train_mlp(x: torch.Tensor, y: torch.Tensor, pre: nn.Module | None = None,
              epochs: int = 60, seed: int = 0) -> nn.Module:
    """A 64-64-10 MLP trained full-batch with Adam (a second or two on one core)."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 64), nn.ReLU(), nn.Linear(64, 10))
    model = nn.Sequential(pre, body) if pre is not None else body
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for i in range(0, len(y), 256):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 256]), y[i:i + 256]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_data(digits):
    xtr, ytr = digits.train.tensors()
    xte, yte = digits.test.tensors()
    return xtr, ytr, xte, yte


@pytest.fixture(scope="session")
def mlp(digits_data):
    xtr, ytr, _, _ = digits_data
    return train_mlp(xtr, ytr)


@pytest.fixture(scope="session")
def binary_mlp(digits_data):
    """An MLP trained on 1-bit inputs: its input gradient is exactly zero."""
    xtr, ytr, _, _ = digits_data
    return train_mlp(xtr, ytr, pre=Binarize())
