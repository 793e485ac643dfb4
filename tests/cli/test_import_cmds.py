"""`qrobust import` end to end on digits (a small-cnn quantized by ONNX Runtime, not by qrobust),
the imported checkpoint under `qrobust attack`, and bad input: one line, exit 2, nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qrobust.checkpoint import load_checkpoint
from qrobust.cli import main
from qrobust.data import load_dataset, take
from qrobust.errors import CheckpointError
from qrobust.integer.imports import ProgramTwin, integer_model, runtime

ort_q = pytest.importorskip("onnxruntime.quantization")


def export(model: nn.Module, path: Path, shape, dynamic_hw: bool = False) -> Path:
    axes = {"x": {0: "n", 2: "h", 3: "w"} if dynamic_hw else {0: "n"}, "y": {0: "n"}}
    torch.onnx.export(model.eval(), torch.rand(1, *shape), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def quantize(float_path: Path, path: Path, calib: np.ndarray) -> Path:
    class Reader(ort_q.CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": calib[i:i + 64]} for i in range(0, len(calib), 64)])

        def get_next(self):
            return next(self.it, None)

    ort_q.quantize_static(str(float_path), str(path), Reader(),
                          quant_format=ort_q.QuantFormat.QDQ, per_channel=True,
                          weight_type=ort_q.QuantType.QInt8, reduce_range=True)
    return path


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory, digits, digits_cnn):
    """digits_cnn (its Normalize layer exported as float ops on the input) quantized by ORT."""
    tmp = tmp_path_factory.mktemp("import")
    calib = take(digits.train, 256, seed=1).tensors()[0].numpy()
    float_path = export(digits_cnn.model, tmp / "cnn.float.onnx", (1, 8, 8))
    return quantize(float_path, tmp / "cnn.onnx", calib)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_import_then_attack_replays_on_the_file(tmp_path, capsys, digits_file):
    out = tmp_path / "imported"
    assert main(["-q", "import", str(digits_file), "--data", "digits", "--out", str(out),
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["same_prediction"] >= 0.999 and got["max_code_diff"] == 0, got
    assert got["clean_acc_runtime"] > 0.85 and got["clean_acc_integer"] > 0.85, got

    twin, meta = load_checkpoint(out)
    assert isinstance(twin, ProgramTwin) and meta["kind"] == "imported"
    x, _ = take(load_dataset("digits").test, 200).tensors()
    with torch.no_grad():
        same = (twin(x).argmax(1) == integer_model(twin)(x).argmax(1)).float().mean()
    assert float(same) == 1.0
    assert (runtime(twin)(x).argmax(1) == integer_model(twin)(x).argmax(1).numpy()).mean() >= 0.99

    assert main(["-q", "attack", "--ckpt", str(out), "--attack", "pgd", "--eps", "0.1",
                 "--steps", "5", "--limit", "64", "--checks", "none", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["quantized"] and res["clean_acc_int"] is not None
    assert 0 <= res["n_fool_runtime"] <= res["n_fool_twin"] and res["n_fool_twin"] > 0, res
    assert res["robust_acc_runtime"] <= res["clean_acc_runtime"]

    assert main(["attack", "--ckpt", str(out), "--attack", "fgsm", "--eps", "0.05",
                 "--limit", "32", "--checks", "none"]) == 0
    assert "still fool it" in capsys.readouterr().out


def test_runtime_refuses_a_changed_file(tmp_path, digits_file):
    src = tmp_path / "copy.onnx"
    src.write_bytes(digits_file.read_bytes())
    out = tmp_path / "ckpt"
    assert main(["-q", "import", str(src), "--data", "digits", "--out", str(out),
                 "--limit", "50"]) == 0
    twin, _ = load_checkpoint(out)
    src.write_bytes(src.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="changed since it was imported"):
        runtime(twin)
    src.unlink()
    with pytest.raises(CheckpointError, match="gone"):
        runtime(twin)


class Padded(nn.Module):
    def __init__(self, size: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * (size + 2) ** 2, 10)

    def forward(self, x):
        y = nn.functional.pad(torch.relu(self.conv(x)), (1, 1, 1, 1))
        return self.fc(y.flatten(1))


class Plain(nn.Module):
    def __init__(self, channels: int = 1, size: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * size * size, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its error must contain)."""
    g = np.random.default_rng(0)
    torch.manual_seed(0)
    files = {}
    calib = g.random((64, 1, 8, 8)).astype(np.float32)
    files["unsupported"] = (quantize(export(Padded(), tmp / "pad.f.onnx", (1, 8, 8)),
                                     tmp / "pad.onnx", calib), "unsupported op Pad (node '")
    float_file = export(Plain(), tmp / "plain.float.onnx", (1, 8, 8))
    files["float"] = (float_file, "float ONNX model")
    trunc = tmp / "trunc.onnx"
    trunc.write_bytes(float_file.read_bytes()[:300])
    files["truncated"] = (trunc, "not a readable ONNX file")
    good = quantize(float_file, tmp / "plain.onnx", calib)
    ext_dir = tmp / "ext"
    ext_dir.mkdir()
    model = onnx.load(str(good))
    onnx.save_model(model, str(ext_dir / "ext.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    (ext_dir / "ext.data").unlink()
    files["external"] = (ext_dir / "ext.onnx", "external data")
    rgb = g.random((64, 3, 8, 8)).astype(np.float32)
    files["size"] = (quantize(export(Plain(3), tmp / "rgb.f.onnx", (3, 8, 8)), tmp / "rgb.onnx",
                              rgb), "the dataset's images are (1, 8, 8)")
    big = g.random((64, 1, 16, 16)).astype(np.float32)
    files["dynamic"] = (quantize(export(Plain(1, 16), tmp / "dyn.f.onnx", (1, 16, 16),
                                        dynamic_hw=True), tmp / "dyn.onnx", big),
                        "another input size than the dataset's")
    return files


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", ["unsupported", "float", "truncated", "external", "size",
                                  "dynamic"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, bad, case):
    path, phrase = bad[case]
    out = tmp_path / "out"
    assert main(["import", str(path), "--data", "digits", "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert phrase in err, err
    assert not out.exists()


def test_unsupported_op_names_the_supported_list(capsys, tmp_path, bad):
    main(["import", str(bad["unsupported"][0]), "--data", "digits", "--out", str(tmp_path / "o")])
    err = one_line_error(capsys)
    assert "supported: " in err and "QLinearConv" in err


def test_bad_options_exit_2(tmp_path, capsys, digits_file):
    out = tmp_path / "o"
    assert main(["import", str(digits_file), "--data", "digits", "--out", str(out),
                 "--mean", "0.1,0.2"]) == 2
    assert "--mean has 2 values" in one_line_error(capsys)
    assert main(["import", str(digits_file), "--data", "digits", "--out", str(out),
                 "--layout", "NWHC"]) == 2
    assert "layout" in one_line_error(capsys)
    assert main(["import", str(tmp_path / "model.tflite2"), "--data", "digits", "--out",
                 str(out)]) == 2
    assert "unknown suffix" in one_line_error(capsys)
    assert not out.exists()


def test_tflite_import_then_attack_replays_on_litert(tmp_path, capsys):
    """A TFLite file made by TensorFlow's converter (committed fixture) through the same flow:
    bit-exact import, the twin's adversarial examples replayed on LiteRT."""
    pytest.importorskip("ai_edge_litert")
    fixture = Path(__file__).resolve().parents[1] / "integer" / "fixtures" / "cnn_digits_int8.tflite"
    out = tmp_path / "imported-tflite"
    assert main(["-q", "import", str(fixture), "--data", "digits", "--out", str(out),
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    # the file ends with a softmax that the program leaves out: predictions compare, codes not
    assert got["same_prediction"] == 1.0 and got["max_code_diff"] is None, got
    assert main(["-q", "attack", "--ckpt", str(out), "--attack", "pgd", "--eps", "0.1",
                 "--steps", "5", "--limit", "64", "--checks", "none", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_fool_twin"] > 0 and 0 <= res["n_fool_runtime"] <= res["n_fool_twin"], res
    # the program is bit-exact with LiteRT: what fools the integer program fools the file
    assert res["robust_acc_runtime"] == pytest.approx(res["robust_acc_int"]), res
    assert main(["-q", "import", str(fixture), "--data", "digits", "--mean", "0.5",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "mean" in one_line_error(capsys) and not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def imported_ckpt(tmp_path_factory, digits_file):
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    assert main(["-q", "import", str(digits_file), "--data", "digits", "--out", str(out),
                 "--limit", "50"]) == 0
    return out


def test_certify_an_imported_checkpoint(imported_ckpt, tmp_path, capsys):
    """Float smoothing of the twin; integer smoothing of the program (clipped codes)."""
    common = ["-q", "certify", "--ckpt", str(imported_ckpt), "--n0", "10", "--n", "50",
              "--limit", "3", "--batch-size", "50"]
    assert main([*common, "--out", str(tmp_path / "float")]) == 0
    assert json.loads((tmp_path / "float" / "summary.json").read_text())["n_images"] == 3
    assert main([*common, "--integer", "--integer-input", "clipped", "--out",
                 str(tmp_path / "int")]) == 0
    summary = json.loads((tmp_path / "int" / "summary.json").read_text())
    assert summary["config"]["backend"] == "reference" and summary["holds_for"]["clip"]
    assert summary["certified_accuracy"]["0"] > 0
    # the file's input quantizer cannot be widened to the noise window
    assert main([*common, "--integer", "--out", str(tmp_path / "wide")]) == 2
    assert "use --integer-input clipped" in one_line_error(capsys)
    assert not (tmp_path / "wide" / "summary.json").exists()


@pytest.fixture(scope="module")
def imported_mlp(tmp_path_factory, digits):
    """A digits MLP (trained 5 epochs, about 2 s) quantized by ORT and imported: an MLP program
    with an input table and float32 requantization, which gets the verifier's linear bounds."""
    from qrobust.train import TrainConfig, fit

    tmp = tmp_path_factory.mktemp("import-mlp")
    fitted = fit("mlp", digits, TrainConfig(epochs=5, batch_size=64, lr=0.05, seed=0),
                 progress=False)
    calib = take(digits.train, 256, seed=1).tensors()[0].numpy()
    path = quantize(export(fitted.model, tmp / "mlp.float.onnx", (1, 8, 8)), tmp / "mlp.onnx",
                    calib)
    assert main(["-q", "import", str(path), "--data", "digits", "--out", str(tmp / "ckpt"),
                 "--limit", "50"]) == 0
    return tmp / "ckpt"


def test_verify_an_imported_checkpoint(imported_mlp, imported_ckpt, tmp_path, capsys):
    """`qrobust verify` decides queries on a file's program (input table, float32
    requantization): proofs at 1 code, counterexamples at 26 codes, in the ball and
    misclassified by the program; the CNN file gets verdicts too (one point at eps 0)."""
    from qrobust.verify import predict
    from qrobust.verify.run import integer_program

    out = tmp_path / "v.json"
    assert main(["-q", "verify", "--ckpt", str(imported_mlp), "--eps", "0", "--eps", "1",
                 "--eps", "26", "--limit", "8", "--timeout", "5", "--out", str(out)]) == 0
    assert "eps codes" in capsys.readouterr().out
    result = json.loads(out.read_text())
    n_correct = 8 - len(result["misclassified"])
    assert n_correct > 0 and len(result["queries"]) == 3 * n_correct
    zero, one, big = (result["summary"][k] for k in ("0", "1", "26"))
    assert zero["robust"] == n_correct  # one point: decided exactly
    assert one["robust"] > 0 and big["vulnerable"] > 0
    twin, _ = load_checkpoint(imported_mlp)
    program = integer_program(twin, (1, 8, 8))
    x, y = load_dataset("digits").test.subset(slice(0, 8)).tensors()
    for q in result["queries"]:
        if q["counterexample"] is not None:
            cex = torch.tensor(q["counterexample"])
            assert int((cex - torch.round(x[q["id"]] * 255).long()).abs().max()) <= q["eps"]
            assert int(predict(program, cex[None])[0]) != int(y[q["id"]])
    assert main(["-q", "verify", "--ckpt", str(imported_ckpt), "--eps", "0", "--limit", "3",
                 "--timeout", "5"]) == 0


def test_a_study_runs_an_imported_checkpoint(imported_ckpt, tmp_path, capsys):
    """Attack cells on the twin with the program as integer model; verify cells skipped."""
    import yaml

    from qrobust.eval.store import ResultStore

    study = {"name": "imported", "data": {"dataset": "digits", "n_test": 32},
             "models": [{"name": "onnx", "checkpoint": str(imported_ckpt)}],
             "recipes": ["w8a8"], "attacks": [{"name": "pgd", "eps": [0.1],
                                               "params": {"steps": 3}}],
             "verify": [{"eps": [1], "limit": 3}], "batch_size": 32}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert main(["-q", "run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    with ResultStore(tmp_path / "run" / "results.sqlite") as store:
        rows, verified = store.rows("robustness"), store.rows("verify")
    assert len(rows) == 1 and rows[0]["config"]["recipe"] == "imported" and not verified
    m = rows[0]["metrics"]
    assert m["clean_acc_int"] == pytest.approx(m["clean_acc"]) and m["integer_note"] is None
    assert m["robust_acc_int"] is not None and m["robust_acc"] <= m["clean_acc"]
    assert "verify skips onnx" in capsys.readouterr().err
