"""`qrobust quantize` and `qrobust export` end to end on digits."""

import json

import onnx
import pytest
import torch

from qrobust.checkpoint import load_checkpoint, save_checkpoint
from qrobust.cli import main
from qrobust.integer.onnx import session
from qrobust.integer.openvino import compile_onnx


@pytest.fixture
def float_ckpt(fitted_cnn, tmp_path):
    model, meta = fitted_cnn
    save_checkpoint(tmp_path / "cnn", model, meta)
    return tmp_path / "cnn"


def test_quantize_qat_and_export(float_ckpt, tmp_path, capsys, digits):
    out = tmp_path / "cnn-w8a8"
    assert main(["quantize", "--ckpt", str(float_ckpt), "--recipe", "w8a8", "--calib", "128",
                 "--qat-epochs", "1", "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "quantized" and meta["quant"]["qat_epochs"] == 1
    assert meta["quant"]["metrics"]["integer_acc"] > 0.9
    twin, _ = load_checkpoint(out)
    x = digits.test.tensors()[0][:100]
    codes = torch.clamp(torch.floor(x * 255 + 0.5), 0, 255).to(torch.uint8).numpy()
    with torch.no_grad():
        want = twin(x).argmax(1)
    for fmt in ("onnx-int8", "onnx-int8-rounded-add"):
        assert main(["export", "--ckpt", str(out), "--format", fmt,
                     "--out", str(tmp_path / f"{fmt}.onnx")]) == 0
        proto = onnx.load(str(tmp_path / f"{fmt}.onnx"))
        runs = [lambda p: session(p, threads=1).run(["logits"], {"pixels": codes})[0]]
        if fmt == "onnx-int8-rounded-add":  # the export meant for OpenVINO
            runs.append(lambda p: (c := compile_onnx(p, 1))({"pixels": codes})[c.output(0)])
        for run in runs:
            assert (torch.from_numpy(run(proto)).argmax(1) == want).float().mean() >= 0.99


@pytest.mark.parametrize("args,message", [
    (["--recipe", "w0a8"], "outside 1..16"),
    (["--recipe", "w33"], "outside 1..16"),
    (["--recipe", "w4a4,conv7=8"], "no conv/linear layer named 'conv7'"),
])
def test_bad_recipes_exit_2_with_one_line(float_ckpt, tmp_path, capsys, args, message):
    code = main(["quantize", "--ckpt", str(float_ckpt), "--calib", "32", *args,
                 "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_export_rejects_float_checkpoints_and_unknown_formats(float_ckpt, tmp_path, capsys):
    assert main(["export", "--ckpt", str(float_ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(float_ckpt), "--format", "tflite",
                 "--out", str(tmp_path / "m.onnx")]) == 2
    assert "unknown export format" in capsys.readouterr().err
