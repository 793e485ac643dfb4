"""Integer-only randomized smoothing (IntRS; Lin, Lou, Xiong, Shahabi, ICCV 2021, arXiv 2108.09413).

Images become integer pixel codes c = round(255 x); integer noise Z is added to the codes
and the sum is classified by an integer model's ``forward_pixels`` (the IntegerModel of
:mod:`qrobust.quant`, or any object with that method). Nothing between the noise and the
classifier is a float, so float rounding cannot break the certificate.

Which base classifier (``clip``): a plain IntegerModel clips its input codes to [0, 255], so
it classifies clip(c + Z), not the unclipped noisy image float smoothing (and Gaussian data
augmentation) uses: -2.6 points of accuracy under noise on CIFAR-10 at sigma = 0.25.
:func:`integer_base` widens the twin's input window to [-6 sigma, 1 + 6 sigma] (coarser input
codes, 4 pixel codes apart at sigma = 0.25) so that it sees the unclipped noisy image;
``IntegerNoise(clip=False)`` then smooths it. Either way the certificate is sound: clipping
and coarsening are deterministic parts of the base classifier.

Noise (``kind``):

* ``"rounded-gaussian"`` (default): Z = round(G), G ~ N(0, sigma_int^2 I) (Voracek & Hein's
  route), sigma_int = 255 sigma;
* ``"discrete-gaussian"`` (IntRS): Z ~ N_Z(0, sigma_int^2)^d, also exactly by the
  Canonne-Kamath-Steinke sampler (``sampler="cks"``).

Both come from an exact 62-bit alias table. The default is the rounded Gaussian because its
radius needs no law-mismatch term: on CIFAR-10 (d = 3072, sigma = 0.25) the discrete
Gaussian's eta = 4.0e-4 lowers the largest radius n = 10^4 samples can certify from 0.800
to 0.766, which is where certified accuracy at r = 0.75 is decided.

Radius (docs/intrs_radius.md): the smoothed classifier with rounded-Gaussian noise *is*
Cohen et al.'s smoothed classifier of h(y) = f(clip(round(y))), so Cohen's radius holds
exactly for it. Any other noise law within total variation eta of it (the discrete Gaussian,
the 62-bit sampling table) gets R = sigma_int (PhiInv(p - eta) - PhiInv(1/2 + eta)) codes,
i.e. R / 255 in [0, 1] units, with eta bounded rigorously by :func:`radius_eta`. The
certificate covers perturbed images on the pixel grid (8-bit images).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

import mpmath
import torch

from qrobust.certify import stats
from qrobust.certify.noise import (
    PMFS,
    NoiseTable,
    discrete_gaussian_cks,
    discrete_gaussian_pmf,
    noise_table,
    rational_sigma2,
    rounded_gaussian_pmf,
)
from qrobust.errors import ConfigError
from qrobust.integer.base import pixel_codes  # round(255 x) half up, clipped: the model's own

PIXEL_LEVELS = 255
NOISE_KINDS = tuple(sorted(PMFS))


class PixelClassifier(Protocol):
    def forward_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes (N, C, H, W) -> logits (N, K)."""
        ...


@functools.lru_cache(maxsize=64)
def law_tv(kind: str, sigma2: Fraction, bound: int, dim: int) -> float:
    """Upper bound on TV(L^dim, R^dim), L = clip(kind noise), R = clip(round(N(0, sigma2))),
    both clipped to [-bound, bound]: min(dim * TV_1, sqrt(1 - BC_1^(2 dim))), with TV_1 and the
    Bhattacharyya coefficient BC_1 summed at 50 digits, then rounded up (x (1 + 1e-9))."""
    if kind == "rounded-gaussian":
        return 0.0
    if kind != "discrete-gaussian":
        raise ConfigError(f"unknown integer noise '{kind}'; valid: {', '.join(NOISE_KINDS)}")
    a, b = discrete_gaussian_pmf(sigma2, bound), rounded_gaussian_pmf(sigma2, bound)
    with mpmath.workdps(50):
        tv1 = mpmath.fsum(abs(p - q) for p, q in zip(a, b, strict=True)) / 2
        bc = mpmath.fsum(mpmath.sqrt(p * q) for p, q in zip(a, b, strict=True))
        hellinger = mpmath.sqrt(max(mpmath.mpf(0), 1 - bc ** (2 * dim)))
        bound_tv = min(dim * tv1, hellinger, mpmath.mpf(1))
    return float(bound_tv) * (1 + 1e-9) + 1e-30


def radius_eta(table: NoiseTable, dim: int, clipped: bool) -> float:
    """Total-variation budget eta between the sampled noise law on ``dim`` coordinates and the
    rounded Gaussian that the radius is derived for (docs/intrs_radius.md, "Bounding eta"):
    law mismatch + dim * table rounding (+ dim * P[|round(G)| >= bound] when not clipped)."""
    eta = law_tv(table.kind, table.sigma2, table.bound, dim) + dim * table.tv
    if not clipped:
        tail = rounded_gaussian_pmf(table.sigma2, table.bound)[0]
        eta += float(2 * dim * tail) * (1 + 1e-9) + 1e-30
    return eta


def tail_bound(sigma2: Fraction) -> int:
    """Default noise table bound for unclipped integer noise: 20 sigma_int codes (+1)."""
    return math.ceil(20 * math.sqrt(sigma2)) + 1


