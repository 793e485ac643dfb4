"""Input filters: median, mean, Gaussian blur and bit-depth reduction, with BPDA surrogates.

Each filter maps images in [0, 1], shape (N, C, H, W), to images of the same shape, channel by
channel, with edge replication at the borders (scipy.ndimage ``mode="nearest"``). They are the
input-filtering half of Stochastic-Shield (Qendro et al., arXiv 2105.06512; filter type and size
are ours to choose, so all are parameters) and the classic input-transformation defenses that
BPDA breaks (Athalye et al., arXiv 1802.00420).

``differentiable`` says whether autograd through the filter gives useful gradients: mean and
Gaussian filters are linear, and the median is piecewise linear (each output is one of its
inputs; off ties autograd's gradient is the exact derivative), so all three are True.
Bit-depth reduction (rounding: zero gradient almost everywhere) is non-differentiable; its
``surrogate()`` is the identity (x' ~ x), the BPDA choice of Athalye et al. The median was
BPDA'd with the identity too until the CIFAR-10 study (benchmarks/results/defenses_cifar10.md)
showed PGD through the true median gradient far stronger than through the identity (Shield on
resnet20 at 2/255: 5% robust accuracy against 55%); its ``surrogate()`` remains available for
an explicit BPDA estimator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.defenses.base import DEFENSES, defend
from qrobust.errors import ConfigError


def _check_size(size: int) -> int:
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ConfigError(f"filter size must be a positive odd integer (1, 3, 5, ...), "
                          f"got {size!r}")
    return size


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    r = size // 2
    return F.pad(x, (r, r, r, r), mode="replicate") if r else x


def median_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Per-channel median over ``size x size`` windows; x (N, C, H, W) -> same shape."""
    _check_size(size)
    if size == 1:
        return x
    patches = _pad(x, size).unfold(2, size, 1).unfold(3, size, 1)  # N, C, H, W, k, k
    return patches.reshape(*x.shape, size * size).median(dim=-1).values


def _depthwise(x: torch.Tensor, kernel_2d: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    k = kernel_2d.to(dtype=x.dtype, device=x.device).expand(c, 1, *kernel_2d.shape)
    return F.conv2d(_pad(x, kernel_2d.shape[0]), k, groups=c)


def mean_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Per-channel box blur over ``size x size`` windows; x (N, C, H, W) -> same shape."""
    _check_size(size)
    return _depthwise(x, torch.full((size, size), 1.0 / (size * size), dtype=torch.float64))


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Normalized 2-D Gaussian kernel (size, size), float64, centred on the middle pixel."""
    _check_size(size)
    if not sigma > 0:
        raise ConfigError(f"Gaussian sigma must be > 0, got {sigma}")
    t = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def gaussian_filter(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian blur (truncated to ``size x size``); x (N, C, H, W) -> same shape."""
    return _depthwise(x, gaussian_kernel(size, sigma))


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round x in [0, 1] to the nearest of ``2**bits`` evenly spaced levels (Xu et al. 2017,
    feature squeezing, arXiv 1704.01155)."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"bit depth must be an integer in 1..8, got {bits!r}")
    levels = 2**bits - 1
    return torch.round(x.clamp(0, 1) * levels) / levels


class MedianFilter(nn.Module):
    randomized = False
    differentiable = True  # piecewise linear: autograd selects the median's input pixel

    def __init__(self, size: int = 3) -> None:
        super().__init__()
        self.size = _check_size(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return median_filter(x, self.size)

    def surrogate(self) -> nn.Module:
        return nn.Identity()

    def extra_repr(self) -> str:
        return f"size={self.size}"


class MeanFilter(nn.Module):
    randomized = False
    differentiable = True

    def __init__(self, size: int = 3) -> None:
        super().__init__()
        self.size = _check_size(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_filter(x, self.size)

    def surrogate(self) -> nn.Module:
        return self

    def extra_repr(self) -> str:
        return f"size={self.size}"


class GaussianFilter(nn.Module):
    """Gaussian blur; ``sigma=None`` uses OpenCV's rule 0.3 * ((size - 1) / 2 - 1) + 0.8."""

    randomized = False
    differentiable = True

    def __init__(self, size: int = 3, sigma: float | None = None) -> None:
        super().__init__()
        self.size = _check_size(size)
        self.sigma = float(sigma) if sigma is not None else 0.3 * ((size - 1) / 2 - 1) + 0.8
        self.register_buffer("kernel", gaussian_kernel(self.size, self.sigma).float(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _depthwise(x, self.kernel)

    def surrogate(self) -> nn.Module:
        return self

    def extra_repr(self) -> str:
        return f"size={self.size}, sigma={self.sigma:.3g}"


class BitDepth(nn.Module):
    randomized = False
    differentiable = False

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        bit_depth(torch.zeros(1), bits)  # validate
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bit_depth(x, self.bits)

    def surrogate(self) -> nn.Module:
        return nn.Identity()

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


FILTERS: dict[str, type[nn.Module]] = {"median": MedianFilter, "mean": MeanFilter,
                                       "gaussian": GaussianFilter, "bit-depth": BitDepth}


def _register(name: str, cls: type[nn.Module]) -> None:
    DEFENSES.register(name)(lambda model, **params: defend(model, cls(**params)))


for _name, _cls in FILTERS.items():
    _register(_name, _cls)
