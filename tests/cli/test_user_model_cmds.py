"""A user's own PyTorch classifier (a module written here, on sys.path) through the command
line: `qrobust quantize --model pkg.module:factory --weights FILE` saves a quantized checkpoint
that reloads bit-identically and that `attack`, `certify`, `verify` and a study take; bad input
is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from qrobust.checkpoint import load_checkpoint
from qrobust.cli import main
from qrobust.data import load_dataset, take
from qrobust.quant import quantize_user, save_quantized, user_model_meta

MODULE = "byom_user_nets_test"
USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        """No Normalize layer: trained on (x - 0.3) / 0.4."""

        def __init__(self, width=4, classes=10):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(width * 16, classes)

        def forward(self, x):
            return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))

    def carrying(width=4):
        net = Net(width)
        net.input_mean, net.input_std = (0.3,), (0.4,)  # the model states its normalization
        return net

    class Branchy(Net):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return super().forward(x)
            return super().forward(-x)
''')
SPEC = f"{MODULE}:Net"
NORM = ["--input-mean", "0.3", "--input-std", "0.4"]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """(directory with the module, weights file) of a Net fitted on digits (about 2 s)."""
    root = tmp_path_factory.mktemp("byom")
    (root / f"{MODULE}.py").write_text(USER_MODULE)
    sys.path.insert(0, str(root))
    try:
        from importlib import import_module

        net = import_module(MODULE).Net()
        x, y = load_dataset("digits").train.tensors()
        torch.manual_seed(0)
        opt = torch.optim.Adam(net.parameters(), 0.01)
        for _ in range(30):
            opt.zero_grad()
            F.cross_entropy(net((x - 0.3) / 0.4), y).backward()
            opt.step()
        save_file(net.eval().state_dict(), str(root / "net.safetensors"))
        yield root, root / "net.safetensors"
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def quantized(user):
    """A w8a8 checkpoint of the user's Net saved by `qrobust quantize --model`."""
    root, weights = user
    out = root / "w8a8"
    assert main(["-q", "quantize", "--model", SPEC, "--weights", str(weights), "--data",
                 "digits", *NORM, "--recipe", "w8a8", "--reduce-range", "off", "--calib", "128",
                 "--eval-limit", "120", "--out", str(out)]) == 0
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_saved_checkpoint_reloads_bit_identical(user, quantized, tmp_path):
    _, weights = user
    ds = load_dataset("digits")
    calib = take(ds.train, 128, 0).tensors()[0]  # what the command calibrated on (seed 0)
    twin = quantize_user(SPEC, "w8a8", calib, weights=weights, input_mean=0.3, input_std=0.4)
    x = ds.test.tensors()[0]
    reloaded, meta = load_checkpoint(quantized)
    with torch.no_grad():
        assert torch.equal(reloaded(x), twin(x))  # the command's twin is the library's
    assert meta["kind"] == "quantized" and meta["dataset"] == "digits"
    assert meta["model"]["factory"] == SPEC and meta["model"]["kwargs"] == {}
    assert meta["quant"]["input_normalization"]["mean"] == pytest.approx([0.3])
    assert meta["quant"]["metrics"]["twin_integer_agreement"] >= 0.99

    save_quantized(tmp_path / "lib", twin, {"model": user_model_meta(SPEC, twin, 10, {},
                                                                     weights),
                                            "dataset": "digits"})
    again, _ = load_checkpoint(tmp_path / "lib")
    with torch.no_grad():
        assert torch.equal(again(x), twin(x))


