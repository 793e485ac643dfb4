"""Registered architectures: ``mlp`` (Gorsline 784-100-10), ``small-cnn``, ``resnet20``.

All models are plain ``nn.Module`` trees whose activations are ``nn.ReLU`` modules (never
functional calls) and whose first layer is ``Normalize``: quantization and the defenses
rewrite models by module, and attacks always work in [0, 1] pixel space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from qrobust.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an architecture (stored in checkpoint metadata)."""

    arch: str
    input_shape: tuple[int, int, int]
    num_classes: int = 10
    dropout: float = 0.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        d = dict(d)
        for key in ("input_shape", "mean", "std"):
            d[key] = tuple(d[key])
        return cls(**d)


class Normalize(nn.Module):
    """(x - mean) / std per channel; x in [0, 1], shape (N, C, H, W)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


MODELS: Registry[Callable[[ModelSpec], nn.Module]] = Registry("model")


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model for ``spec`` (seed torch beforehand for reproducibility)."""
    return MODELS.get(spec.arch)(spec)


def _dropout(p: float) -> list[nn.Module]:
    return [nn.Dropout(p)] if p > 0 else []


@MODELS.register("mlp")
def mlp(spec: ModelSpec) -> nn.Module:
    """Gorsline et al. (arXiv 2105.00227): flatten -> Linear(d, 100) -> ReLU -> Linear(100, k)."""
    c, h, w = spec.input_shape
    hidden = spec.kwargs.get("hidden", 100)
    return nn.Sequential(
        Normalize(spec.mean, spec.std), nn.Flatten(),
        nn.Linear(c * h * w, hidden), nn.ReLU(), *_dropout(spec.dropout),
        nn.Linear(hidden, spec.num_classes),
    )


@MODELS.register("small-cnn")
def small_cnn(spec: ModelSpec) -> nn.Module:
    """Three 3x3 conv layers and two max-pools, for 8x8 digits up to 32x32 images."""
    c, h, w = spec.input_shape
    width = spec.kwargs.get("width", 32)
    return nn.Sequential(
        Normalize(spec.mean, spec.std),
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (h // 4) * (w // 4), 128), nn.ReLU(), *_dropout(spec.dropout),
        nn.Linear(128, spec.num_classes),
    )


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn + shortcut, then ReLU. Projection shortcut (1x1 conv + BN) when
    the shape changes, so that every op maps onto integer conv kernels."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.relu1(self.bn1(self.conv1(x))))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


@MODELS.register("resnet20")
def resnet20(spec: ModelSpec) -> nn.Module:
    """ResNet-20 for CIFAR (He et al. 2016, 3 stages x 3 blocks, 16/32/64 channels)."""
    c = spec.input_shape[0]
    layers: list[nn.Module] = [Normalize(spec.mean, spec.std),
                               nn.Conv2d(c, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    c_in = 16
    for c_out, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(BasicBlock(c_in, c_out, stride if i == 0 else 1, spec.dropout))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, spec.num_classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model
