import gzip
import importlib.util
import sys
from pathlib import Path

import pytest

import qrobust
from qrobust.cli import main
from qrobust.hardware import cpu_info


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["-q", "train", "--model", "mlp", "--data", "digits", "--epochs", "2",
                 "--out", str(out)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["-q", "eval", "--ckpt", str(out), "--json"]) == 0
    assert '"accuracy"' in capsys.readouterr().out


def test_datasets_lists_every_dataset(capsys):
    assert main(["datasets"]) == 0
    text = capsys.readouterr().out
    for name in ("digits", "mnist", "fashion-mnist", "cifar10", "svhn"):
        assert name in text


def test_version_and_doctor(capsys, monkeypatch):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"qrobust {qrobust.__version__}"
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert cpu_info().describe() in text and "onnxruntime" in text and "digits" in text
    for name in ("reference", "onnx", "openvino", "ray"):
        assert f"  {name} " in text
    # an optional part that is not installed is named with how to get it
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    assert main(["doctor"]) == 0
    assert "openvino      missing  -> pip install 'qrobust[openvino]'" in capsys.readouterr().out


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bars_on_a_terminal_and_off_with_q(tmp_path, capsys, monkeypatch, quiet):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as if run in a terminal
    args = ["-q"] * quiet + ["train", "--model", "mlp", "--data", "digits", "--epochs", "1",
                             "--out", str(tmp_path / "m")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert ("train epoch 1/1" in err) == (not quiet)
    assert ("test accuracy" in err) == (not quiet)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, capsys, monkeypatch):
    from qrobust.data import sources

    monkeypatch.setattr(sources, "search_roots", lambda d: [Path(d)] if d else [])
    out = tmp_path / "out"
    # missing dataset
    assert main(["train", "--model", "mlp", "--data", "svhn", "--data-dir", str(tmp_path),
                 "--out", str(out)]) == 2
    assert "not found" in one_line_error(capsys)
    # truncated idx file
    (tmp_path / "mnist").mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / "mnist" / name).write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 9))
    assert main(["train", "--model", "mlp", "--data", "mnist", "--data-dir", str(tmp_path),
                 "--out", str(out), "--no-verify"]) == 2
    assert "truncated" in one_line_error(capsys)
    # the same files fail their checksum when verified
    assert main(["train", "--model", "mlp", "--data", "mnist", "--data-dir", str(tmp_path),
                 "--out", str(out)]) == 2
    assert "expected" in one_line_error(capsys)
    # unknown model
    assert main(["train", "--model", "vgg", "--data", "digits", "--out", str(out)]) == 2
    assert "unknown model 'vgg'" in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("payload", [b"not a checkpoint", b"\x80\x04\x95garbage"])
def test_eval_rejects_non_checkpoints(tmp_path, capsys, payload):
    (tmp_path / "model.safetensors").write_bytes(payload)
    assert main(["eval", "--ckpt", str(tmp_path)]) == 2
    assert "not a safetensors checkpoint" in one_line_error(capsys)


def test_fine_tune_from_a_checkpoint(tmp_path):
    import json

    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["-q", "train", "--model", "mlp", "--data", "digits", "--epochs", "3", "--out", str(first)]) == 0
    assert main(["-q", "train", "--model", "mlp", "--data", "digits", "--epochs", "1", "--lr", "1e-4",
                 "--init", str(first), "--out", str(second)]) == 0
    a, b = (json.loads((p / "meta.json").read_text()) for p in (first, second))
    assert b["init_from"] == str(first)
    # a tiny learning rate keeps the fine-tuned model close to where it started
    assert abs(a["metrics"]["test_acc"] - b["metrics"]["test_acc"]) < 0.05
    assert main(["-q", "train", "--model", "small-cnn", "--data", "digits", "--epochs", "1",
                 "--init", str(first), "--out", str(tmp_path / "c")]) == 2


def test_certified_training_writes_a_quantized_checkpoint(tmp_path, capsys):
    """QA-IBP from the command line: a quantized checkpoint that loads as a twin and lowers to
    an integer program; bad options are one-line errors (exit 2) that write nothing."""
    from qrobust.checkpoint import load_checkpoint, read_meta
    from qrobust.integer import to_integer

    out = tmp_path / "cert"
    assert main(["-q", "train", "--model", "mlp", "--data", "digits", "--epochs", "2",
                 "--certified-eps", "0.03", "--certified-box", "0.3", "--out", str(out)]) == 0
    meta = read_meta(out)
    assert meta["kind"] == "quantized" and meta["quant"]["certified"]["eps"] == 0.03
    assert meta["quant"]["certified"]["method"] == "qa-sabr" and meta["quant"]["certified"]["box"] == 0.3
    twin, _ = load_checkpoint(out)
    assert to_integer(twin.eval(), "reference").program((1, 8, 8)).ops
    for bad in (["--certified-eps", "1.5"], ["--certified-eps", "0"], ["--recipe", "w8a8"],
                ["--certified-box", "0.3"], ["--certified-eps", "0.1", "--certified-box", "0"],
                ["--certified-eps", "0.1", "--recipe", "w99"]):
        target = tmp_path / "bad"
        assert main(["-q", "train", "--model", "mlp", "--data", "digits", "--epochs", "1",
                     *bad, "--out", str(target)]) == 2
        assert not target.exists()
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
