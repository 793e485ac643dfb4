"""Study configs: valid files parse; every bad field is named in a one-line error."""

from __future__ import annotations

import pytest

from qrobust.cli import main
from qrobust.config import dump_study, load_study, parse_study
from qrobust.errors import ConfigError

GOOD = """
name: t
data: {dataset: digits, n_test: 20}
models:
  - {name: cnn, arch: small-cnn, train: {epochs: 2}}
recipes: [fp32, w8a8, w4a4, gorsline3]
defenses: [none, {name: median, params: {size: 3}}]
attacks:
  - {name: fgsm, eps: [0, 8/255, 0.1]}
  - {name: pgd, norm: l2, eps: 0.5, params: {steps: 5}}
seeds: [0, 1]
"""


def write(tmp_path, text: str):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_good_config_parses_and_roundtrips(tmp_path):
    study = load_study(write(tmp_path, GOOD))
    assert study.attacks[0].eps == (0.0, 8 / 255, 0.1)
    assert study.attacks[1].eps == (0.5,) and study.attacks[1].norm == "l2"
    assert [d.label for d in study.defenses] == ["none", "median(size=3)"]
    assert study.seeds == (0, 1) and study.recipes[-1] == "gorsline3"
    assert parse_study(__import__("yaml").safe_load(dump_study(study))) == study


BAD = [
    ("attacks: [{name: pgdd, eps: [0.1]}]", "attacks[0].name", "unknown attack 'pgdd'"),
    ("attacks: [{name: fgsm, eps: [0.1, -0.1]}]", "attacks[0].eps[1]", "eps must be >= 0"),
    ("attacks: [{name: fgsm, eps: [1/0]}]", "attacks[0].eps", "not a number"),
    ("attacks: [{name: fgsm, eps: []}]", "attacks[0].eps", "at least 1"),
    ("attacks: [{name: fgsm, norm: l3, eps: [0.1]}]", "attacks[0].norm", "'linf' or 'l2'"),
    ("recipes: [fp32, w0a0]", "recipes", "recipes[1]"),
    ("recipes: [w4a4, w4a4]", "recipes", "repeat"),
    ("models: [{arch: resnet99}]", "models[0]", "unknown model 'resnet99'"),
    ("models: [{arch: mlp, checkpoint: x}]", "models[0]", "exactly one of"),
    ("models: [{arch: mlp, train: {epoks: 3}}]", "models[0]", "epoks"),
    ("defenses: [nonsense]", "defenses[0].name", "unknown defense 'nonsense'"),
    ("data: {dataset: digits, n_test: 0}", "data.n_test", "greater than or equal to 1"),
    ("data: {dataset: imagenet}", "data.dataset", "unknown dataset 'imagenet'"),
    ("atacks: []", "atacks", "unknown field"),
    # parameters are checked by building the attack / defense around a stand-in model
    ("attacks: [{name: pgd, eps: [0.1], params: {stepz: 3}}]", "attacks[0]",
     "attack 'pgd' has no parameter 'stepz'"),
    ("attacks: [{name: pgd, eps: [0.1], params: {steps: six}}]", "attacks[0]",
     "parameter 'steps' must be int, got 'six'"),
    ("attacks: [{name: standard, eps: [0.1], params: {budget_scal: 0.1}}]", "attacks[0]",
     "no parameter 'budget_scal'"),
    ("attacks: [{name: pgd, eps: [0.1], params: {eot_samples: 0}}]", "attacks[0]",
     "eot_samples must be an integer >= 1"),
    ("defenses: [{name: mc-dropout, params: {rate: 1.7}}]", "defenses[0]",
     "dropout rate must be in [0, 1), got 1.7"),
    ("defenses: [{name: median, params: {sise: 3}}]", "defenses[0]", "no parameter 'sise'"),
    ("defenses: [{name: sq, params: {bits: four}}]", "defenses[0]",
     "parameter 'bits' must be int, got 'four'"),
    ('models: [{arch: mlp, train: {epochs: "six"}}]', "models[0]",
     "parameter 'epochs' must be int, got 'six'"),
    ("models: [{arch: mlp, dropout: 1.7}]", "models[0].dropout", "less than 1"),
    ("models: [{arch: small-cnn, arch_params: {width: eight}}]", "models[0]",
     "do not build 'small-cnn'"),
    ("models: [{checkpoint: x, arch_params: {width: 8}}]", "models[0]",
     "arch_params go with 'arch'"),
    ("models: [{arch: small-cnn, finetune: {method: sq-ensemble}, recipes: [w4a4]}]", "models[0]",
     "give it recipes: [fp32]"),
    ("models: [{arch: small-cnn, finetune: {method: dq}, recipes: [fp32, w4a4]}]", "models[0]",
     "remove ['fp32'] from its recipes"),
    ("models: [{arch: small-cnn, finetune: {method: dq, epochs: 0}, recipes: [w4a4]}]",
     "models[0].finetune.epochs", "greater than or equal to 1"),
    ("models: [{arch: small-cnn, finetune: {method: lsq}, recipes: [w4a4]}]",
     "models[0].finetune.method", "'dq' or 'sq-ensemble'"),
]
BASE = {"models": "models: [{arch: small-cnn}]", "attacks": "attacks: [{name: fgsm, eps: [0.1]}]"}


@pytest.mark.parametrize(("line", "field", "message"), BAD)
def test_bad_field_named_in_one_line(tmp_path, line, field, message):
    parts = dict(BASE)
    parts[line.split(":")[0]] = line
    path = write(tmp_path, "\n".join(parts.values()) + "\n")
    with pytest.raises(ConfigError) as err:
        load_study(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(path))
    assert field in text and message in text, text


def test_missing_required_field(tmp_path):
    with pytest.raises(ConfigError, match=r"models: required field is missing"):
        load_study(write(tmp_path, "attacks: [{name: fgsm, eps: [0.1]}]\n"))
    with pytest.raises(ConfigError, match=r"a study needs attacks, certify or verify cells"):
        load_study(write(tmp_path, "models: [{arch: mlp}]\n"))
    with pytest.raises(ConfigError, match=r"certify\[0\].*noise 'laplace'"):
        load_study(write(tmp_path, "models: [{arch: mlp}]\ncertify: [{noise: laplace}]\n"))


def test_missing_checkpoint_file(tmp_path):
    path = write(tmp_path, "models: [{checkpoint: nowhere/ckpt}]\n" + BASE["attacks"] + "\n")
    with pytest.raises(ConfigError, match=r"models\[0\]\.checkpoint: 'nowhere/ckpt' not found"):
        load_study(path)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "models: [{arch: mlp}]\nattacks: [{name: fgsm, eps: [0.1]\n")
    with pytest.raises(ConfigError, match=r"study.yaml: line \d+"):
        load_study(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_study("no/such/study.yaml")


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, BASE["models"] + "\nattacks: [{name: fgsm, eps: [-1]}]\n")
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "attacks[0].eps" in err
    assert not (tmp_path / "run").exists()  # nothing written for a bad config


def test_demo_and_gorsline_configs_validate():
    from pathlib import Path

    from qrobust.cli.study_cmds import demo_config
    from qrobust.eval.grid import plan

    demo = parse_study(demo_config(), "demo")
    assert demo.recipes == ("fp32", "w8a8", "w4a4", "w2a2") and len(plan(demo)) == 56
    gorsline = Path(__file__).parents[1] / "benchmarks" / "gorsline_mnist.yaml"
    study = load_study(gorsline)
    assert study.recipes[1:] == tuple(f"gorsline{b}" for b in range(1, 11))
