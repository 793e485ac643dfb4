"""MC dropout: insertion into trained models, randomness in eval mode, averaging, EOT split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qrobust.defenses import (
    DEFENSES,
    MCDropout,
    MCDropoutModel,
    insert_dropout,
    is_randomized,
    split_at_randomness,
)
from qrobust.errors import ConfigError


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def test_dropout_rate_and_scaling_are_right():
    # seeded statistics: 200k Bernoulli(0.3) draws, tolerance 6 standard deviations
    p, n = 0.3, 200_000
    out = MCDropout(p, torch.Generator().manual_seed(0)).eval()(torch.ones(n))
    zeros = (out == 0).float().mean().item()
    assert abs(zeros - p) < 6 * (p * (1 - p) / n) ** 0.5
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p)))
    assert abs(out.mean().item() - 1.0) < 6 * ((p / (1 - p)) / n) ** 0.5  # unbiased


def test_stays_random_in_eval_mode_and_is_seeded():
    x = torch.ones(2, 50)
    d = MCDropout(0.5).eval()
    assert not torch.equal(d(x), d(x))
    a = MCDropout(0.5, torch.Generator().manual_seed(3))(x)
    b = MCDropout(0.5, torch.Generator().manual_seed(3))(x)
    assert torch.equal(a, b)
    assert torch.equal(MCDropout(0.0)(x), x)
    with pytest.raises(ConfigError):
        MCDropout(1.0)


@pytest.mark.parametrize(("placement", "count"), [("classifier", 1), ("linear", 2), ("relu", 2),
                                                  (["0", "3"], 2)])
def test_placements(placement, count):
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noisy = insert_dropout(model, 0.2, placement)
    assert sum(isinstance(m, MCDropout) for m in noisy.modules()) == count
    assert not any(isinstance(m, MCDropout) for m in model.modules())  # original untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert is_randomized(noisy) and not is_randomized(model)
    x = torch.rand(3, 1, 8, 8)
    # rate 0 keeps the function
    torch.testing.assert_close(insert_dropout(model, 0.0, placement)(x), model(x))


def test_bad_placements_fail_loudly():
    with pytest.raises(ConfigError, match="valid: classifier, linear, relu"):
        insert_dropout(_cnn(), 0.1, "conv")
    with pytest.raises(ConfigError, match="not found"):
        insert_dropout(_cnn(), 0.1, ["nope"])


def test_mc_model_averages_probabilities_over_passes():
    x = torch.rand(4, 1, 8, 8)
    noisy = insert_dropout(_cnn(), 0.3, "relu", torch.Generator().manual_seed(1))
    out = MCDropoutModel(noisy, passes=5)(x)
    # same masks, drawn pass by pass: the T passes as one batch of 5 x 4 images
    again = insert_dropout(_cnn(), 0.3, "relu", torch.Generator().manual_seed(1))
    probs = torch.softmax(again(x.repeat(5, 1, 1, 1)), -1).view(5, 4, 10).mean(0)
    torch.testing.assert_close(out, probs.log())
    torch.testing.assert_close(out.exp().sum(1), torch.ones(4))


def test_registry_and_split():
    model = _cnn()
    defended = DEFENSES.get("mc-dropout")(model, rate=0.2, passes=3, seed=0)
    assert defended.randomized and defended(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    prefix, rest = split_at_randomness(insert_dropout(model, 0.2, "classifier"))
    assert not is_randomized(prefix) and is_randomized(rest)
    x = torch.rand(2, 1, 8, 8)
    noisy = insert_dropout(model, 0.2, "classifier", torch.Generator().manual_seed(0))
    prefix, rest = split_at_randomness(noisy)
    ref = insert_dropout(model, 0.2, "classifier", torch.Generator().manual_seed(0))(x)
    torch.testing.assert_close(rest(prefix(x)), ref)
    assert split_at_randomness(model) is None  # nothing random
