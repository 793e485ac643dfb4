"""Gradient estimators against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qrobust.attacks import BPDA, EOT, Autograd, Temperature, auto_estimator
from qrobust.attacks.gradients import (
    _Replicated,
    draws_per_pass,
    global_temperature,
    hessian_proxy,
    hessian_temperature,
    input_jacobian,
)
from qrobust.attacks.losses import ce
from qrobust.defenses import BitDepth, MCDropout, MedianFilter, defend, split_at_randomness
from qrobust.errors import ConfigError


def _ce(y):
    return lambda z: ce(z, y)


def _net(seed=0, drop: float = 0.0, gen=None):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(16, 12), nn.Tanh()]
    if drop:
        layers.append(MCDropout(drop, gen))
    return nn.Sequential(*layers, nn.Linear(12, 4)).double()


def test_autograd_gradient_matches_finite_differences():
    model = _net()
    x, y = torch.rand(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    ev = Autograd()(model, x, _ce(y))
    e, i = 1e-6, (1, 0, 2, 3)
    xp, xm = x.clone(), x.clone()
    xp[i] += e
    xm[i] -= e
    fd = (ce(model(xp), y)[1] - ce(model(xm), y)[1]) / (2 * e)
    assert ev.grad[i].item() == pytest.approx(fd.item(), rel=1e-6)
    torch.testing.assert_close(ev.loss, ce(model(x), y).detach())


def test_eot_on_deterministic_model_equals_autograd():
    model = _net()
    x, y = torch.rand(5, 1, 4, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    a, b = Autograd()(model, x, _ce(y)), EOT(7)(model, x, _ce(y))
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(torch.log_softmax(a.logits, 1), b.logits)


def test_eot_is_the_mean_over_draws():
    # one batch of n draws == the average of n separate passes with the same masks
    x, y = torch.rand(4, 1, 4, 4, dtype=torch.float64), torch.randint(0, 4, (4,))
    n = 6
    batched = EOT(n)(_net(drop=0.4, gen=torch.Generator().manual_seed(1)), x, _ce(y))
    model = _net(drop=0.4, gen=torch.Generator().manual_seed(1))
    prefix, rest = split_at_randomness(model)
    masks = (torch.rand((n * 4, 12), generator=torch.Generator().manual_seed(1))
             >= 0.4).view(n, 4, 12).double()
    grads, losses = [], []
    for i in range(n):
        xg = x.clone().requires_grad_(True)
        h = prefix(xg) * masks[i] / 0.6
        loss = ce(rest[-1](h), y)
        grads.append(torch.autograd.grad(loss.sum(), xg)[0])
        losses.append(loss.detach())
    torch.testing.assert_close(batched.grad, torch.stack(grads).mean(0))
    torch.testing.assert_close(batched.loss, torch.stack(losses).mean(0))


def test_eot_runs_the_deterministic_prefix_once():
    model = _net(drop=0.3)
    prefix, rest = split_at_randomness(model)
    calls = []
    model[1].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    EOT(5)(model, x, _ce(torch.zeros(3, dtype=torch.long)))
    assert calls == [3]  # the first Linear saw the 3 images once, not 15
    assert isinstance(_Replicated(prefix, rest, 2)(torch.rand(3, 1, 4, 4).double()), torch.Tensor)


def test_eot_chunks_give_the_same_result_on_deterministic_models():
    model, x, y = _net(), torch.rand(3, 1, 4, 4, dtype=torch.float64), torch.tensor([1, 2, 3])
    chunked, whole = EOT(5, chunk=2)(model, x, _ce(y)), EOT(5)(model, x, _ce(y))
    torch.testing.assert_close(chunked.grad, whole.grad)
    torch.testing.assert_close(chunked.loss, whole.loss)
    with pytest.raises(ConfigError):
        EOT(0)


def test_draws_per_pass_keeps_each_activation_under_the_fresh_mapping_size(monkeypatch):
    import qrobust.hardware as hardware

    monkeypatch.setattr(hardware, "fresh_mapping_bytes", lambda: 32 << 20)
    assert draws_per_pass(10, 6_422_528) == 5  # 32 x 64 x 28 x 28 float32: five draws fit
    assert draws_per_pass(10, 1 << 30) == 1 and draws_per_pass(10, 1000) == 10
    assert draws_per_pass(10, 0) == 10
    monkeypatch.setattr(hardware, "fresh_mapping_bytes", lambda: None)  # no glibc
    assert draws_per_pass(10, 1 << 30) == 10


def test_eot_auto_chunk_measures_the_first_pass_then_batches_what_fits(monkeypatch):
    import qrobust.hardware as hardware

    # one draw of 3 images: the random suffix's largest output is 3 x 12 float64 = 288 bytes
    monkeypatch.setattr(hardware, "fresh_mapping_bytes", lambda: 600)
    model = _net(drop=0.3, gen=torch.Generator().manual_seed(0))
    seen = []
    model[-1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    x, y = torch.rand(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    est = EOT(5)
    first = est(model, x, _ce(y))
    second = est(model, x, _ce(y))
    assert seen == [15, 6, 6, 3]  # all 5 draws, then 2 + 2 + 1
    assert first.draw_pred.shape == second.draw_pred.shape == (5, 3)
    deterministic = _net()
    chunked, whole = EOT(5), EOT(5, chunk=5)
    for _ in range(2):
        a, b = chunked(deterministic, x, _ce(y)), whole(deterministic, x, _ce(y))
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(a.loss, b.loss)
    with pytest.raises(ConfigError, match="chunk"):
        EOT(5, chunk=0)


def test_bpda_is_the_gradient_at_the_filtered_point():
    # BPDA with an identity surrogate: value of f(g(x)), gradient of f at g(x)
    model = _net()
    defended = defend(model, BitDepth(3))
    x, y = torch.rand(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    plain, bpda = Autograd()(defended, x, _ce(y)), BPDA()(defended, x, _ce(y))
    assert plain.grad.abs().max() == 0  # rounding: no gradient at all
    gx = BitDepth(3)(x)
    direct = Autograd()(model, gx, _ce(y))
    torch.testing.assert_close(bpda.grad, direct.grad)
    torch.testing.assert_close(bpda.loss, direct.loss)
    # hooks are removed afterwards
    assert not defended[0]._forward_hooks


def test_auto_estimator_reads_defense_attributes():
    model = _net()
    assert auto_estimator(model).name == "autograd"
    assert auto_estimator(defend(model, BitDepth(3))).name == "bpda"
    assert auto_estimator(defend(model, MedianFilter(3))).name == "autograd"  # exact a.e.
    assert auto_estimator(_net(drop=0.2), 4).name == "eot4+autograd"
    assert auto_estimator(defend(_net(drop=0.2), BitDepth(2))).name == "eot10+bpda"


def test_input_jacobian_of_a_linear_model_is_its_weight():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    _, jac = input_jacobian(lin, x)
    torch.testing.assert_close(jac, lin[1].weight.unsqueeze(0).expand(3, 5, 16))
    sv = np.linalg.svd(lin[1].weight.detach().numpy(), compute_uv=False)
    assert global_temperature(lin, x) == pytest.approx(1 / sv.mean(), rel=1e-9)


def test_hessian_proxy_matches_explicit_matrices():
    g = torch.Generator().manual_seed(0)
    z, jac = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, 7, generator=g,
                                                                                dtype=torch.float64)
    betas = torch.tensor([[0.5, 1.0, 3.0]] * 3, dtype=torch.float64)
    got = hessian_proxy(z, jac @ jac.transpose(1, 2), betas)
    for b in range(3):
        for m in range(3):
            beta = betas[b, m]
            p = torch.softmax(beta * z[b], 0)
            s = torch.diag(p) - torch.outer(p, p)
            expect = torch.linalg.matrix_norm(beta**2 * jac[b].T @ s @ jac[b])
            assert got[b, m].item() == pytest.approx(expect.item(), rel=1e-9)


def test_hessian_temperature_maximizes_the_proxy_and_keeps_misclassified_at_one():
    model = _net()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[0] = (pred[0] + 1) % 4  # misclassified
    beta = hessian_temperature(model, x, y)
    assert beta[0] == 1.0 and (beta > 0).all()
    z, jac = input_jacobian(model, x)
    gram = jac @ jac.transpose(1, 2)
    for b in range(1, 6):
        if beta[b] == 1.0:
            continue
        around = torch.tensor([[beta[b] * 0.8, beta[b], beta[b] * 1.25]], dtype=torch.float64)
        vals = hessian_proxy(z[b:b + 1], gram[b:b + 1], around)[0]
        assert vals[1] >= vals[0] * 0.99 and vals[1] >= vals[2] * 0.99


def test_temperature_validation():
    with pytest.raises(ConfigError):
        Temperature("fixed")
    with pytest.raises(ConfigError):
        Temperature("softmax")
    t = Temperature("fixed", beta=0.5)
    assert torch.equal(t.prepare(None, torch.zeros(3, 1), None), torch.full((3,), 0.5))


def test_randomized_success_needs_every_draw():
    from qrobust.attacks import Evaluation

    logits = torch.tensor([[0.0, 5.0], [0.0, 5.0]])  # the vote says class 1 for both
    draws = torch.tensor([[1, 1], [1, 0], [1, 1]])  # sample 1: one draw still says 0
    ev = Evaluation(torch.zeros(2), logits, None, draws)
    assert ev.success(torch.tensor([0, 0]), None).tolist() == [True, False]
    assert ev.success(torch.tensor([0, 0]), torch.tensor([1, 1])).tolist() == [True, False]
    assert ev.select(torch.tensor([False, True])).draw_pred.tolist() == [[1], [0], [1]]


def test_eot_attack_on_random_model_keeps_highest_expected_loss_point():
    from qrobust.attacks import PGD, ThreatModel

    model = _net(drop=0.3, gen=torch.Generator().manual_seed(0)).float()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 4, (8,))
    res = PGD(model, ThreatModel("linf", 0.2), steps=4, estimator=EOT(4)).run(
        x, y, torch.Generator().manual_seed(0))
    assert res.x_adv.shape == x.shape and torch.isfinite(res.loss).all()
    assert (ThreatModel("linf", 0.2).distance(res.x_adv, x) <= 0.2 + 1e-6).all()


def test_input_gradients_only_restores_parameters_and_keeps_the_gradient():
    from qrobust.attacks.gradients import input_gradients_only

    model = _net()
    model[1].weight.requires_grad_(False)  # a frozen parameter stays frozen
    x, y = torch.rand(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    xg = x.clone().requires_grad_(True)
    (expect,) = torch.autograd.grad(ce(model(xg), y).sum(), xg)
    with input_gradients_only(model):
        assert not any(p.requires_grad for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True]
    torch.testing.assert_close(Autograd()(model, x, _ce(y)).grad, expect)
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True]