def noise_window(sigma: float, tails: float = 6.0) -> tuple[float, float]:
    """The pixel range [-tails sigma, 1 + tails sigma] a base classifier of noisy images must
    take unclipped (a coordinate leaves it with probability < 2e-9 at 6 sigma)."""
    return -tails * sigma, 1.0 + tails * sigma


def integer_base(twin, sigma: float, backend: str = "onnx", **options):
    """The IntegerModel of ``twin`` with its input widened to :func:`noise_window` (sigma): the
    base classifier for ``IntegerNoise(..., clip=False)``."""
    from qrobust.integer import to_integer
    from qrobust.quant import widen_input

    return to_integer(widen_input(twin, *noise_window(sigma)), backend=backend, **options)


def integer_noise(twin, sigma: float, kind: str = "rounded-gaussian", wide: bool = True,
                  backend: str = "onnx", **options) -> IntegerNoise:
    """Integer-only smoothing of ``twin``'s IntegerModel: of the unclipped noisy image
    (``wide``, :func:`integer_base`) or of codes clipped to [0, 255]. The input window and the
    noise clipping go together: a widened model needs ``clip=False`` noise."""
    from qrobust.integer import to_integer

    base = (integer_base(twin, sigma, backend, **options) if wide else
            to_integer(twin, backend=backend, **options))
    return IntegerNoise(base, sigma, kind=kind, clip=not wide)


@dataclass(frozen=True)
class IntegerNoise:
    """Integer-only noisy classifier for :class:`qrobust.certify.smoothing.Smoothed`.

    ``base``: has ``forward_pixels(codes)``; ``sigma``: noise std in [0, 1] units (sigma_int =
    255 sigma codes); ``kind``: ``rounded-gaussian`` (default: eta = 0 up to the table's
    ~1e-12, Cohen's radius exactly) or ``discrete-gaussian`` (IntRS; its law mismatch eta,
    4e-4 on CIFAR-10 at sigma 0.25, costs up to 0.034 radius at n = 10^4); ``clip``: the
    smoothed classifier is that of f(clip(codes, 0, 255)) (the IntegerModel clips anyway), which
    makes clipping the noise at +-255 exact. ``clip=False`` is for classifiers of wider
    integer inputs (:func:`integer_base`) or unbounded ones (tests): the table spans
    +-``bound`` codes (default 20 sigma_int) and its tail mass enters eta (~exp(-200)).
    ``sampler``: ``table`` (the fast alias table, default) or ``cks`` (the exact
    Canonne-Kamath-Steinke sampler, discrete Gaussian with clip=True only; about 100x slower,
    no table term in eta).
    """

    base: PixelClassifier
    sigma: float
    kind: str = "rounded-gaussian"
    clip: bool = True
    bound: int | None = None
    sampler: str = "table"
    table: NoiseTable = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ConfigError(f"unknown integer noise '{self.kind}'; valid: {', '.join(NOISE_KINDS)}")
        if self.sampler not in ("table", "cks"):
            raise ConfigError(f"unknown sampler '{self.sampler}'; valid: cks, table")
        if self.sampler == "cks" and (self.kind != "discrete-gaussian" or not self.clip):
            raise ConfigError("the exact CKS sampler draws the discrete Gaussian for a clipping "
                              "classifier: use kind='discrete-gaussian', clip=True")
        sigma2 = rational_sigma2(self.sigma, PIXEL_LEVELS)
        bound = self.bound or (PIXEL_LEVELS if self.clip else tail_bound(sigma2))
        if self.clip and bound < PIXEL_LEVELS:
            raise ConfigError(f"with clip=True the noise bound must be >= {PIXEL_LEVELS}")
        if self.clip and getattr(self.base, "widened", False):
            # noise clipped at +-255 is exact only for a model that clips codes to [0, 255]
            raise ConfigError("this integer model takes pixel codes beyond [0, 255] (a widened "
                              "input): smooth it with IntegerNoise(..., clip=False)")
        object.__setattr__(self, "table", noise_table(self.kind, sigma2, int(bound)))

    @property
    def sigma_int(self) -> float:
        return math.sqrt(self.table.sigma2)

    def noisy_codes(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Pixel codes of x (m, C, H, W) in [0, 1] plus fresh integer noise (int64)."""
        shape = tuple(x.shape)
        noise = (discrete_gaussian_cks(shape, self.table.sigma2, generator).to(x.device)
                 if self.sampler == "cks" else self.table.sample(shape, generator, x.device))
        codes = pixel_codes(x) + noise
        return codes.clamp_(0, PIXEL_LEVELS) if self.clip else codes

    @torch.no_grad()
    def labels(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.base.forward_pixels(self.noisy_codes(x, generator)).argmax(1)

    def eta(self, input_shape: tuple[int, ...]) -> float:
        dim = math.prod(input_shape)
        if self.sampler == "cks":  # exact draws: only the law mismatch remains
            return law_tv(self.kind, self.table.sigma2, self.table.bound, dim)
        return radius_eta(self.table, dim, self.clip)

    def radius_codes(self, p_lower: float, input_shape: tuple[int, ...]) -> float:
        """Certified L2 radius in pixel codes (docs/intrs_radius.md, Theorem 2)."""
        return float(stats.discrete_radius(p_lower, self.sigma_int, self.eta(input_shape)))

    def radius(self, p_lower: float, input_shape: tuple[int, ...]) -> float:
        return self.radius_codes(p_lower, input_shape) / PIXEL_LEVELS
