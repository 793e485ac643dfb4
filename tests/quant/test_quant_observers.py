"""Observers against direct computations (numpy percentiles, exhaustive MSE search)."""

import numpy as np
import pytest
import torch

from qrobust.quant import OBSERVERS, QuantSpec, fake_quantize, observe, observers
from qrobust.quant.functional import qparams_from_range


def _data(n=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 2 + 0.5


def test_registry_names():
    assert OBSERVERS.names() == ["minmax", "mse", "percentile"]


@pytest.mark.parametrize("name", ["minmax", "mse", "percentile"])
@pytest.mark.parametrize("signed,symmetric", [(True, True), (True, False), (False, True)])
def test_every_observer_returns_valid_qparams(name, signed, symmetric):
    spec = QuantSpec(4, signed=signed, symmetric=symmetric, granularity="tensor", observer=name)
    x = _data() if signed else _data().relu()
    s, z = observe(x, spec)
    assert s.ndim == 0 and s > 0 and spec.qmin <= z <= spec.qmax and z == z.round()


def test_minmax_maps_extremes_to_the_code_range():
    x = _data()
    s, z = observe(x, QuantSpec(8, granularity="tensor"))
    assert torch.isclose(s, x.abs().max() / 127)
    s, z = observe(x, QuantSpec(8, symmetric=False, granularity="tensor"))
    assert torch.isclose(s, (x.max() - x.min()) / 255)


def test_percentile_matches_numpy():
    x = _data(20_000, 1).relu()
    spec = QuantSpec(8, signed=False, granularity="tensor", observer="percentile", percentile=99.0)
    s, _ = observe(x, spec)
    expected = np.percentile(x.numpy(), 99.0, method="nearest") / 255
    assert abs(float(s) - expected) <= 1e-3 * expected


def test_mse_beats_minmax_and_a_fine_grid():
    x = torch.cat([_data(), torch.tensor([40.0])])  # one outlier
    spec = QuantSpec(3, granularity="tensor", observer="mse")
    s, z = observe(x, spec)

    def err(scale):
        return float((fake_quantize(x, spec, torch.tensor(scale), torch.tensor(0.0)) - x)
                     .pow(2).mean())

    best = err(float(s))
    assert best <= err(float(x.abs().max()) / spec.qmax)
    # exhaustive search on a finer grid may do only slightly better
    grid = min(err(float(x.abs().max()) * f / spec.qmax) for f in np.linspace(0.01, 1, 400))
    assert best <= grid * 1.05


def test_per_channel_and_fixed_clip_and_sign():
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    s, z = observe(w, QuantSpec(8))
    assert s.shape == (6,) and torch.allclose(s, w.abs().amax(dim=(1, 2, 3)) / 127)
    s, _ = observe(w, QuantSpec(4, clip=1.0, granularity="tensor"))
    assert torch.isclose(s, torch.tensor(1 / 7))
    s, _ = observe(w, QuantSpec(1))
    assert torch.allclose(s, w.abs().mean(dim=(1, 2, 3)))  # XNOR-Net scale
    s, _ = observe(torch.zeros(1), QuantSpec(4, signed=False, clip=6.0, granularity="tensor"))
    assert torch.isclose(s, torch.tensor(6 / 15))  # ReLU6 quantizer


def _sequential_mse(rows, spec, grid):
    """The MSE search one shrink at a time, keeping the first best: the observer's oracle."""
    lo, hi = rows.amin(1), rows.amax(1)
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_z = torch.zeros_like(lo), torch.zeros_like(lo)
    for i in range(grid):
        shrink = 1.0 - i / grid
        s, z = qparams_from_range(lo * shrink, hi * shrink, spec)
        err = (fake_quantize(rows, spec, s, z) - rows).pow(2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


@pytest.mark.parametrize("block", [2**22, 1000])  # one pass, and one grid point per pass
@pytest.mark.parametrize("signed,symmetric", [(True, True), (True, False), (False, True)])
def test_mse_search_equals_the_sequential_search(monkeypatch, block, signed, symmetric):
    monkeypatch.setattr(observers, "MSE_BLOCK", block)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 2000, generator=g) * torch.rand(8, 1, generator=g) * 3
    w[0] = torch.randn(2000, generator=g)
    w[0, 0] = 8.0  # an outlier: the best range is well inside [min, max]
    w = w if signed else w.abs()
    spec = QuantSpec(3, signed=signed, symmetric=symmetric, observer="mse")
    s, z = observe(w, spec)
    s_ref, z_ref = _sequential_mse(w, spec, observers.MSE_GRID)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
    assert s[0] < w[0].abs().max() / spec.qmax * 0.9  # the outlier row was shrunk
