"""The standard and fast suites: worst case over stages, survivors only, adaptive stages, and
the oracle against an independent PGD-50 x 3 (torchattacks) on the committed MNIST and CIFAR-10
models, float and quantized (data tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from qrobust.attacks import ATTACKS, STANDARD, Budget, ThreatModel, evaluate_robustness
from qrobust.errors import ConfigError

MODELS = Path(__file__).parents[2] / "benchmarks" / "models"


def run(model, name, x, y, eps=0.15, norm="linf", **kw):
    attack = ATTACKS.get(name)(model, ThreatModel(norm, eps), **kw)
    # one batch: the suite's first stage then draws exactly what the lone APGD draws
    return evaluate_robustness(model, attack, x, y, generator=torch.Generator().manual_seed(0),
                               checks=("gradients",), batch_size=1024)


def test_standard_is_at_least_as_strong_as_its_first_stage_and_as_fast(mlp, digits_data):
    _, _, x, y = digits_data
    suite = run(mlp, "standard", x, y, budget_scale=0.1)
    apgd = run(mlp, "apgd", x, y, steps=10)  # the suite's first stage, same seed
    fast = run(mlp, "fast", x, y)
    assert suite["robust_acc"] <= apgd["robust_acc"] and suite["robust_acc"] <= fast["robust_acc"]
    assert suite["stage_broken"]["apgd-ce"] == round((apgd["clean_acc"] - apgd["robust_acc"])
                                                     * apgd["n"])
    assert 0 < suite["robust_acc"] < suite["clean_acc"]  # eps leaves something to find
    assert "apgd-ce+temperature" not in suite["stage_broken"]  # float model, live gradients


def test_quantized_twins_get_the_temperature_stage_and_l2_has_no_square(digits_cnn, digits_data):
    from qrobust.quant import quantize

    xtr, _, x, y = digits_data
    twin = quantize(digits_cnn.model.eval(), "w4a4", xtr[:128])
    res = run(twin, "standard", x[:60], y[:60], eps=0.1, budget_scale=0.05)
    assert "apgd-ce+temperature" in res["stage_broken"] or res["robust_acc"] == 0
    l2 = run(digits_cnn.model.eval(), "standard", x[:60], y[:60], eps=1.0, norm="l2",
             budget_scale=0.05)
    assert "square" not in l2["stage_broken"]


class TwoClasses(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[:, :2]


def test_few_classes_skip_the_targeted_stage(mlp, digits_data):
    _, _, x, y = digits_data
    keep = y < 2
    res = run(TwoClasses(mlp), "standard", x[keep][:40], y[keep][:40], budget_scale=0.05)
    assert not any(k.startswith("apgd-t") for k in res["stage_broken"])


def test_randomized_models_are_attacked_through_eot(digits_cnn, digits_data):
    from qrobust.defenses import DEFENSES

    _, _, x, y = digits_data
    noisy = DEFENSES.get("mc-dropout")(digits_cnn.model.eval(), rate=0.1, passes=2)
    res = run(noisy, "standard", x[:30], y[:30], budget_scale=0.02)
    assert res["estimator"].startswith("eot")


def test_budgets_are_the_published_ones_unless_scaled_explicitly():
    assert Budget(steps=100, targets=9, queries=5000, restarts=1) == STANDARD
    assert STANDARD.scaled(0.1) == Budget(steps=10, targets=9, queries=500, restarts=1)
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="budget_scale"):
            STANDARD.scaled(bad)
    with pytest.raises(ConfigError, match="fixes its losses"):
        ATTACKS.get("standard")(nn.Linear(2, 2), ThreatModel("linf", 0.1), loss="dlr")


# --- the oracle: standard vs an independent PGD-50 x 3 on the committed models --------------
def _committed(name: str, dataset: str):
    from qrobust.checkpoint import load_checkpoint
    from qrobust.data import load_dataset
    from qrobust.errors import DataError

    if not (MODELS / name / "model.safetensors").is_file():
        pytest.skip(f"{MODELS / name} is absent (benchmarks/models/retrain.sh)")
    try:
        ds = load_dataset(dataset)
    except DataError as err:
        pytest.skip(f"{dataset} is not in ../shared/data: {err}")
    return load_checkpoint(MODELS / name)[0], ds


def pgd_50x3(model, x, y, eps) -> torch.Tensor:
    """Per point: robust under all 3 restarts of torchattacks. PGD (50 steps, alpha 2.5 eps / 50)."""
    torchattacks = pytest.importorskip("torchattacks")
    robust = torch.ones(len(y), dtype=torch.bool)
    with torch.random.fork_rng():  # torchattacks draws its random start from the global RNG
        for seed in range(3):
            torch.manual_seed(seed)
            adv = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / 50, steps=50,
                                   random_start=True)(x, y)
            with torch.no_grad():
                robust &= model(adv).argmax(1) == y
    return robust


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("ckpt,dataset,n,eps_list,recipe", [
    # where the issue found PGD-10 4.4 points too high (MNIST, eps 0.2), and CIFAR-10's usual
    # radii, float and quantized; sized for CI (~4 min on 2 cores). The full grid, 500 points
    # per cell: benchmarks/attack_strength.py
    ("small-cnn-mnist", "mnist", 100, (0.2,), "fp32"),
    ("small-cnn-mnist", "mnist", 100, (0.2,), "w4a4"),
    ("resnet20-cifar10", "cifar10", 32, (2 / 255, 8 / 255), "fp32"),
    ("resnet20-cifar10", "cifar10", 32, (2 / 255, 8 / 255), "w8a8"),
])
def test_standard_is_never_weaker_than_pgd_50x3(ckpt, dataset, n, eps_list, recipe):
    from qrobust.data import take
    from qrobust.quant import quantize

    pytest.importorskip("torchattacks")  # before the costly half, not after it
    model, ds = _committed(ckpt, dataset)
    if recipe != "fp32":
        model = quantize(model, recipe, take(ds.train, 512, seed=1).tensors()[0])
    x, y = take(ds.test, n, seed=3).tensors()
    for eps in eps_list:
        ours = run(model, "standard", x, y, eps=eps)["robust_acc"]
        theirs = float(pgd_50x3(model, x, y, eps).float().mean())
        assert ours <= theirs + 0.005, (recipe, eps, ours, theirs)
