"""Float randomized smoothing (Cohen et al.): batching, PREDICT, CERTIFY, and soundness.

Soundness oracle: a linear base classifier f(x) = [w.x + b > 0] whose smoothed probability
is Phi((w.x + b) / (sigma ||w||)) in closed form; the smoothed classifier's true robust
radius at x is |w.x + b| / ||w||. A certificate is *wrong* if its label differs from the
smoothed prediction or its radius exceeds the true radius; each certificate is wrong with
probability <= alpha, so over N certificates the count is stochastically <= Bin(N, alpha).
The tests fail when the count exceeds the 1 - 1e-6 quantile of Bin(N, alpha) (a correct
implementation fails with probability <= 1e-6; the seeds are fixed).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from qrobust.certify import Certificate, GaussianNoise, Smoothed, certified_accuracy, curve

SHAPE = (1, 4, 4)


class LinearClassifier(nn.Module):
    """Two classes: 1 iff w.x + b > 0. x (N, *SHAPE) float."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w.double(), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.double().flatten(1) @ self.w + self.b
        return torch.stack([-s, s], 1)


def _setup(sigma: float, z: np.ndarray, seed: int = 0):
    """Images whose smoothed class-1 probability is Phi(z) (margin w.x + b = z sigma ||w||)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(math.prod(SHAPE), generator=g, dtype=torch.float64)
    base_x = torch.rand((len(z), math.prod(SHAPE)), generator=g, dtype=torch.float64)
    wn = w.norm().item()
    margins = np.asarray(z, dtype=np.float64) * sigma * wn
    b = 0.0
    cur = base_x @ w  # shift every image along w so that w.x + b = margin
    x = base_x + ((torch.tensor(margins) - cur) / wn**2)[:, None] * w.view(1, -1)
    x = x.view(len(z), *SHAPE)
    p_true = norm.cdf(margins / (sigma * wn))
    true_radius = np.abs(margins) / wn
    return LinearClassifier(w, b), x, p_true, true_radius, margins, w


def _wrong(certs, margins, true_radius) -> int:
    bad = 0
    for c, m, r in zip(certs, margins, true_radius, strict=True):
        if c.label is not None and (c.label != int(m > 0) or c.radius > r):
            bad += 1
    return bad


def test_counts_sum_to_n_for_any_batching_and_are_seeded():
    sigma = 0.5
    model, x, *_ = _setup(sigma, np.linspace(-1, 1, 7))
    for batch in (1, 5, 64, 10_000):
        sm = Smoothed(GaussianNoise(model, sigma), 2, batch_size=batch)
        c = sm.counts(x, 37, torch.Generator().manual_seed(3))
        assert c.shape == (7, 2) and torch.all(c.sum(1) == 37)
    sm = Smoothed(GaussianNoise(model, sigma), 2, batch_size=64)
    a = sm.counts(x, 100, torch.Generator().manual_seed(1))
    b = sm.counts(x, 100, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_counts_follow_the_closed_form_probability():
    sigma = 0.5
    margins = np.linspace(-1.5, 1.5, 9)
    model, x, p_true, *_ = _setup(sigma, margins)
    n = 4000
    sm = Smoothed(GaussianNoise(model, sigma), 2, batch_size=2000)
    freq = sm.counts(x, n, torch.Generator().manual_seed(2))[:, 1].double().numpy() / n
    assert np.all(np.abs(freq - p_true) <= 5 * np.sqrt(p_true * (1 - p_true) / n) + 1e-9)


def test_certify_wrong_certificate_rate_is_at_most_alpha():
    sigma, alpha, n0, n = 0.5, 0.05, 20, 300
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(4)
    wrong = naive_wrong = total = 0
    for rep in range(8):
        # margins where p_true ranges over (0.55, 0.995): the bound is tight there
        z = rng.uniform(0.1, 2.5, 50) * rng.choice([-1, 1], 50)
        model, x, p_true, true_radius, margins, _ = _setup(sigma, z, seed=rep)
        sm = Smoothed(GaussianNoise(model, sigma), 2, batch_size=5000)
        certs = sm.certify(x, n0, n, alpha, g)
        wrong += _wrong(certs, margins, true_radius)
        total += len(certs)
        # the same counts with the point estimate k/n instead of a confidence bound
        naive = [sigma * norm.ppf(min(c.count / n, 1 - 1e-12)) for c in certs]
        naive_wrong += sum(r > t for r, t, c in zip(naive, true_radius, certs, strict=True)
                           if c.label is not None)
    limit = binom.ppf(1 - 1e-6, total, alpha)
    assert wrong <= limit
    assert naive_wrong > limit  # the check has power: an unsound bound is caught


def test_attack_along_the_worst_direction_inside_the_radius_keeps_the_prediction():
    # the worst perturbation of a linear smoothed classifier is along -sign(margin) w;
    # moving 0.999 R that way must leave g's prediction unchanged (closed form and Monte Carlo)
    sigma, alpha = 0.4, 0.01
    z = np.linspace(0.8, 3.0, 20) * np.tile([1, -1], 10)
    model, x, p_true, true_radius, margins, w = _setup(sigma, z, seed=7)
    wn = w.norm().item()
    sm = Smoothed(GaussianNoise(model, sigma), 2, batch_size=4000)
    g = torch.Generator().manual_seed(8)
    certs = sm.certify(x, 50, 2000, alpha, g)
    certified = [i for i, c in enumerate(certs) if c.label is not None]
    assert len(certified) >= 15
    radius = torch.tensor([certs[i].radius for i in certified], dtype=torch.float64)
    sign = torch.tensor(np.sign(margins[certified]))
    x_adv = x[certified] - (0.999 * radius * sign)[:, None, None, None] * (w / wn).view(1, *SHAPE)
    m_adv = (x_adv.flatten(1) @ w).numpy()
    assert np.all(np.sign(m_adv) == np.sign(margins[certified]))  # closed form: same side
    pred = sm.predict(x_adv, 2000, alpha, g)
    labels = [certs[i].label for i in certified]
    flipped = sum(p is not None and p != lab for p, lab in zip(pred, labels, strict=True))
    assert flipped <= binom.ppf(1 - 1e-6, len(certified), 2 * alpha)


def test_predict_abstains_at_a_fair_coin_and_answers_clear_cases():
    sigma, alpha = 0.5, 0.01
    model, x, *_ = _setup(sigma, np.array([0.0] * 100 + [3.0] * 5 + [-3.0] * 5), seed=2)
    sm = Smoothed(GaussianNoise(model, sigma), 2, batch_size=5000)
    pred = sm.predict(x, 400, alpha, torch.Generator().manual_seed(5))
    answered = sum(p is not None for p in pred[:100])
    assert answered <= binom.ppf(1 - 1e-6, 100, alpha)  # P[answer at p = 1/2] <= alpha
    assert pred[100:] == [1] * 5 + [0] * 5


def test_certified_accuracy_counts_label_and_radius():
    certs = [Certificate(1, 0.3, 0.9, 90, 100, 0.01), Certificate(0, 0.6, 0.99, 99, 100, 0.01),
             Certificate(None, 0.0, 0.4, 40, 100, 0.01), Certificate(2, 0.8, 0.999, 100, 100, 0.01)]
    labels = [1, 0, 0, 1]
    acc = certified_accuracy(certs, labels, [0.0, 0.25, 0.5, 0.75])
    assert acc == {0.0: 0.5, 0.25: 0.5, 0.5: 0.25, 0.75: 0.0}
    radii, values = curve(certs, labels, steps=5, max_radius=0.6)
    assert radii.tolist() == pytest.approx([0, 0.15, 0.3, 0.45, 0.6])
    assert values.tolist() == [0.5, 0.5, 0.5, 0.25, 0.25]


def test_clip_smooths_the_clipped_base_classifier():
    """GaussianNoise(clip=True) feeds clip(x + noise, 0, 1) to the base classifier: a classifier
    that answers 1 only for a pixel above 1 never does, while unclipped noise often gets there."""

    class AboveOne(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x.flatten(1)[:, :1] - 1.0
            return torch.cat([-s, s], 1)

    x = torch.full((1, *SHAPE), 0.95)
    for clip, lo, hi in ((False, 0.3, 0.6), (True, 0.0, 0.0)):  # P[0.95 + N(0, .25^2) > 1] = 0.42
        counts = Smoothed(GaussianNoise(AboveOne(), 0.25, clip=clip), 2, batch_size=500).counts(
            x, 2000, torch.Generator().manual_seed(0))
        assert lo <= counts[0, 1].item() / 2000 <= hi, (clip, counts)
