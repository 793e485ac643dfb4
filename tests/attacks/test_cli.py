"""`qrobust attack` end to end on tiny checkpoints written by the test."""

from __future__ import annotations

import json

import pytest

from qrobust.checkpoint import save_checkpoint
from qrobust.cli import main


@pytest.fixture(scope="module")
def ckpt(digits_cnn, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "digits-cnn"
    save_checkpoint(out, digits_cnn.model, digits_cnn.meta)
    return str(out)


def test_attack_json(ckpt, capsys):
    rc = main(["attack", "--ckpt", ckpt, "--attack", "pgd", "--eps", "0.1", "--steps", "5",
               "--limit", "40", "--checks", "gradients,randomness", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 40 and out["attack"] == "pgd" and out["estimator"] == "autograd"
    assert 0 <= out["robust_acc"] <= out["clean_acc"] <= 1 and out["quantized"] is False
    assert isinstance(out["warnings"], list)


def test_attack_with_defense_text(ckpt, capsys):
    rc = main(["attack", "--ckpt", ckpt, "--attack", "fgsm", "--eps", "0.1", "--limit", "30",
               "--defense", "bit-depth:bits=4", "--defense", "mc-dropout:rate=0.1,passes=2",
               "--eot", "3", "--checks", "none"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "estimator eot3+bpda" in text and "clean" in text and "robust" in text


def test_quantized_checkpoint_reports_integer_transfer(ckpt, digits_cnn, digits_data, tmp_path,
                                                       capsys):
    quant = pytest.importorskip("qrobust.quant")
    xtr = digits_data[0]
    twin = quant.quantize(digits_cnn.model.eval(), "w8a8", xtr[:128]).eval()
    qckpt = tmp_path / "q"
    quant.save_quantized(qckpt, twin, digits_cnn.meta)
    rc = main(["attack", "--ckpt", str(qckpt), "--eps", "0.1", "--budget-scale", "0.03",
               "--limit", "20", "--checks", "none", "--queries", "10", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quantized"] is True
    assert 0 <= out["clean_disagreement"] <= 0.05
    assert 0 <= out["robust_acc_int"] <= out["clean_acc_int"] <= 1
    assert out["robust_acc_int_square"] is None  # the square on the integer model is a check


def test_the_default_is_the_standard_suite_and_fast_is_labelled(ckpt, capsys):
    rc = main(["attack", "--ckpt", ckpt, "--eps", "0.15", "--budget-scale", "0.05",
               "--limit", "40", "--checks", "gradients", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attack"] == out["suite"] == "standard" and out["budget_scale"] == 0.05
    assert out["budget"] == {"steps": 5, "targets": 9, "queries": 250, "restarts": 1}
    assert set(out["stage_broken"]) <= {"apgd-ce", "square", *(f"apgd-t{r}" for r in range(1, 10))}
    broken = sum(out["stage_broken"].values())
    assert broken == round((out["clean_acc"] - out["robust_acc"]) * out["n"])
    assert main(["attack", "--ckpt", ckpt, "--eps", "0.15", "--attack", "fast", "--limit", "40",
                 "--checks", "none"]) == 0
    assert "fast suite (PGD-10: an upper bound" in capsys.readouterr().out
    assert main(["attack", "--ckpt", ckpt, "--eps", "0.15", "--attack", "pgd", "--limit", "5",
                 "--budget-scale", "0.5"]) == 2
    assert "attack 'pgd' has no parameter 'budget_scale'" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--attack", "pgdd"], "unknown attack 'pgdd'"),
    (["--norm", "l7"], "unknown norm"),
    (["--defense", "median:size"], "key=value"),
    (["--defense", "median:size=4"], "odd"),
    (["--estimator", "magic"], "unknown estimator"),
])
def test_user_errors_are_one_line(ckpt, capsys, args, message):
    rc = main(["attack", "--ckpt", ckpt, "--eps", "0.1", "--limit", "5", *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
