"""Integer-only smoothing (IntRS): soundness of the discrete-noise radius.

Stand-in integer base classifier: f(c) = [sum of the first k codes + b > 0] on integer codes
c (an integer linear classifier). Under symmetric integer noise its smoothed classifier
predicts 1 iff t = sum_k c + b >= 1, so the true robust radius over integer perturbations is
the least L2 norm of an integer perturbation of the first k codes summing to -t, i.e. t
spread evenly over k coordinates: sqrt(r (q+1)^2 + (k-r) q^2) for t = q k + r. Its smoothed probability is the
exact convolution of the sampled law (the table's exact probabilities).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binom

from qrobust.certify import IntegerNoise, Smoothed, pixel_codes, radius_eta
from qrobust.certify.noise import noise_table, rational_sigma2
from qrobust.errors import ConfigError

D = 4
SHAPE = (1, 1, D)


class IntLinear:
    """Integer codes (N, 1, 1, D) -> logits; class 1 iff the sum of the first k codes + b > 0."""

    def __init__(self, k: int, b: int) -> None:
        self.w = torch.tensor([1] * k + [0] * (D - k), dtype=torch.int64)
        self.b = b

    def forward_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        assert codes.dtype == torch.int64
        s = codes.flatten(1) @ self.w + self.b
        return torch.stack([-s, s], 1).double()


def true_radius(t: int, k: int) -> float:
    """Least L2 norm of an integer vector on k coordinates whose sum is t (t >= 1)."""
    q, r = divmod(t, k)
    return math.sqrt(r * (q + 1) ** 2 + (k - r) * q**2)


def smoothed_p(noisy: IntegerNoise, k: int, t: np.ndarray) -> np.ndarray:
    """Exact P[t + S > 0], S the sum of k draws from the table's law, in float64."""
    law = np.array([float(p) for p in noisy.table.probabilities()])
    s = law
    for _ in range(k - 1):
        s = np.convolve(s, law)
    lo = -k * noisy.table.bound  # support of S is lo .. -lo
    cdf = np.cumsum(s)  # cdf[j] = P[S <= lo + j]
    # P[S > -t] = 1 - P[S <= -t]
    idx = np.clip(-t - lo, -1, len(cdf) - 1)
    return 1 - np.where(idx >= 0, cdf[np.maximum(idx, 0)], 0.0)


