"""The smoothing noise in one place: :class:`Noise` says what is sampled (float Gaussian, or
integer noise on pixel codes), validates its parameters, and turns a lower bound on the
top-class probability into the certified radius, with the total-variation correction eta
that integer noise needs (docs/intrs_radius.md). Float smoothing, integer smoothing and
noise-aware training all draw through it."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fractions import Fraction

import mpmath
import torch

from qrobust.certify import stats
from qrobust.certify.noise import (
    PMFS,
    NoiseTable,
    discrete_gaussian_cks,
    discrete_gaussian_pmf,
    gaussian,
    noise_table,
    rational_sigma2,
    rounded_gaussian_pmf,
)
from qrobust.errors import ConfigError
from qrobust.integer.base import pixel_codes  # round(255 x) half up, clipped: the model's own

PIXEL_LEVELS = 255
NOISE_KINDS = tuple(sorted(PMFS))  # the integer kinds
KINDS = ("gaussian", *NOISE_KINDS)
SAMPLERS = ("table", "cks")


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


@dataclass(frozen=True)
class Noise:
    """One smoothing noise law.

    ``kind``: ``gaussian`` (float: x + N(0, sigma^2 I), Cohen et al.) or an integer kind on
    pixel codes c = round(255 x) (sigma_int = 255 sigma): ``rounded-gaussian`` (Z = round(G):
    Cohen's radius exactly, eta ~ 0) or ``discrete-gaussian`` (IntRS; its law mismatch eta,
    4e-4 on CIFAR-10 at sigma 0.25, costs up to 0.034 radius at n = 10^4).

    ``clip``: the base classifier sees the noisy input clipped to the pixel range (float:
    [0, 1]; integer: codes [0, 255], which makes clipping the noise at +-255 exact); a fixed
    post-processing, so the radius holds unchanged. Integer noise without ``clip`` comes from
    a table over +-``bound`` codes (default 20 sigma_int) whose tail mass enters eta.
    ``sampler`` (integer): ``table`` (the 62-bit alias table, default) or ``cks`` (the exact
    Canonne-Kamath-Steinke sampler: discrete Gaussian with ``clip`` only, ~100x slower, no
    table term in eta).
    """

    kind: str
    sigma: float
    clip: bool = False
    bound: int | None = None
    sampler: str = "table"
    table: NoiseTable | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown smoothing noise '{self.kind}'; valid: {', '.join(KINDS)}")
        if not (isinstance(self.sigma, int | float | Fraction) and self.sigma > 0
                and math.isfinite(self.sigma)):
            raise ConfigError(f"sigma must be positive, got {self.sigma}; e.g. 0.25")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler '{self.sampler}'; valid: cks, table")
        table = None
        if self.integer:
            if self.sampler == "cks" and (self.kind != "discrete-gaussian" or not self.clip):
                raise ConfigError("the exact CKS sampler draws the discrete Gaussian for a "
                                  "clipping classifier: use kind='discrete-gaussian', clip=True")
            sigma2 = rational_sigma2(self.sigma, PIXEL_LEVELS)
            bound = self.bound or (PIXEL_LEVELS if self.clip else tail_bound(sigma2))
            if self.clip and bound < PIXEL_LEVELS:
                raise ConfigError(f"with clip=True the noise bound must be >= {PIXEL_LEVELS}")
            table = noise_table(self.kind, sigma2, int(bound))
        object.__setattr__(self, "table", table)

    @property
    def integer(self) -> bool:
        return self.kind != "gaussian"

    @property
    def sigma_int(self) -> float:
        """The noise std in pixel codes (integer kinds)."""
        return math.sqrt(self.table.sigma2) if self.table is not None else PIXEL_LEVELS * self.sigma

    def sample(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The noisy input for images x (m, C, H, W) in [0, 1]: float images (gaussian) or
        int64 pixel codes (integer kinds), clipped to the pixel range with ``clip``."""
        shape = tuple(x.shape)
        if not self.integer:
            noisy = x + gaussian(shape, self.sigma, generator, x.dtype, x.device)
            return noisy.clamp_(0, 1) if self.clip else noisy
        noise = (discrete_gaussian_cks(shape, self.table.sigma2, generator).to(x.device)
                 if self.sampler == "cks" else self.table.sample(shape, generator, x.device))
        codes = pixel_codes(x) + noise
        return codes.clamp_(0, PIXEL_LEVELS) if self.clip else codes

    def eta(self, input_shape: tuple[int, ...]) -> float:
        """Total-variation distance the radius must give up (0 for float noise)."""
        if not self.integer:
            return 0.0
        dim = math.prod(input_shape)
        if self.sampler == "cks":  # exact draws: only the law mismatch remains
            return law_tv(self.kind, self.table.sigma2, self.table.bound, dim)
        return radius_eta(self.table, dim, self.clip)

    def radius(self, p_lower: float, input_shape: tuple[int, ...]) -> float:
        """Certified L2 radius in [0, 1] pixel units for top-class probability >= p_lower
        (integer noise: docs/intrs_radius.md, Theorem 2, in codes / 255)."""
        if not self.integer:
            return float(stats.gaussian_radius(p_lower, self.sigma))
        return self.radius_codes(p_lower, input_shape) / PIXEL_LEVELS

    def radius_codes(self, p_lower: float, input_shape: tuple[int, ...]) -> float:
        """Certified L2 radius in pixel codes (integer kinds)."""
        if not self.integer:
            raise ConfigError("radius_codes is the radius of integer noise; use radius()")
        return float(stats.discrete_radius(p_lower, self.sigma_int, self.eta(input_shape)))
