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

from dataclasses import dataclass, field
from typing import Protocol

import torch

from qrobust.certify.law import (  # noqa: F401  (law_tv, radius_eta, tail_bound: re-exported)
    NOISE_KINDS,
    PIXEL_LEVELS,
    Noise,
    law_tv,
    radius_eta,
    tail_bound,
)
from qrobust.certify.noise import NoiseTable
from qrobust.errors import ConfigError
from qrobust.integer.base import pixel_codes  # noqa: F401  (re-exported)


class PixelClassifier(Protocol):
    def forward_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes (N, C, H, W) -> logits (N, K)."""
        ...


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

    ``base``: has ``forward_pixels(codes)``; the noise (``sigma`` in [0, 1] units, sigma_int =
    255 sigma codes; ``kind``, ``clip``, ``bound``, ``sampler``) is a
    :class:`qrobust.certify.law.Noise`, which documents them: ``rounded-gaussian`` (default,
    Cohen's radius exactly) or ``discrete-gaussian`` (IntRS); ``clip`` (default here) for a
    base that clips codes to [0, 255], ``clip=False`` for a widened input
    (:func:`integer_base`) or an unbounded one (tests).
    """

    base: PixelClassifier
    sigma: float
    kind: str = "rounded-gaussian"
    clip: bool = True
    bound: int | None = None
    sampler: str = "table"
    noise: Noise = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ConfigError(f"unknown integer noise '{self.kind}'; valid: "
                              f"{', '.join(NOISE_KINDS)}")
        noise = Noise(self.kind, self.sigma, self.clip, self.bound, self.sampler)
        if self.clip and getattr(self.base, "widened", False):
            # noise clipped at +-255 is exact only for a model that clips codes to [0, 255]
            raise ConfigError("this integer model takes pixel codes beyond [0, 255] (a widened "
                              "input): smooth it with IntegerNoise(..., clip=False)")
        object.__setattr__(self, "noise", noise)

    @property
    def table(self) -> NoiseTable:
        return self.noise.table

    @property
    def sigma_int(self) -> float:
        return self.noise.sigma_int

    def noisy_codes(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Pixel codes of x (m, C, H, W) in [0, 1] plus fresh integer noise (int64)."""
        return self.noise.sample(x, generator)

    @torch.no_grad()
    def labels(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.base.forward_pixels(self.noise.sample(x, generator)).argmax(1)

    def eta(self, input_shape: tuple[int, ...]) -> float:
        return self.noise.eta(input_shape)

    def radius_codes(self, p_lower: float, input_shape: tuple[int, ...]) -> float:
        """Certified L2 radius in pixel codes (docs/intrs_radius.md, Theorem 2)."""
        return self.noise.radius_codes(p_lower, input_shape)

    def radius(self, p_lower: float, input_shape: tuple[int, ...]) -> float:
        return self.noise.radius(p_lower, input_shape)
