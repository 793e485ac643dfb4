"""Detection scores against direct computations; AUC on constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from scipy.stats import mannwhitneyu
from torch import nn

from qrobust.defenses.detection import (
    detection_auc,
    detection_score,
    information_plane,
    member_probs,
    mutual_information,
    vote_disagreement,
)
from qrobust.defenses.ensemble import SQEnsemble
from qrobust.errors import ConfigError
from qrobust.report.plots import plot_information_plane


def test_mutual_information_against_scipy_entropies():
    probs = torch.rand(4, 30, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)
    p = probs.numpy()
    expected = [scipy_entropy(p[:, i].mean(0)) - np.mean([scipy_entropy(p[k, i]) for k in range(4)])
                for i in range(30)]
    np.testing.assert_allclose(mutual_information(probs).numpy(), expected, rtol=1e-10, atol=1e-12)
    assert (mutual_information(probs) <= math.log(4) + 1e-12).all()


def test_mutual_information_known_values():
    same = torch.tensor([[[0.2, 0.8]], [[0.2, 0.8]], [[0.2, 0.8]]])
    assert mutual_information(same).item() == pytest.approx(0.0, abs=1e-7)
    opposite = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    assert mutual_information(opposite).item() == pytest.approx(math.log(2))


def test_vote_disagreement_known_values():
    # 4 members on 3 inputs: unanimous, 3-1 split, 2-2 split
    p = torch.tensor([[[1, 0], [1, 0], [1, 0]], [[1, 0], [1, 0], [1, 0]],
                      [[1, 0], [1, 0], [0, 1]], [[1, 0], [0, 1], [0, 1]]], dtype=torch.float64)
    torch.testing.assert_close(vote_disagreement(p), torch.tensor([0.0, 0.25, 0.5],
                                                                  dtype=torch.float64))


def test_auc_perfect_separation_and_mann_whitney_oracle():
    assert detection_auc(torch.tensor([0.0, 0.1, 0.2]), torch.tensor([0.3, 0.9])) == 1.0
    assert detection_auc(torch.tensor([0.3, 0.9]), torch.tensor([0.0, 0.1, 0.2])) == 0.0
    g = torch.Generator().manual_seed(1)
    clean, adv = torch.randn(200, generator=g), torch.randn(150, generator=g) + 0.7
    u = mannwhitneyu(adv.numpy(), clean.numpy()).statistic  # AUC = U / (n1 n0)
    assert detection_auc(clean, adv) == pytest.approx(u / (200 * 150), rel=1e-12)
    with pytest.raises(ConfigError, match="at least one"):
        detection_auc(torch.tensor([]), adv)
    with pytest.raises(ConfigError, match="unknown detection score"):
        detection_score(torch.ones(2, 1, 2), "entropy")


class Member(nn.Module):
    """A linear classifier on the first 2 pixels whose 'tilt' differs between members:
    members agree wherever pixel 1 is 0 and disagree more as pixel 1 grows."""

    def __init__(self, tilt: float) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, tilt], [-1.0, -tilt]]))

    def forward(self, x):
        return self.fc(self.flat(x)[:, :2] * 10)


def constructed_case():
    ens = SQEnsemble([Member(t) for t in (-3.0, -1.0, 1.0, 3.0)])
    g = torch.Generator().manual_seed(2)
    x = torch.zeros(100, 1, 1, 2)
    x[:, 0, 0, 0] = torch.rand(100, generator=g) * 0.5 + 0.1  # class 0 (pixel 0 > 0)
    return ens, x, torch.zeros(100, dtype=torch.long)


def shift(eps):
    return lambda x, y: x + torch.tensor([0.0, 1.0]).view(1, 1, 1, 2) * eps


def test_detection_auc_on_a_constructed_ensemble():
    ens, x, _ = constructed_case()
    clean = detection_score(member_probs(ens, x))
    adv = detection_score(member_probs(ens, shift(0.2)(x, None)))
    assert clean.max() < 1e-6  # members agree on clean inputs
    assert detection_auc(clean, adv) == 1.0
    dis = detection_score(member_probs(ens, shift(0.2)(x, None)), "disagreement")
    assert detection_auc(detection_score(member_probs(ens, x), "disagreement"), dis) > 0.5


def test_information_plane_rows(tmp_path):
    ens, x, y = constructed_case()
    rows = information_plane(ens, x, y, shift, [0.0, 0.05, 0.3])
    assert [r["eps"] for r in rows] == [0.0, 0.05, 0.3]
    assert rows[0]["accuracy"] == 1.0 and rows[0]["mean_score"] < 1e-6
    assert rows[2]["mean_score"] > rows[1]["mean_score"] > rows[0]["mean_score"]
    assert rows[2]["auc"] == 1.0
    out = plot_information_plane({"toy": rows}, tmp_path / "aip.png")
    assert out.stat().st_size > 1000
