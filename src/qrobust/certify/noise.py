"""Noise for randomized smoothing: Gaussian, and exact integer noise on the pixel-code grid.

Three samplers, each taking an explicit ``torch.Generator``:

* :func:`gaussian` -- N(0, sigma^2) floats (Cohen et al., arXiv 1902.02918).
* :func:`discrete_gaussian_cks` -- the *exact* discrete Gaussian N_Z(0, sigma^2),
  P(k) proportional to exp(-k^2 / (2 sigma^2)) on the integers, by Canonne, Kamath and
  Steinke (arXiv 2004.00010, Algorithms 1-3): discrete Laplace proposals and Bernoulli(exp(-g))
  rejection, all in exact integer arithmetic on int64 tensors (sigma^2 a rational p/q). The
  only randomness is exactly uniform integers (62-bit words, power-of-two rejection). It is
  vectorised (one pass per rejection round over all pending samples) but still slow next to
  the table below: it is the reference the table is tested against.
* :class:`NoiseTable` -- the fast sampler used for certification: an alias table in 62-bit
  fixed point over the clipped support {-bound..bound}, where the end atoms carry the whole
  tail mass, i.e. it samples ``clip(Z, -bound, bound)``. Clipping at
  bound = 255 is *exact* for a classifier that clips pixel codes to [0, 255] (clip(x + Z) =
  clip(x + clip(Z, -255, 255)) for x in [0, 255]); the table itself differs from the exact
  law by at most ``tv`` in total variation per coordinate (the 62-bit quantisation of the
  CDF, bounded rigorously below), which the certified radius subtracts (docs/intrs_radius.md).

Tables are built from probabilities computed with mpmath at 50 significant digits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fractions import Fraction

import mpmath
import torch

from qrobust.errors import ConfigError

WORD_BITS = 62  # torch.randint(0, 2**62) is exactly uniform (a power-of-two range)
_DPS = 50


# ----------------------------------------------------------------------------- Gaussian
def gaussian(shape: tuple[int, ...], sigma: float, generator: torch.Generator | None,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, sigma^2) noise of ``shape`` (sigma in the units of the data, [0, 1] pixels)."""
    return sigma * torch.randn(shape, generator=generator, dtype=dtype, device=device)


def rational_sigma2(sigma: float | Fraction | str, scale: int = 1) -> Fraction:
    """(scale * sigma)^2 as an exact fraction; floats are read as their shortest decimal
    (0.25 -> 1/4), so sigma = 0.25 on the 1/255 grid gives sigma_int^2 = 65025/16."""
    s = Fraction(repr(sigma)) if isinstance(sigma, float) else Fraction(sigma)
    if s <= 0:
        raise ConfigError(f"sigma must be positive, got {sigma}")
    return (s * scale) ** 2


# ------------------------------------------------------------ exact uniform / Bernoulli
def _words(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, 2**WORD_BITS, (n,), generator=generator, dtype=torch.int64)


