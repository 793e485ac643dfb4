"""Datasets as uint8 arrays in memory; float [0, 1] NCHW tensors out.

Every dataset here is small enough to live in memory as uint8 (CIFAR-10: 150 MB), so
batching is plain tensor indexing: no worker processes, no per-sample Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from qrobust.errors import DataError


@dataclass(frozen=True)
class Split:
    """Images ``x`` uint8 (N, C, H, W) and integer labels ``y`` (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.dtype != np.uint8 or self.x.ndim != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.x.dtype} {self.x.shape}")
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise DataError(f"labels must be (N,) with N={len(self.x)}, got {self.y.shape}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray | slice) -> Split:
        return Split(self.x[index], self.y[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1], shape (N, C, H, W), and int64 labels."""
        return to_float(torch.from_numpy(self.x)), torch.from_numpy(self.y.astype(np.int64))


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    classes: tuple[str, ...]
    source: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def channel_stats(self, max_images: int = 10_000) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images in [0, 1] (for Normalize)."""
        x = self.train.x[:max_images].astype(np.float64) / 255.0
        return x.mean(axis=(0, 2, 3)).tolist(), x.std(axis=(0, 2, 3)).tolist()


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    return x.to(torch.float32).div_(255.0)


def train_val_split(split: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Deterministic shuffled split; the same seed always gives the same partition."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(split))
    n_val = int(round(val_fraction * len(split)))
    return split.subset(np.sort(order[n_val:])), split.subset(np.sort(order[:n_val]))


def take(split: Split, n: int | None, seed: int = 0) -> Split:
    """The first ``n`` points of a fixed seeded permutation (all points if n is None)."""
    if n is None or n >= len(split):
        return split
    order = np.random.default_rng(seed).permutation(len(split))[:n]
    return split.subset(np.sort(order))


def batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float images in [0, 1], int64 labels) batches."""
    x = torch.from_numpy(split.x)
    y = torch.from_numpy(split.y.astype(np.int64))
    order = torch.randperm(len(y), generator=generator) if shuffle else torch.arange(len(y))
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        yield to_float(x[idx]), y[idx]