def test_attack_certify_verify_take_the_checkpoint(quantized, tmp_path, capsys):
    assert main(["-q", "attack", "--ckpt", str(quantized), "--attack", "pgd", "--eps", "0.1",
                 "--steps", "3", "--limit", "32", "--checks", "none", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["quantized"] and res["clean_acc"] > 0.7 and res["clean_acc_int"] is not None, res
    assert res["robust_acc"] <= res["clean_acc"]

    for extra in ([], ["--integer", "--backend", "reference"]):
        out = tmp_path / f"cert{len(extra)}"
        assert main(["-q", "certify", "--ckpt", str(quantized), "--n0", "10", "--n", "50",
                     "--limit", "3", "--batch-size", "50", "--out", str(out), *extra]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["n_images"] == 3 and summary["config"]["integer"] == bool(extra)

    assert main(["-q", "verify", "--ckpt", str(quantized), "--eps", "1", "--limit", "3",
                 "--timeout", "10", "--out", str(tmp_path / "v.json")]) == 0
    got = json.loads((tmp_path / "v.json").read_text())
    assert got["summary"]["1"]["n"] == 3


def test_qat_kwargs_and_a_model_that_states_its_normalization(user, tmp_path, capsys):
    out = tmp_path / "w4a8"
    assert main(["-q", "quantize", "--model", f"{MODULE}:carrying", "--model-kwargs",
                 '{"width": 2}', "--data", "digits", "--recipe", "w4a8", "--calib", "64",
                 "--qat-epochs", "1", "--eval-limit", "60", "--out", str(out)]) == 0
    twin, meta = load_checkpoint(out)
    assert meta["model"]["kwargs"] == {"width": 2} and meta["quant"]["qat_epochs"] == 1
    assert meta["quant"]["input_normalization"]["std"] == pytest.approx([0.4])
    assert twin(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_a_study_runs_the_quantized_user_checkpoint(quantized, tmp_path, capsys):
    from qrobust.eval.store import ResultStore

    study = {"name": "byom", "data": {"dataset": "digits", "n_test": 32},
             "models": [{"name": "mine", "checkpoint": str(quantized)}],
             "recipes": ["fp32", "w4a4"],  # an already quantized model keeps its own
             "attacks": [{"name": "fgsm", "eps": [0.05]}], "batch_size": 32}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert main(["-q", "run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    with ResultStore(tmp_path / "run" / "results.sqlite") as store:
        rows = store.rows("robustness")
    assert len(rows) == 1 and rows[0]["config"]["recipe"] == "w8a8"
    assert rows[0]["metrics"]["clean_acc_int"] is not None


def bad_cases(weights) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, a phrase the error must contain)."""
    w = ["--weights", str(weights)]
    return {
        "module": (["--model", "no_such_pkg_byom.nets:Net", "--data", "digits", *NORM],
                   "cannot import module 'no_such_pkg_byom.nets'"),
        "spec": (["--model", MODULE, "--data", "digits", *NORM], "must look like"),
        "weights": (["--model", SPEC, "--model-kwargs", '{"width": 2}', *w, "--data", "digits",
                     *NORM], "do not fit 'byom_user_nets_test:Net': shape mismatch for"),
        "normalization": (["--model", SPEC, *w, "--data", "digits"],
                          "states no input normalization; give --input-mean"),
        "one-of-two": (["--model", SPEC, *w, "--data", "digits", "--input-mean", "0.3"],
                       "give both --input-mean and --input-std"),
        "untraceable": (["--model", f"{MODULE}:Branchy", "--data", "digits", *NORM],
                        "cannot trace Branchy with torch.fx"),
        "classes": (["--model", SPEC, "--model-kwargs", '{"classes": 5}', "--data", "digits",
                     *NORM], "returns 5 logits; the dataset has 10 classes"),
        "kwargs": (["--model", SPEC, "--model-kwargs", "{width: 2}", "--data", "digits"],
                   "--model-kwargs is not JSON"),
        "no-data": (["--model", SPEC, *w, *NORM], "--model needs --data"),
        "no-model": ([], "give exactly one of --ckpt"),
        "stray": (["--ckpt", "x", *w], "go with --model"),
    }


@pytest.mark.parametrize("case", list(bad_cases("w")))
def test_bad_input_one_line_exit_2_nothing_written(user, tmp_path, capsys, case):
    args, phrase = bad_cases(user[1])[case]
    out = tmp_path / "out"
    assert main(["-q", "quantize", *args, "--recipe", "w8a8", "--calib", "32", "--out",
                 str(out)]) == 2
    err = one_line_error(capsys)
    assert phrase in err, err
    assert not out.exists()
