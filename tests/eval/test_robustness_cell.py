"""The robustness unit of work: `qrobust attack` and a one-cell study are the same computation
(same metrics, same warnings), for a float model and for a quantized one with its integer
model; eps 0 is the identity attack."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from qrobust.cli import main
from qrobust.eval.store import ResultStore

pytestmark = pytest.mark.slow

ATTACK = {"name": "pgd", "norm": "linf", "eps": ["16/255"], "params": {"steps": 4}}


def one_cell_study(tmp_path, ckpt, recipe: str, defenses, capsys) -> dict:
    study = {"name": "one", "data": {"dataset": "digits", "n_test": 40},
             "models": [{"name": "cnn", "checkpoint": str(ckpt)}], "recipes": [recipe],
             "defenses": defenses, "attacks": [ATTACK], "batch_size": 16,
             "quant": {"calib": 64}}
    config = tmp_path / f"study-{recipe}.yaml"
    config.write_text(yaml.safe_dump(study))
    assert main(["-q", "run", str(config), "--out", str(tmp_path / f"study-{recipe}")]) == 0
    capsys.readouterr()
    with ResultStore(tmp_path / f"study-{recipe}" / "results.sqlite") as store:
        (row,) = store.rows("robustness")
    return row


def command(ckpt, seed: int, defense: list[str], capsys) -> dict:
    args = ["-q", "attack", "--ckpt", str(ckpt), "--attack", "pgd", "--eps", str(16 / 255),
            "--steps", "4", "--limit", "40", "--batch-size", "16", "--seed", str(seed),
            "--json", *[a for d in defense for a in ("--defense", d)]]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


SHARED = ("n", "clean_acc", "robust_acc", "robust_acc_worst", "attack_success_rate",
          "mean_linf", "mean_l2", "estimator", "grad_evals", "zero_grad_fraction",
          "robust_acc_temperature", "blackbox_broken", "clean_acc_int", "robust_acc_int",
          "transfer_rate", "clean_disagreement", "adv_disagreement", "robust_acc_int_square",
          "rng_seed")


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "w4a4+integer"])
def test_qrobust_attack_equals_a_one_cell_study(digits_ckpt, tmp_path, capsys, quantized):
    recipe = "w4a4" if quantized else "fp32"
    row = one_cell_study(tmp_path, digits_ckpt, recipe, [{"name": "median",
                                                          "params": {"size": 3}}], capsys)
    ckpt = digits_ckpt
    if quantized:  # the study's twin: the float checkpoint quantized on the same calibration
        ckpt = tmp_path / "q"
        assert main(["-q", "quantize", "--ckpt", str(digits_ckpt), "--recipe", "w4a4",
                     "--calib", "64", "--out", str(ckpt)]) == 0
        capsys.readouterr()
    out = command(ckpt, row["metrics"]["rng_seed"], ["median:size=3"], capsys)
    stored = row["metrics"]
    assert {k: out[k] for k in SHARED} == {k: stored[k] for k in SHARED}
    assert out["warnings"] == row["warnings"]
    assert (stored["clean_acc_int"] is not None) == quantized
    assert (stored["robust_acc_int_square"] is not None) == quantized  # the black-box check
    assert stored["robust_acc_temperature"] is not None and stored["grad_evals"] > 0
    assert stored["robust_acc_worst"] <= stored["robust_acc"] <= stored["clean_acc"]


def test_eps_zero_is_the_identity_attack(digits_cnn):
    from qrobust.data import load_dataset, take
    from qrobust.eval.robustness import RobustnessSpec, robustness_cell

    x, y = take(load_dataset("digits").test, 30).tensors()
    cell = robustness_cell(digits_cnn.model, x, y, RobustnessSpec("pgd", eps=0.0), seed=0)
    m = cell.metrics
    assert m["robust_acc"] == m["robust_acc_worst"] == m["clean_acc"] and m["grad_evals"] == 0
    assert torch.equal(cell.x_adv, x) and m["mean_linf"] is None
