"""Noise-aware QAT, and an EOT-PGD attack on a trained smoothed classifier inside its
certified radius (the prediction must not change)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binom

from qrobust.certify import GaussianNoise, Smoothed, noise_aware_qat
from qrobust.certify.training import SmoothingNoise
from qrobust.data import take, train_val_split
from qrobust.train import TrainConfig

SIGMA = 0.5  # large enough that the digits model is not yet robust to it


def _noisy_accuracy(model, x, y, sigma, seed=0, draws=4):
    counts = Smoothed(GaussianNoise(model, sigma), 10, batch_size=4000).counts(
        x, draws, torch.Generator().manual_seed(seed))
    return counts.gather(1, y[:, None]).sum().item() / (draws * len(y))


@pytest.fixture(scope="module")
def noisy_twin(digits, digits_cnn):
    from qrobust.quant import quantize

    calib = take(digits.train, 256, seed=1).tensors()[0]
    twin = quantize(digits_cnn.model, "w8a8", calib=calib)
    x, y = digits.test.tensors()
    before = _noisy_accuracy(twin, x, y, SIGMA)
    tr, val = train_val_split(digits.train, 0.1, 0)
    cfg = TrainConfig(epochs=2, optimizer="adam", lr=1e-3, schedule="constant", weight_decay=0.0,
                      batch_size=64)
    result = noise_aware_qat(twin, tr, val, SIGMA, cfg, noise="discrete-gaussian",
                             progress=False)
    return twin, before, result


def test_integer_training_noise_stays_on_the_pixel_grid(digits, digits_cnn):
    from qrobust.quant import quantize, widen_input

    layer = SmoothingNoise(SIGMA, "discrete-gaussian", torch.Generator().manual_seed(0))
    x = torch.randint(0, 256, (64, 1, 8, 8), generator=torch.Generator().manual_seed(1)) / 255
    y = layer(x)
    codes = y * 255
    assert torch.equal(codes, codes.round()) and y.min() < 0 and y.max() > 1  # unclipped
    assert abs((y - x).std().item() - SIGMA) < 0.03
    z = SmoothingNoise(SIGMA, "gaussian", torch.Generator().manual_seed(0))(x)
    assert abs((z - x).std().item() - SIGMA) < 0.03
    # the twin clips to its input window: [0, 1] by default, wider once widened
    twin = quantize(digits_cnn.model, "w8a8", calib=take(digits.train, 256, seed=1).tensors()[0])
    wide = widen_input(twin, -3 * SIGMA, 1 + 3 * SIGMA)
    with torch.no_grad():
        assert torch.equal(twin(y), twin(y.clamp(0, 1)))
        assert not torch.equal(wide(y), wide(y.clamp(0, 1)))


def test_noise_aware_qat_makes_the_twin_accurate_under_noise(digits, noisy_twin):
    twin, before, result = noisy_twin
    x, y = digits.test.tensors()
    after = _noisy_accuracy(twin, x, y, SIGMA, seed=1)
    assert len(result.history) >= 1 and not twin.training
    assert after > before + 0.05, (before, after)
    assert after > 0.6


def test_eot_pgd_inside_the_certified_radius_does_not_flip_the_smoothed_prediction(
        digits, noisy_twin):
    twin, *_ = noisy_twin
    alpha = 0.01
    x, y = take(digits.test, 12, seed=3).tensors()
    smoothed = Smoothed(GaussianNoise(twin, SIGMA), 10, batch_size=4000)
    g = torch.Generator().manual_seed(4)
    certs = smoothed.certify(x, 32, 300, alpha, g)
    keep = [i for i, c in enumerate(certs) if c.label is not None and c.radius > 0.05]
    assert len(keep) >= 6
    xk = x[keep]
    label = torch.tensor([certs[i].label for i in keep])
    radius = torch.tensor([certs[i].radius for i in keep])

    def attack(eps: torch.Tensor, steps: int = 8, draws: int = 8) -> torch.Tensor:
        """L2 PGD on the soft smoothed classifier (EOT over the noise), Salman et al. style."""
        delta = torch.zeros_like(xk)
        step = 2.5 * eps / steps
        for _ in range(steps):
            delta.requires_grad_(True)
            rep = (xk + delta).repeat_interleave(draws, 0)
            noise = SIGMA * torch.randn(rep.shape, generator=g)
            probs = F.softmax(twin(rep + noise), 1).view(len(xk), draws, -1).mean(1)
            loss = F.nll_loss(torch.log(probs + 1e-12), label)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = delta + step.view(-1, 1, 1, 1) * grad / gn
                norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                delta = delta * torch.clamp(eps.view(-1, 1, 1, 1) / norm.clamp_min(1e-12), max=1)
                delta = (xk + delta).clamp(0, 1) - xk  # stays in the ball (shrinks coordinates)
        return (xk + delta).detach()

    x_adv = attack(0.99 * radius)
    assert torch.all((x_adv - xk).flatten(1).norm(dim=1) <= radius + 1e-6)
    pred = smoothed.predict(x_adv, 500, alpha, g)
    flipped = sum(p is not None and p != int(t) for p, t in zip(pred, label, strict=True))
    assert flipped <= binom.ppf(1 - 1e-6, len(keep), 2 * alpha)
    # the attack has teeth: with a budget far beyond the certificates it does flip predictions
    far = attack(torch.full_like(radius, 5.0))
    pred_far = smoothed.predict(far, 100, alpha, g)
    assert sum(p != int(t) for p, t in zip(pred_far, label, strict=True)) >= len(keep) // 2