def uniform_below(high: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Exactly uniform integers in [0, high) elementwise (int64, 1 <= high <= 2^62).

    Draws the top bit_length(high - 1) bits of a uniform 62-bit word and rejects values
    >= high (acceptance > 1/2 per round), so there is no modulo bias.
    """
    if torch.any(high < 1) or torch.any(high > 2**WORD_BITS):
        raise ValueError("uniform_below needs 1 <= high <= 2^62")
    bits = _bit_length(high - 1)
    out = torch.empty_like(high)
    todo = torch.arange(len(high))
    while len(todo):
        u = _words(len(todo), generator) >> (WORD_BITS - bits[todo])
        ok = u < high[todo]
        out[todo[ok]] = u[ok]
        todo = todo[~ok]
    return out


def _bit_length(v: torch.Tensor) -> torch.Tensor:
    """Number of bits of non-negative int64 values (0 -> 0), exactly."""
    bits = torch.zeros_like(v)
    rest = v.clone()
    for shift in (32, 16, 8, 4, 2, 1):
        big = rest >= (1 << shift)
        bits += big * shift
        rest = torch.where(big, rest >> shift, rest)
    return bits + (rest > 0)


def bernoulli_ratio(num: torch.Tensor, den: torch.Tensor, generator) -> torch.Tensor:
    """Exact Bernoulli(num / den) for integer tensors 0 <= num <= den."""
    return uniform_below(den, generator) < num


def bernoulli_exp(num: torch.Tensor, den: torch.Tensor, generator) -> torch.Tensor:
    """Exact Bernoulli(exp(-num/den)) for integers num >= 0, den >= 1 (CKS Algorithm 1).

    For gamma = num/den in [0, 1]: draw A_k ~ Bernoulli(gamma / k), k = 1, 2, ... until the
    first failure; return whether that k is odd. For gamma > 1: the product of floor(gamma)
    Bernoulli(exp(-1)) and one Bernoulli(exp(-(gamma - floor(gamma)))).
    """
    whole, frac = num // den, num % den
    alive = torch.ones(len(num), dtype=torch.bool)
    for i in range(int(whole.max()) if len(num) else 0):  # the integer part, one e^-1 at a time
        idx = torch.nonzero(alive & (whole > i)).flatten()
        if not len(idx):
            break
        one = torch.ones(len(idx), dtype=torch.int64)
        alive[idx] = _bernoulli_exp_unit(one, one, generator)
    idx = torch.nonzero(alive).flatten()
    alive[idx] = _bernoulli_exp_unit(frac[idx], den[idx], generator)
    return alive


def _bernoulli_exp_unit(num: torch.Tensor, den: torch.Tensor, generator) -> torch.Tensor:
    """Bernoulli(exp(-num/den)) for 0 <= num <= den (the alternating-series trick)."""
    k = torch.ones_like(num)
    result = torch.empty(len(num), dtype=torch.bool)
    todo = torch.arange(len(num))
    while len(todo):
        a = bernoulli_ratio(num[todo], den[todo] * k[todo], generator)
        done = ~a
        result[todo[done]] = (k[todo[done]] % 2) == 1
        k[todo[a]] += 1
        todo = todo[a]
    return result


# ------------------------------------------------------------------- CKS exact sampler
def discrete_laplace(n: int, t: int, generator) -> torch.Tensor:
    """n exact samples of the discrete Laplace, P(y) proportional to exp(-|y| / t), t >= 1
    an integer (CKS Algorithm 2 with s = 1)."""
    out = torch.empty(n, dtype=torch.int64)
    todo = torch.arange(n)
    while len(todo):
        m = len(todo)
        tt = torch.full((m,), t, dtype=torch.int64)
        u = uniform_below(tt, generator)
        d = bernoulli_exp(u, tt, generator)
        v = _geometric_exp1(m, generator)
        x = u + t * v
        b = bernoulli_ratio(torch.ones(m, dtype=torch.int64), torch.full((m,), 2), generator)
        ok = d & ~(b & (x == 0))
        out[todo[ok]] = torch.where(b[ok], -x[ok], x[ok])
        todo = todo[~ok]
    return out


def _geometric_exp1(n: int, generator) -> torch.Tensor:
    """Number of successes of Bernoulli(exp(-1)) before the first failure, n at a time."""
    count = torch.zeros(n, dtype=torch.int64)
    todo = torch.arange(n)
    one = torch.ones(n, dtype=torch.int64)
    while len(todo):
        a = _bernoulli_exp_unit(one[: len(todo)], one[: len(todo)], generator)
        count[todo[a]] += 1
        todo = todo[a]
    return count


def discrete_gaussian_cks(shape: tuple[int, ...], sigma2: Fraction,
                          generator: torch.Generator | None) -> torch.Tensor:
    """Exact samples of N_Z(0, sigma2) (int64, ``shape``), CKS Algorithm 3.

    sigma2 = p / q rational. With t = floor(sigma) + 1: propose Y ~ discrete Laplace(t),
    accept with probability exp(-(|Y| - sigma2/t)^2 / (2 sigma2)) = exp(-(|Y| t q - p)^2 /
    (2 p q t^2)), an exact integer ratio. Every comparison is between integers.
    """
    sigma2 = Fraction(sigma2)
    p, q = sigma2.numerator, sigma2.denominator
    t = math.isqrt(p // q) + 1
    den_scalar = 2 * p * q * t * t
    if den_scalar * 64 >= 2**WORD_BITS:
        raise ConfigError(f"sigma^2 = {sigma2} has too large a numerator/denominator for exact "
                          "int64 sampling; give sigma with fewer decimals")
    n = 1
    for s in shape:
        n *= s
    out = torch.empty(n, dtype=torch.int64)
    todo = torch.arange(n)
    while len(todo):
        y = discrete_laplace(len(todo), t, generator)
        num = (y.abs() * t * q - p) ** 2
        if torch.any(num >= 2**WORD_BITS // 2):
            raise ConfigError("discrete Gaussian proposal overflowed int64; sigma too large")
        c = bernoulli_exp(num, torch.full_like(num, den_scalar), generator)
        out[todo[c]] = y[c]
        todo = todo[~c]
    return out.reshape(shape)




# ------------------------------------------------------------------ exact probabilities
def _mp_sigma2(sigma2: Fraction) -> mpmath.mpf:
    return mpmath.mpf(sigma2.numerator) / sigma2.denominator


@functools.lru_cache(maxsize=32)
def discrete_gaussian_pmf(sigma2: Fraction, bound: int) -> tuple[mpmath.mpf, ...]:
    """Probabilities of clip(Z, -bound, bound), Z ~ N_Z(0, sigma2), for k = -bound..bound
    (end atoms hold the tails), to 50 significant digits."""
    with mpmath.workdps(_DPS):
        s2 = _mp_sigma2(sigma2)
        extent = bound + int(60 * mpmath.sqrt(s2)) + 10  # tail beyond: < exp(-1800)
        w = [mpmath.exp(-mpmath.mpf(k * k) / (2 * s2)) for k in range(extent + 1)]
        total = w[0] + 2 * mpmath.fsum(w[1:])
        tail = mpmath.fsum(w[bound:])
        core = [w[abs(k)] for k in range(-bound + 1, bound)]
        return tuple(p / total for p in [tail, *core, tail])


@functools.lru_cache(maxsize=32)
def rounded_gaussian_pmf(sigma2: Fraction, bound: int) -> tuple[mpmath.mpf, ...]:
    """Probabilities of clip(round(G), -bound, bound), G ~ N(0, sigma2), k = -bound..bound."""
    with mpmath.workdps(_DPS):
        s = mpmath.sqrt(_mp_sigma2(sigma2))

        def upper_tail(a: float) -> mpmath.mpf:  # P[G >= a]
            return mpmath.erfc(mpmath.mpf(a) / (s * mpmath.sqrt(2))) / 2

        tail = upper_tail(bound - 0.5)
        core = [upper_tail(abs(k) - 0.5) - upper_tail(abs(k) + 0.5) if k else
                1 - 2 * upper_tail(0.5) for k in range(-bound + 1, bound)]
        return tuple([tail, *core, tail])


PMFS = {"discrete-gaussian": discrete_gaussian_pmf, "rounded-gaussian": rounded_gaussian_pmf}


# ----------------------------------------------------------------------- the fast table
@dataclass(frozen=True)
class NoiseTable:
    """Sampler of clip(noise, -bound, bound) on the integers from one 62-bit word per value.

    Walker/Vose alias table built in exact integer arithmetic: the atom masses are
    m_k = round(2^62 p_k) (the largest atom absorbs the rounding so they sum to exactly 2^62),
    split over 2^L columns of capacity 2^(62-L). A uniform word U picks column U >> (62-L) and
    returns the column's own atom if the low bits are < ``keep[col]`` else ``alias[col]``, so
    the sampled law is *exactly* m_k / 2^62 (see :meth:`probabilities`). ``tv`` bounds the
    total variation between that law and the exact clipped law, per coordinate:
    |m_k / 2^62 - p_k| <= 2^-63 except for the absorbing atom, whose error is at most the sum
    of the others, so tv <= (2 bound + 1) 2^-63, plus 1e-40 for the 50-digit probabilities.
    """

    kind: str
    sigma2: Fraction
    bound: int
    log_columns: int
    keep: torch.Tensor  # (2^L,) int64 thresholds on the low 62-L bits
    alias: torch.Tensor  # (2^L,) int64 atom index used above the threshold
    tv: float
    packed: torch.Tensor = field(init=False, repr=False, compare=False)  # keep << L | alias

    def __post_init__(self) -> None:  # one gather per sample instead of two
        if int(self.keep.max()) >= 2 ** (63 - self.log_columns):
            raise AssertionError("alias thresholds do not fit the packed table")
        object.__setattr__(self, "packed", (self.keep << self.log_columns) | self.alias)

    @classmethod
    def build(cls, kind: str, sigma2: Fraction, bound: int) -> NoiseTable:
        if kind not in PMFS:
            raise ConfigError(f"unknown integer noise '{kind}'; valid: {', '.join(sorted(PMFS))}")
        if bound < 1 or bound > 2**20:
            raise ConfigError(f"noise table bound must be in [1, 2^20], got {bound}")
        pmf = PMFS[kind](Fraction(sigma2), int(bound))
        with mpmath.workdps(_DPS):
            mass = [int(mpmath.nint(p * 2**WORD_BITS)) for p in pmf]
        mass[mass.index(max(mass))] += 2**WORD_BITS - sum(mass)
        log_columns = (len(mass) - 1).bit_length()
        capacity = 2 ** (WORD_BITS - log_columns)
        mass += [0] * (2**log_columns - len(mass))
        keep, alias = list(mass), list(range(len(mass)))
        small = [i for i, m in enumerate(mass) if m < capacity]
        large = [i for i, m in enumerate(mass) if m >= capacity]
        while small and large:  # Vose: fill each small column from a large atom
            s, big = small.pop(), large[-1]
            alias[s] = big
            keep[big] -= capacity - keep[s]
            if keep[big] < capacity:
                small.append(large.pop())
        for i in small + large:  # exactly full columns (integer arithmetic leaves no residue)
            keep[i] = capacity
        tv = len(pmf) * 2.0 ** -(WORD_BITS + 1) + 1e-40
        return cls(kind, Fraction(sigma2), int(bound), log_columns,
                   torch.tensor(keep, dtype=torch.int64), torch.tensor(alias, dtype=torch.int64),
                   tv)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 noise of ``shape`` in [-bound, bound]."""
        u = torch.randint(0, 2**WORD_BITS, shape, generator=generator, dtype=torch.int64,
                          device=device)
        low_bits = WORD_BITS - self.log_columns
        col = u >> low_bits
        entry = self.packed.to(device)[col]
        keep = entry >> self.log_columns
        alias = entry & ((1 << self.log_columns) - 1)
        return torch.where((u & ((1 << low_bits) - 1)) < keep, col, alias).sub_(self.bound)

    def probabilities(self) -> list[Fraction]:
        """The exact law the table samples, P(k) for k = -bound..bound, recomputed from the
        alias table (a check of the construction)."""
        capacity = 2 ** (WORD_BITS - self.log_columns)
        mass = [0] * len(self.keep)
        for col, (k, a) in enumerate(zip(self.keep.tolist(), self.alias.tolist(), strict=True)):
            mass[col] += k
            mass[a] += capacity - k
        atoms = 2 * self.bound + 1
        if any(mass[atoms:]):
            raise AssertionError("alias table puts mass on padding columns")
        return [Fraction(m, 2**WORD_BITS) for m in mass[:atoms]]


@functools.lru_cache(maxsize=32)
def noise_table(kind: str, sigma2: Fraction, bound: int) -> NoiseTable:
    """Cached :meth:`NoiseTable.build`."""
    return NoiseTable.build(kind, sigma2, bound)
