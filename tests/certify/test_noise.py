"""Samplers against exact probabilities: chi-square goodness of fit (seeded, p-value > 1e-4
means a false failure has probability 1e-4 for a correct sampler and a fixed seed) and
exact-arithmetic checks of the table construction."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from scipy.stats import chisquare, norm

from qrobust.certify import noise

P_MIN = 1e-4


def _gof(samples: torch.Tensor, support: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value of integer samples against probs on support (bins with expected
    count < 5 are pooled into one)."""
    n = samples.numel()
    counts = np.array([(samples == k).sum().item() for k in support], dtype=float)
    rest = n - counts.sum()
    expect = probs * n
    small = expect < 5
    obs, exp = counts[~small], expect[~small]
    pooled = n - exp.sum()
    if pooled > 1e-9 * n:
        obs, exp = np.append(obs, counts[small].sum() + rest), np.append(exp, pooled)
    else:
        assert counts[small].sum() + rest == 0
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def _dg_probs(sigma2: Fraction, ks: np.ndarray) -> np.ndarray:
    s2 = float(sigma2)
    w = np.exp(-np.arange(-2000, 2001) ** 2 / (2 * s2))
    return np.exp(-ks.astype(float) ** 2 / (2 * s2)) / w.sum()


def test_uniform_below_is_uniform_and_in_range():
    g = torch.Generator().manual_seed(0)
    for high in (1, 3, 10, 1000, 2**40 + 7):
        u = noise.uniform_below(torch.full((30000,), high, dtype=torch.int64), g)
        assert int(u.min()) >= 0 and int(u.max()) < high
        if 1 < high <= 10:
            assert _gof(u, np.arange(high), np.full(high, 1 / high)) > P_MIN
    # mixed highs in one call
    highs = torch.tensor([2, 3, 5, 7] * 5000)
    u = noise.uniform_below(highs, g)
    assert torch.all((u >= 0) & (u < highs))


@pytest.mark.parametrize("num,den", [(0, 1), (1, 3), (1, 1), (5, 2), (7, 3)])
def test_bernoulli_exp_frequency(num, den):
    g = torch.Generator().manual_seed(1)
    m = 40000
    b = noise.bernoulli_exp(torch.full((m,), num), torch.full((m,), den), g)
    p = math.exp(-num / den)
    assert abs(b.double().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / m) + 1e-12


def test_discrete_laplace_matches_its_pmf():
    g = torch.Generator().manual_seed(2)
    t = 3
    y = noise.discrete_laplace(40000, t, g)
    ks = np.arange(-40, 41)
    w = np.exp(-np.abs(ks) / t)
    assert _gof(y, ks, w / (w.sum())) > P_MIN


@pytest.mark.parametrize("sigma2", [Fraction(1, 4), Fraction(2), Fraction(81, 16)])
def test_cks_discrete_gaussian_matches_exact_pmf(sigma2):
    g = torch.Generator().manual_seed(3)
    z = noise.discrete_gaussian_cks((30000,), sigma2, g)
    ks = np.arange(-30, 31)
    assert _gof(z, ks, _dg_probs(sigma2, ks)) > P_MIN


def test_cks_at_certification_scale_has_the_exact_variance():
    # sigma_int = 63.75 (sigma = 0.25 on the 1/255 grid): variance of N_Z equals sigma^2 to
    # within 1e-300 relative (Poisson summation), so the sample variance must be sigma^2
    sigma2 = noise.rational_sigma2(0.25, 255)
    assert sigma2 == Fraction(65025, 16)
    g = torch.Generator().manual_seed(4)
    z = noise.discrete_gaussian_cks((40000,), sigma2, g).double()
    m = z.numel()
    assert abs(z.mean().item()) < 5 * math.sqrt(float(sigma2) / m)
    # var of the sample variance ~ 2 sigma^4 / m
    assert abs(z.var().item() - float(sigma2)) < 5 * float(sigma2) * math.sqrt(2 / m)


@pytest.mark.parametrize("kind", ["discrete-gaussian", "rounded-gaussian"])
@pytest.mark.parametrize("sigma2,bound", [(Fraction(9, 4), 4), (Fraction(65025, 16), 255)])
def test_table_law_is_exact_fraction_within_tv_of_target(kind, sigma2, bound):
    table = noise.NoiseTable.build(kind, sigma2, bound)
    law = table.probabilities()
    assert sum(law) == 1  # exact rational arithmetic
    pmf = noise.PMFS[kind](sigma2, bound)
    with mpmath.workdps(50):
        tv = sum(abs(mpmath.mpf(p.numerator) / p.denominator - q)
                 for p, q in zip(law, pmf, strict=True)) / 2
    assert float(tv) <= table.tv
    # the end atoms carry the whole tail: P(clip = bound) = P(Z >= bound)
    s2 = float(sigma2)
    if kind == "rounded-gaussian":
        assert float(pmf[-1]) == pytest.approx(norm.sf((bound - 0.5) / math.sqrt(s2)), rel=1e-9)
    else:
        tail = _dg_probs(sigma2, np.arange(bound, 3000)).sum()
        assert float(pmf[-1]) == pytest.approx(tail, rel=1e-9)


@pytest.mark.parametrize("kind", ["discrete-gaussian", "rounded-gaussian"])
def test_table_samples_follow_the_table_law(kind):
    sigma2, bound = Fraction(9, 4), 4
    table = noise.NoiseTable.build(kind, sigma2, bound)
    g = torch.Generator().manual_seed(5)
    z = table.sample((200, 200), g)
    assert z.shape == (200, 200) and z.dtype == torch.int64
    ks = np.arange(-bound, bound + 1)
    assert _gof(z, ks, np.array([float(p) for p in table.probabilities()])) > P_MIN


def test_table_and_cks_agree_on_clipped_discrete_gaussian():
    # two independent samplers of the same law: CKS (clipped afterwards) vs the alias table
    sigma2, bound = Fraction(2), 3
    g = torch.Generator().manual_seed(6)
    z1 = noise.discrete_gaussian_cks((30000,), sigma2, g).clamp(-bound, bound)
    z2 = noise.noise_table("discrete-gaussian", sigma2, bound).sample((30000,), g)
    ks = np.arange(-bound, bound + 1)
    c1 = np.array([(z1 == k).sum().item() for k in ks])
    c2 = np.array([(z2 == k).sum().item() for k in ks])
    from scipy.stats import chi2_contingency

    assert chi2_contingency(np.stack([c1, c2])).pvalue > P_MIN


def test_samplers_are_reproducible_from_the_generator():
    table = noise.noise_table("discrete-gaussian", Fraction(65025, 16), 255)
    a = table.sample((3, 5), torch.Generator().manual_seed(9))
    b = table.sample((3, 5), torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    c = noise.discrete_gaussian_cks((50,), Fraction(3), torch.Generator().manual_seed(9))
    d = noise.discrete_gaussian_cks((50,), Fraction(3), torch.Generator().manual_seed(9))
    assert torch.equal(c, d)
    e = noise.gaussian((4,), 0.5, torch.Generator().manual_seed(1))
    f = noise.gaussian((4,), 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(e, f)
