"""Smoke tests over every registered attack: shapes, budget, box, targeted mode, loud errors."""

from __future__ import annotations

import pytest
import torch

from qrobust.attacks import ATTACKS, Suite, ThreatModel
from qrobust.errors import ConfigError

FAST = {"square": {"steps": 200}, "apgd": {"steps": 10}, "apgd-dlr": {"steps": 10},
        "standard": {"budget_scale": 0.04}}


def _budget_ok(threat, x_adv, x):
    return (x_adv.min() >= 0 and x_adv.max() <= 1
            and bool((threat.distance(x_adv, x) <= threat.eps * (1 + 1e-5) + 1e-6).all()))


@pytest.mark.parametrize("name", ATTACKS.names())
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_every_attack_runs_and_respects_the_threat_model(name, norm, mlp, digits_data):
    _, _, x, y = digits_data
    x, y = x[:64], y[:64]
    threat = ThreatModel(norm, 0.1 if norm == "linf" else 1.0)
    if name == "square" and norm == "l2":
        with pytest.raises(ConfigError, match="linf"):
            ATTACKS.get(name)(mlp, threat)
        return
    attack = ATTACKS.get(name)(mlp, threat, **FAST.get(name, {}))
    res = attack.run(x, y, torch.Generator().manual_seed(0))
    assert res.x_adv.shape == x.shape and res.success.shape == y.shape
    assert _budget_ok(threat, res.x_adv, x)
    with torch.no_grad():
        pred = mlp(res.x_adv).argmax(1)
    # what the attack reports as success is what the model says
    assert torch.equal(res.success, pred != y)
    assert res.success.float().mean() > 0.2  # every attack breaks a good part at this budget
    assert attack.describe()["attack"] == name


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_targeted(name, mlp, digits_data):
    _, _, x, y = digits_data
    x, y = x[:64], y[:64]
    threat = ThreatModel("linf", 0.3)
    if issubclass(ATTACKS.get(name), Suite):  # suites choose their own targets
        with pytest.raises(ConfigError, match="fixes its losses and targets"):
            ATTACKS.get(name)(mlp, threat, targeted=True)
        return
    attack = ATTACKS.get(name)(mlp, threat, targeted=True, **FAST.get(name, {}))
    target = (y + 1) % 10
    res = attack.run(x, y, torch.Generator().manual_seed(0), target=target)
    assert _budget_ok(threat, res.x_adv, x)
    with torch.no_grad():
        pred = mlp(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred == target)
    if name != "fgsm":  # one step rarely hits a given class
        assert res.success.float().mean() > 0.3


def test_same_seed_same_result(mlp, digits_data):
    _, _, x, y = digits_data
    attack = ATTACKS.get("pgd")(mlp, ThreatModel("linf", 0.1), steps=5, restarts=2)
    a = attack(x[:32], y[:32], torch.Generator().manual_seed(5))
    b = attack(x[:32], y[:32], torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_restarts_only_help(mlp, digits_data):
    _, _, x, y = digits_data
    one = ATTACKS.get("pgd")(mlp, ThreatModel("linf", 0.06), steps=5).run(
        x, y, torch.Generator().manual_seed(1))
    three = ATTACKS.get("pgd")(mlp, ThreatModel("linf", 0.06), steps=5, restarts=3).run(
        x, y, torch.Generator().manual_seed(1))
    # the first restart is the same run, later ones only attack points still robust
    assert bool((three.success | ~one.success).all())
    assert three.success.sum() >= one.success.sum()


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "step"])
def test_pgd_schedules(schedule, mlp, digits_data):
    _, _, x, y = digits_data
    res = ATTACKS.get("pgd")(mlp, ThreatModel("linf", 0.1), steps=8, schedule=schedule).run(
        x[:64], y[:64], torch.Generator().manual_seed(0))
    assert res.success.float().mean() > 0.2


def test_unknown_names_and_bad_parameters_fail_loudly(mlp):
    with pytest.raises(ConfigError, match="unknown attack 'pgdd'; valid: apgd, apgd-dlr"):
        ATTACKS.get("pgdd")
    with pytest.raises(ConfigError, match="schedule"):
        ATTACKS.get("pgd")(mlp, ThreatModel("linf", 0.1), schedule="exp")
    with pytest.raises(ConfigError, match="steps"):
        ATTACKS.get("pgd")(mlp, ThreatModel("linf", 0.1), steps=0)
    with pytest.raises(ConfigError, match="ThreatModel"):
        ATTACKS.get("pgd")(mlp, 0.1)


def test_apgd_checkpoints_follow_the_paper():
    from qrobust.attacks.apgd import checkpoints

    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99, 1.05 (Croce & Hein 2020)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9]
