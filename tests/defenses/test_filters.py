"""Input filters against scipy.ndimage, bit-depth levels, BPDA surrogates, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from qrobust.attacks import BPDA, PGD, Autograd, ThreatModel
from qrobust.attacks.losses import ce
from qrobust.defenses import (
    DEFENSES,
    BitDepth,
    Defended,
    GaussianFilter,
    MeanFilter,
    MedianFilter,
    bpda_targets,
    defend,
)
from qrobust.defenses.filters import gaussian_kernel, median_filter
from qrobust.errors import ConfigError


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 2, 9, 7, generator=g, dtype=torch.float64)


def _per_channel(fn, x):
    return np.stack([[fn(ch) for ch in img] for img in x.numpy()])


@pytest.mark.parametrize("size", [1, 3, 5])
def test_median_matches_scipy(images, size):
    expect = _per_channel(lambda c: ndimage.median_filter(c, size=size, mode="nearest"), images)
    np.testing.assert_array_equal(MedianFilter(size)(images).numpy(), expect)


@pytest.mark.parametrize("size", [1, 3, 5])
def test_mean_matches_scipy(images, size):
    expect = _per_channel(lambda c: ndimage.uniform_filter(c, size=size, mode="nearest"), images)
    np.testing.assert_allclose(MeanFilter(size)(images).numpy(), expect, atol=1e-12)


@pytest.mark.parametrize(("size", "sigma"), [(3, 0.8), (5, 1.0), (5, None)])
def test_gaussian_matches_scipy(images, size, sigma):
    f = GaussianFilter(size, sigma)
    # scipy's gaussian_filter truncated at radius size // 2 uses the same sampled kernel
    expect = _per_channel(lambda c: ndimage.gaussian_filter(c, f.sigma, mode="nearest",
                                                            radius=size // 2), images)
    np.testing.assert_allclose(f(images.float()).numpy(), expect, atol=1e-6)
    k = gaussian_kernel(size, f.sigma)
    assert k.sum().item() == pytest.approx(1.0) and torch.equal(k, k.T)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bit_depth_levels(images, bits):
    out = BitDepth(bits)(images)
    levels = 2**bits - 1
    codes = out * levels
    torch.testing.assert_close(codes, codes.round())  # on the grid
    assert len(torch.unique(codes.round())) <= levels + 1
    assert (out - images).abs().max() <= 0.5 / levels + 1e-12  # nearest level


def test_filters_are_idempotent_on_constant_images():
    x = torch.full((1, 3, 6, 6), 0.25)
    for f in (MedianFilter(3), MeanFilter(3), GaussianFilter(3), BitDepth(2)):
        torch.testing.assert_close(f(x), torch.full_like(x, 0.25 if not isinstance(f, BitDepth)
                                                         else 1 / 3))


@pytest.mark.parametrize("bad", [0, 2, -1, 2.5])
def test_bad_sizes_fail_loudly(bad):
    with pytest.raises(ConfigError, match="odd"):
        MedianFilter(bad)
    with pytest.raises(ConfigError):
        BitDepth(9)


def test_attributes_and_surrogates():
    for f in (MedianFilter(3), BitDepth(3)):
        assert f.randomized is False
        assert isinstance(f.surrogate(), torch.nn.Identity)
    assert BitDepth(3).differentiable is False
    assert MedianFilter(3).differentiable is True
    for f in (MeanFilter(3), GaussianFilter(3)):
        assert f.differentiable is True and f.surrogate() is f


def test_median_gradient_is_the_exact_derivative_off_ties():
    """The median is piecewise linear: autograd's gradient of <v, median(x)> matches a central
    finite difference (float64, continuous random pixels, so no ties)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((median_filter(x, 3) * v).sum(), x)
    d = torch.randn(x.shape, generator=g, dtype=torch.float64)
    h = 1e-7
    with torch.no_grad():
        fd = ((median_filter(x + h * d, 3) - median_filter(x - h * d, 3)) * v).sum() / (2 * h)
    assert float(grad.abs().sum()) > 0
    torch.testing.assert_close((grad * d).sum(), fd, rtol=1e-6, atol=1e-9)


def test_straight_through_has_the_filter_value_and_the_surrogate_gradient(images):
    from qrobust.attacks.gradients import straight_through

    w = torch.randn_like(images)
    with straight_through(MedianFilter(3)) as n:  # differentiable: not a BPDA target
        assert n == 0
    for f in (BitDepth(3),):
        with straight_through(f) as n:
            assert n == 1
            xg = images.clone().requires_grad_(True)
            out = f(xg)
            (grad,) = torch.autograd.grad((out * w).sum(), xg)
        torch.testing.assert_close(out.detach(), f(images))  # forward: the real filter
        torch.testing.assert_close(grad, w)  # backward: the identity surrogate
        assert not f._forward_hooks


def test_registry_builds_defended_models_with_attributes():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    for name in ("median", "mean", "gaussian", "bit-depth"):
        d = DEFENSES.get(name)(model)
        assert isinstance(d, Defended) and d[-1] is model and d.randomized is False
    assert DEFENSES.get("median")(model, size=5)[0].size == 5
    assert DEFENSES.get("bit-depth")(model).differentiable is False
    assert DEFENSES.get("gaussian")(model).differentiable is True
    d = defend(model, MedianFilter(3), BitDepth(2))
    assert [type(m) for m in bpda_targets(d)] == [BitDepth]
    with pytest.raises(ConfigError, match="unknown defense"):
        DEFENSES.get("jpeg")


def test_bpda_breaks_bit_depth_where_autograd_sees_nothing(digits):
    from tests.attacks.conftest import train_mlp

    xtr, ytr = digits.train.tensors()
    x, y = digits.test.tensors()
    model = defend(train_mlp(xtr, ytr), BitDepth(2))
    threat = ThreatModel("linf", 0.2)
    gen = torch.Generator().manual_seed(0)
    plain = Autograd()(model, x, lambda z: ce(z, y))
    assert plain.grad.abs().max() == 0
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        x_bpda = PGD(model, threat, steps=10, estimator=BPDA())(x, y, gen)
        bpda_acc = (model(x_bpda).argmax(1) == y).float().mean().item()
        x_plain = PGD(model, threat, steps=10, estimator=Autograd())(x, y, gen)
        plain_acc = (model(x_plain).argmax(1) == y).float().mean().item()
    assert bpda_acc < plain_acc - 0.2 and bpda_acc < clean - 0.3, (clean, plain_acc, bpda_acc)
