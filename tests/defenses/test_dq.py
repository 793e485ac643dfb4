"""Defensive Quantization: the Lipschitz regularizer against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qrobust.defenses.dq import (
    LipschitzRegularizer,
    gram_deviation,
    lipschitz_penalty,
    regularized_weights,
)
from qrobust.errors import ConfigError
from qrobust.quant import QuantAct


def paper_loop(w: torch.Tensor) -> torch.Tensor:
    """||W^T W - I||_F^2 written as the paper states it, entry by entry (W reshaped to C_out x -1)."""
    w = w.reshape(w.shape[0], -1)
    m, n = w.shape
    total = torch.zeros((), dtype=w.dtype)
    for i in range(n):
        for j in range(n):
            g = sum(w[k, i] * w[k, j] for k in range(m))
            total = total + (g - (1.0 if i == j else 0.0)) ** 2
    return total


SHAPES = [(3, 5), (5, 3), (4, 4), (2, 3, 2, 2), (6, 1, 2, 2)]  # wide, tall, square, conv


@pytest.mark.parametrize("shape", SHAPES)
def test_value_equals_paper_formula_up_to_the_stated_constant(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m, n = shape[0], int(np.prod(shape[1:]))
    # ours uses the smaller Gram: paper value - (n - min(m, n))
    expected = paper_loop(w) - (n - min(m, n))
    torch.testing.assert_close(gram_deviation(w), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_value_equals_singular_value_form(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = np.linalg.svd(w.reshape(shape[0], -1).numpy(), compute_uv=False)
    assert gram_deviation(w).item() == pytest.approx(float(((s**2 - 1) ** 2).sum()), rel=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_equals_paper_formula_gradient_and_closed_form(shape):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(gram_deviation(w), w)
    (paper,) = torch.autograd.grad(paper_loop(w), w)
    torch.testing.assert_close(ours, paper, rtol=1e-10, atol=1e-10)
    m2 = w.detach().reshape(shape[0], -1)
    closed = 4 * (m2 @ m2.T - torch.eye(shape[0], dtype=torch.float64)) @ m2  # d/dW ||WW^T-I||^2
    torch.testing.assert_close(ours, closed.reshape(shape), rtol=1e-10, atol=1e-10)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: lipschitz_penalty([x, y], 0.37), (a, b))


def test_zero_at_orthogonal_weights_and_beta_scaling():
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=torch.Generator().manual_seed(4),
                                       dtype=torch.float64))
    assert gram_deviation(q[:4]).item() == pytest.approx(0.0, abs=1e-12)  # 4x9 semi-orthogonal
    assert gram_deviation(q[:, :4]).item() == pytest.approx(0.0, abs=1e-12)  # 9x4
    w = [torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)]
    expected = 0.5 * 6e-4 * sum(paper_loop(x) - (x.shape[1] - min(x.shape)) for x in w)
    torch.testing.assert_close(lipschitz_penalty(w, 6e-4), expected)


def test_loss_term_collects_linear_and_conv_weights_not_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    ws = regularized_weights(model)
    assert [tuple(w.shape) for w in ws] == [(4, 1, 3, 3), (3, 144)]
    term = LipschitzRegularizer(beta=1e-3)
    x = torch.rand(2, 1, 8, 8)
    value = term(model, x, torch.zeros(2, dtype=torch.long), model(x))
    torch.testing.assert_close(value, 0.5e-3 * (gram_deviation(ws[0]) + gram_deviation(ws[1])))


def test_invalid_inputs_fail_loudly():
    with pytest.raises(ConfigError, match="beta"):
        LipschitzRegularizer(beta=-1.0)
    with pytest.raises(ConfigError, match="no linear or conv"):
        lipschitz_penalty([], 1.0)


def tiny_float():
    from qrobust.models import Normalize

    torch.manual_seed(0)
    return nn.Sequential(Normalize([0.5], [0.25]), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 16, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("abits", [1, 2, 4])
def test_dq_model_has_relu6_clipped_activations_on_a_fixed_grid(abits):
    from qrobust.defenses.dq import dq_model, dq_recipe
    from qrobust.quant import QuantAct

    twin = dq_model(tiny_float(), wbits=4, abits=abits)
    acts = [m for m in twin.modules() if isinstance(m, QuantAct)]
    assert acts and all(m.spec.clip == 6.0 and not m.spec.signed for m in acts)
    assert dq_recipe(4, abits) == f"w4a{abits},relu6"
    out = acts[0](torch.linspace(-3, 9, 101))
    step = 6.0 / (2**abits - 1)
    torch.testing.assert_close(out / step, (out / step).round(), atol=1e-5, rtol=0)
    assert out.min() == 0 and out.max() == pytest.approx(6.0)


def test_regularizer_reaches_the_latent_weights_of_the_twin():
    from qrobust.defenses.dq import dq_model

    twin = dq_model(tiny_float(), wbits=3, abits=3).train()
    ws = regularized_weights(twin)
    assert [tuple(w.shape) for w in ws] == [(4, 1, 3, 3), (8, 64), (3, 8)]
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    term = LipschitzRegularizer(1e-2)(twin, x, torch.zeros(4, dtype=torch.long), twin(x))
    term.backward()
    for w in ws:  # only the penalty was backpropagated: grads are the penalty's own
        clone = w.detach().clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(0.5e-2 * gram_deviation(clone), clone)
        torch.testing.assert_close(w.grad, expected)
    with pytest.raises(ConfigError, match="bit widths"):
        dq_model(tiny_float(), wbits=4, abits=9)


@pytest.mark.parametrize("lsq", [False, True])
def test_dq_training_lowers_the_penalty_against_vanilla_qat(lsq):
    from qrobust.data import load_dataset, take
    from qrobust.data.core import Dataset
    from qrobust.defenses.dq import fit_dq
    from qrobust.train import TrainConfig

    ds = load_dataset("digits")
    small = Dataset(ds.name, take(ds.train, 600), take(ds.test, 200), ds.classes, ds.source)
    cfg = TrainConfig(epochs=3, batch_size=50, lr=0.02, seed=0, val_fraction=0.1)
    pen = {}
    for beta in (0.0, 1e-2):
        fitted = fit_dq("mlp", small, cfg, wbits=4, abits=4, beta=beta, progress=False, lsq=lsq)
        pen[beta] = sum(gram_deviation(w).item() for w in regularized_weights(fitted.model))
        assert fitted.meta["quant"]["dq"] == {"wbits": 4, "abits": 4, "beta": beta, "lsq": lsq}
        acts = [m for m in fitted.model.modules() if isinstance(m, QuantAct)]
        moved = [float(m.scale.detach()) != pytest.approx(6 / 15) for m in acts if m.spec.clip == 6.0]
        assert moved and all(moved) == lsq  # LSQ trains the ReLU6 scales, observers keep them
        assert fitted.meta["metrics"]["test_acc"] > 0.5
    assert pen[1e-2] < 0.8 * pen[0.0]


def test_dq_checkpoint_round_trip_as_a_quantized_checkpoint(tmp_path):
    from qrobust.checkpoint import load_checkpoint, save_checkpoint
    from qrobust.defenses.dq import dq_model
    from qrobust.models import ModelSpec, build_model

    spec = ModelSpec("small-cnn", (1, 8, 8), 10, 0.0, (0.3,), (0.4,), {"width": 4})
    torch.manual_seed(0)
    twin = dq_model(build_model(spec), 3, 2)
    meta = {"model": spec.to_dict(), "quant": {"recipe": twin.recipe.to_dict()}}
    save_checkpoint(tmp_path / "dq", twin, meta, kind="quantized")
    loaded, _ = load_checkpoint(tmp_path / "dq")
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(x), twin(x))