@pytest.mark.parametrize("sigma_int", [Fraction(1, 2), Fraction(1), Fraction(5, 2),
                                       Fraction(255, 4)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("kind", ["discrete-gaussian", "rounded-gaussian"])
def test_radius_from_exact_probability_never_exceeds_true_radius(sigma_int, k, kind):
    noisy = IntegerNoise(IntLinear(k, 0), sigma_int / 255, kind=kind, clip=False)
    top = int(8 * float(sigma_int) * math.sqrt(k)) + 3
    t = np.arange(1, top)
    p = smoothed_p(noisy, k, t)
    for ti, pi in zip(t, p, strict=True):
        r = noisy.radius_codes(float(pi), SHAPE)
        assert r <= true_radius(int(ti), k), (ti, pi, r)
    if sigma_int > 10:  # not vacuous at certification scale: within 2% of the truth + 1 code
        mid = [(ti, pi) for ti, pi in zip(t, p, strict=True) if 0.6 < pi < 0.999]
        assert len(mid) > 20
        for ti, pi in mid:
            assert noisy.radius_codes(float(pi), SHAPE) >= 0.98 * true_radius(int(ti), k) - 1


def test_eta_is_small_at_certification_scale_and_large_for_tiny_sigma():
    table = noise_table("discrete-gaussian", rational_sigma2(0.25, 255), 255)
    eta = radius_eta(table, 3 * 32 * 32, clipped=True)
    assert 1e-5 < eta < 1e-3  # CIFAR-10 shape; the value quoted in docs/intrs_radius.md
    rg = noise_table("rounded-gaussian", rational_sigma2(0.25, 255), 255)
    assert radius_eta(rg, 3 * 32 * 32, clipped=True) < 1e-12  # only the table's rounding
    tiny = noise_table("discrete-gaussian", Fraction(1), 255)  # sigma_int = 1 code
    assert radius_eta(tiny, 64, clipped=True) > 0.1


@given(x=st.integers(0, 255), z=st.integers(-10_000, 10_000))
def test_clipping_the_noise_at_255_is_exact_for_a_clipping_classifier(x, z):
    def clip(v: int, lo: int = 0, hi: int = 255) -> int:
        return min(max(v, lo), hi)

    assert clip(x + z) == clip(x + clip(z, -255, 255))


def _images(k: int, t: np.ndarray, b: int) -> torch.Tensor:
    """Float images on the 1/255 grid whose first k codes sum to t - b (b = -128 k)."""
    total = t - b
    codes = np.zeros((len(t), D), dtype=np.int64)
    for i, s in enumerate(total):
        q, r = divmod(int(s), k)
        codes[i, :k] = q
        codes[i, :r] += 1
        codes[i, k:] = 77
    assert codes.min() >= 0 and codes.max() <= 255
    return torch.from_numpy(codes).float().div(255).view(len(t), *SHAPE)


@pytest.mark.parametrize("kind", ["discrete-gaussian", "rounded-gaussian"])
def test_certify_wrong_certificate_rate_is_at_most_alpha(kind):
    # statistical: each certificate is wrong with probability <= alpha; fail above the
    # 1 - 1e-6 quantile of Bin(N, alpha)
    sigma, k, alpha = 0.25, 2, 0.05
    b = -128 * k
    noisy = IntegerNoise(IntLinear(k, b), sigma, kind=kind, clip=False)
    sm = Smoothed(noisy, 2, batch_size=20000)
    rng = np.random.default_rng(1)
    g = torch.Generator().manual_seed(2)
    wrong = total = 0
    for _ in range(4):
        t = (rng.uniform(0.1, 2.5, 100) * 63.75 * math.sqrt(k)).astype(np.int64)
        t *= rng.choice([-1, 1], 100)
        t[t == 0] = 1
        x = _images(k, t, b)
        assert torch.equal(pixel_codes(x)[:, 0, 0, :k].sum(1), torch.from_numpy(t - b))
        certs = sm.certify(x, 20, 300, alpha, g)
        for c, ti in zip(certs, t, strict=True):
            truth = 1 if ti >= 1 else 0
            # flipping class 0 (t <= 0) needs sum 1 - t; class 1 needs sum t
            r_true = true_radius(int(ti) if truth else int(1 - ti), k)
            wrong += c.label is not None and (c.label != truth or c.radius * 255 > r_true)
        total += len(certs)
    assert wrong <= binom.ppf(1 - 1e-6, total, alpha)


def test_worst_integer_perturbation_inside_the_radius_keeps_the_prediction():
    sigma, k, alpha = 0.25, 3, 0.01
    b = -128 * k
    noisy = IntegerNoise(IntLinear(k, b), sigma, clip=False)
    sm = Smoothed(noisy, 2, batch_size=20000)
    t = np.array([40, 90, 150, 220, 300, 5, 60])
    x = _images(k, t, b)
    g = torch.Generator().manual_seed(3)
    certs = sm.certify(x, 50, 2000, alpha, g)
    adv_codes = []
    for c, ti, xi in zip(certs, t, x, strict=True):
        assert c.label in (1, None)
        r = c.radius * 255
        # the strongest integer attack inside the ball: the largest sum s with
        # true_radius(s, k) < r, spread evenly and subtracted from the first k codes
        s = 0
        while true_radius(s + 1, k) < r:
            s += 1
        q, rem = divmod(s, k)
        delta = torch.tensor([q + (i < rem) for i in range(k)] + [0] * (D - k))
        adv_codes.append(pixel_codes(xi).flatten() - delta)
        assert s < ti  # closed form: still on the certified side
    x_adv = torch.stack(adv_codes).float().div(255).view(len(t), *SHAPE)
    pred = sm.predict(x_adv, 2000, alpha, g)
    flipped = sum(p is not None and p != c.label for p, c in zip(pred, certs, strict=True)
                  if c.label is not None)
    assert flipped <= binom.ppf(1 - 1e-6, len(t), 2 * alpha)


def test_integer_noise_codes_are_clipped_and_reproducible():
    noisy = IntegerNoise(IntLinear(1, 0), 0.5)
    x = torch.rand((3, *SHAPE), generator=torch.Generator().manual_seed(0))
    a = noisy.noisy_codes(x, torch.Generator().manual_seed(1))
    b = noisy.noisy_codes(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) <= 255


def test_exact_cks_sampler_in_integer_smoothing():
    cks = IntegerNoise(IntLinear(1, 0), 0.25, kind="discrete-gaussian", sampler="cks")
    table = IntegerNoise(IntLinear(1, 0), 0.25, kind="discrete-gaussian")
    assert 0 < cks.eta(SHAPE) < table.eta(SHAPE)
    x = torch.full((2000, *SHAPE), 128 / 255)
    noise = (cks.noisy_codes(x, torch.Generator().manual_seed(0)) - 128).double().flatten()
    # exact mean and std of clip(128 + Z, 0, 255) - 128 from the 50-digit pmf
    pmf = np.array([float(p) for p in cks.table.probabilities()])
    vals = np.clip(np.arange(-255, 256), -128, 127)
    mean = (pmf * vals).sum()
    std = math.sqrt((pmf * (vals - mean) ** 2).sum())
    m = noise.numel()
    assert abs(noise.mean().item() - mean) < 5 * std / math.sqrt(m)
    assert abs(noise.std().item() - std) < 5 * std / math.sqrt(2 * m)
    assert 55 < std < 63.75
    with pytest.raises(ConfigError, match="CKS"):
        IntegerNoise(IntLinear(1, 0), 0.25, kind="rounded-gaussian", sampler="cks")


def test_a_widened_integer_model_needs_unclipped_noise(digits, digits_cnn):
    """Noise clipped at +-255 codes is exact only for a model that clips its input to [0, 255];
    a widened model would see a truncated law the radius does not account for."""
    from qrobust.certify import integer_base
    from qrobust.data import take
    from qrobust.quant import quantize

    twin = quantize(digits_cnn.model, "w8a8", calib=take(digits.train, 256, seed=1).tensors()[0])
    wide = integer_base(twin, 0.5, backend="reference")
    assert wide.widened
    with pytest.raises(ConfigError, match="clip=False"):
        IntegerNoise(wide, 0.5)
    noisy = IntegerNoise(wide, 0.5, clip=False)
    x = digits.test.tensors()[0][:8]
    codes = noisy.noisy_codes(x, torch.Generator().manual_seed(0))
    assert codes.min() < -255 or codes.max() > 510  # the noise reaches beyond +-255 codes
    assert noisy.table.bound > 6 * 0.5 * 255
