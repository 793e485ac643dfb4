"""Layer-wise amplification ratios against direct computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qrobust.defenses.amplification import (
    amplification_ratios,
    compare_amplification,
    default_layers,
    layer_outputs,
)
from qrobust.errors import ConfigError
from qrobust.report.plots import plot_amplification


def gen(s):
    return torch.Generator().manual_seed(s)


def two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def test_ratios_equal_a_direct_computation():
    model = two_layer()
    x = torch.rand(20, 1, 2, 3, generator=gen(1), dtype=torch.float64)
    d = 0.05 * torch.randn(20, 1, 2, 3, generator=gen(2), dtype=torch.float64)
    rows = amplification_ratios(model, x, d)
    assert [r["layer"] for r in rows] == ["input", "1", "3"]
    lin1, lin2 = model[1], model[3]

    def per_image(f):
        a, b = f(x.flatten(1)), f((x + d).flatten(1))
        return torch.stack([(b[i] - a[i]).norm() / a[i].norm() for i in range(20)])

    expected = [per_image(lambda z: z), per_image(lin1),
                per_image(lambda z: lin2(torch.relu(lin1(z))))]
    for row, e in zip(rows, expected, strict=True):
        assert row["mean"] == pytest.approx(e.mean().item(), rel=1e-10)
        assert row["median"] == pytest.approx(e.median().item(), rel=1e-10)
    assert not any(m._forward_hooks for m in model.modules())  # hooks are removed


def test_orthogonal_layer_preserves_and_scaled_layer_keeps_the_ratio():
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen(3), dtype=torch.float64))
    lin = nn.Linear(8, 8, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(q)
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(10, 1, 2, 4, generator=gen(4), dtype=torch.float64)
    d = 0.1 * torch.randn(10, 1, 2, 4, generator=gen(5), dtype=torch.float64)
    rows = amplification_ratios(model, x, d)
    assert rows[1]["mean"] == pytest.approx(rows[0]["mean"], rel=1e-10)
    with torch.no_grad():
        lin.weight.mul_(7.0)  # ratios are scale invariant: the norm of f_l cancels
    assert amplification_ratios(model, x, d)[1]["mean"] == pytest.approx(rows[1]["mean"], rel=1e-10)


def test_conv_layers_and_compare_and_plot(tmp_path):
    torch.manual_seed(1)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    assert default_layers(cnn) == ["0", "3"]
    x = torch.rand(4, 1, 4, 4, generator=gen(6))
    outs = layer_outputs(cnn, x, ["3", "0"])
    assert list(outs) == ["0", "3"] and outs["0"].shape == (4, 64)  # execution order
    d = 0.01 * torch.randn(4, 1, 4, 4, generator=gen(7))
    res = compare_amplification({"a": cnn, "b": cnn}, x, d)
    assert res["a"] == res["b"] and len(res["a"]) == 3
    assert plot_amplification(res, tmp_path / "amp.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="not found"):
        layer_outputs(cnn, x, ["fc9"])
    with pytest.raises(ConfigError, match="shape"):
        amplification_ratios(cnn, x, d[:2])
