"""SQ ensembles: the HSIC/CKA diversity estimator against direct formulas, prediction, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from torch import nn

from qrobust.data import Split
from qrobust.defenses.ensemble import (
    EnsembleLoss,
    SQEnsemble,
    build_sq_ensemble,
    cka,
    combine,
    diversity_penalty,
    hsic,
    logits_and_features,
    rbf_kernel,
)
from qrobust.defenses.sq import StochasticQuantizer
from qrobust.errors import ConfigError
from qrobust.train import TrainConfig, accuracy, train


def gen(s):
    return torch.Generator().manual_seed(s)


def test_rbf_kernel_and_hsic_against_direct_formulas():
    z = torch.randn(12, 5, generator=gen(0), dtype=torch.float64)
    w = torch.randn(12, 3, generator=gen(1), dtype=torch.float64)
    d2 = cdist(z.numpy(), z.numpy(), "sqeuclidean")
    off = np.sort(d2[~np.eye(12, dtype=bool)])
    sigma2 = off[(len(off) - 1) // 2] / 2  # torch's median is the lower median
    np.testing.assert_allclose(rbf_kernel(z).numpy(), np.exp(-d2 / (2 * sigma2)), rtol=1e-10)
    np.testing.assert_allclose(rbf_kernel(z, bandwidth=2.0).numpy(), np.exp(-d2 / 8), rtol=1e-10)
    k, l = rbf_kernel(z).numpy(), rbf_kernel(w).numpy()
    h = np.eye(12) - np.ones((12, 12)) / 12
    expected = np.trace(k @ h @ l @ h) / 11**2
    assert hsic(torch.from_numpy(k), torch.from_numpy(l)).item() == pytest.approx(expected, rel=1e-10)


def test_cka_properties():
    z = torch.randn(256, 8, generator=gen(2), dtype=torch.float64)
    k = rbf_kernel(z)
    assert cka(k, k).item() == pytest.approx(1.0, rel=1e-9)
    torch.testing.assert_close(rbf_kernel(3.0 * z), k)  # median bandwidth: scale invariant
    # a deterministic function of z is strongly dependent, fresh noise is not
    dep = cka(k, rbf_kernel(torch.tanh(z @ torch.randn(8, 4, generator=gen(3), dtype=z.dtype))))
    ind = cka(k, rbf_kernel(torch.randn(256, 8, generator=gen(4), dtype=torch.float64)))
    # the biased estimator is positive on independent data, shrinking like ~1/N (0.08 at N=256)
    assert dep.item() > 0.3 and ind.item() < 0.15 and dep.item() > 3 * ind.item()
    assert diversity_penalty([z, z, z]).item() == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ConfigError, match="at least 2"):
        diversity_penalty([z])


def test_combine_mean_and_vote():
    logits = torch.randn(3, 5, 4, generator=gen(5), dtype=torch.float64)
    torch.testing.assert_close(combine(logits, "mean"), logits.softmax(-1).mean(0).log())
    votes = combine(logits, "vote").exp()
    expected = F.one_hot(logits.argmax(-1), 4).sum(0).double() / 3
    torch.testing.assert_close(votes, expected, atol=1e-11, rtol=0)


def tiny_member():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(),
                         nn.Linear(12, 3))


def test_build_members_features_and_surrogate():
    ens = build_sq_ensemble(tiny_member, k=3, bits=3, seed=0, reduce="vote")
    assert ens.randomized and not ens.differentiable
    assert all(sum(isinstance(m, StochasticQuantizer) for m in mem.modules()) == 2
               for mem in ens.members)
    w0, w1 = ens.members[0][1].weight, ens.members[1][1].weight
    assert not torch.equal(w0, w1)  # seeds differ per member
    x = torch.rand(7, 1, 4, 4, generator=gen(6))
    logits, feats = logits_and_features(ens.members[0], x)
    assert logits.shape == (7, 3) and feats.shape == (7, 12)
    sur = ens.surrogate()
    assert sur.differentiable and sur.members[0] is ens.members[0]
    xg = x.clone().requires_grad_(True)
    sur(xg).sum().backward()
    assert xg.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="reduce"):
        SQEnsemble([tiny_member()], "max")


def test_ensemble_loss_value_and_diversity_gradient():
    ens = build_sq_ensemble(tiny_member, k=2, bits=4, seed=1).train()
    x, y = torch.rand(32, 1, 4, 4, generator=gen(7)), torch.randint(0, 3, (32,), generator=gen(8))
    out = ens(x)
    member_logits, feats = ens.last
    term = EnsembleLoss(weight=0.5, member_ce=1.0)
    value = term(ens, x, y, out)
    expected = (F.cross_entropy(member_logits[0], y) + F.cross_entropy(member_logits[1], y)) / 2 \
        + 0.5 * diversity_penalty(feats)
    torch.testing.assert_close(value, expected)
    # descending on the diversity term alone lowers it
    opt = torch.optim.SGD(ens.parameters(), lr=0.5)
    start = None
    for _ in range(30):
        ens(x)
        d = diversity_penalty(ens.last[1])
        start = d.item() if start is None else start
        opt.zero_grad()
        d.backward()
        opt.step()
    ens(x)
    assert diversity_penalty(ens.last[1]).item() < start
    with pytest.raises(ConfigError, match="SQEnsemble in training mode"):
        term(ens.eval(), x, y, out)


def test_trains_with_the_one_loop():
    g = gen(9)
    centers = torch.rand(3, 16, generator=g)
    y = torch.randint(0, 3, (600,), generator=g)
    x = (centers[y] + 0.08 * torch.randn(600, 16, generator=g)).clamp(0, 1)
    split = Split((x * 255).round().to(torch.uint8).view(600, 1, 4, 4).numpy(), y.numpy())
    tr, val = split.subset(slice(0, 500)), split.subset(slice(500, 600))
    ens = build_sq_ensemble(tiny_member, k=2, bits=4, seed=2)
    cfg = TrainConfig(epochs=4, batch_size=50, lr=0.05, optimizer="adam", schedule="constant",
                      weight_decay=0.0)
    train(ens, tr, val, cfg, extra_losses=[EnsembleLoss(weight=0.1)], progress=False)
    assert accuracy(ens, val) > 0.9


def test_fit_save_load_round_trip(tmp_path):
    from qrobust.checkpoint import load_checkpoint, save_checkpoint
    from qrobust.data import load_dataset, take
    from qrobust.data.core import Dataset
    from qrobust.defenses import reseed
    from qrobust.defenses.ensemble import fit_sq_ensemble

    ds = load_dataset("digits")
    small = Dataset(ds.name, take(ds.train, 300), take(ds.test, 100), ds.classes, ds.source)
    cfg = TrainConfig(epochs=1, batch_size=50, lr=0.01, optimizer="adam", seed=0)
    fitted = fit_sq_ensemble("mlp", small, cfg, k=2, bits=3, weight=0.1)
    save_checkpoint(tmp_path / "ens", fitted.model, fitted.meta, kind="sq-ensemble")
    loaded, meta = load_checkpoint(tmp_path / "ens")
    assert isinstance(loaded, SQEnsemble) and len(loaded.members) == 2
    assert meta["ensemble"]["bits"] == 3
    x, _ = small.test.tensors()
    assert reseed(fitted.model, 5) == reseed(loaded, 5) == 2  # one noise stream per member
    a = fitted.model.eval()(x)
    reseed(loaded, 5)
    torch.testing.assert_close(loaded(x), a)


def test_fit_from_a_trained_model_starts_every_member_there():
    """``init``: each member is its own copy of the float model (fine-tuning, not sharing)."""
    from qrobust.data import load_dataset, take
    from qrobust.data.core import Dataset
    from qrobust.defenses.ensemble import fit_sq_ensemble
    from qrobust.models import build_model
    from qrobust.train import model_spec

    ds = load_dataset("digits")
    small = Dataset(ds.name, take(ds.train, 200), take(ds.test, 50), ds.classes, ds.source)
    torch.manual_seed(0)
    init = build_model(model_spec("mlp", small))
    before = {k: v.clone() for k, v in init.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=50, lr=1e-3, optimizer="adam", seed=0)
    ens = fit_sq_ensemble("mlp", small, cfg, k=2, bits=4, weight=0.1, init=init).model
    for k, v in init.state_dict().items():  # the init model itself is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    for member in ens.members:
        w = dict(member.named_parameters())
        for name, p in init.named_parameters():  # fine-tuned a little from the same start
            assert w[name].data_ptr() != p.data_ptr()
            assert (w[name] - p).abs().max() < 0.05
    a, b = (dict(m.named_parameters()) for m in ens.members)
    assert any(not torch.equal(a[n], b[n]) for n in a)  # the diversity term pulls them apart
