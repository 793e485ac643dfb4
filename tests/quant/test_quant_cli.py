"""`qrobust quantize` and `qrobust export` end to end on digits."""

import json
from importlib.util import find_spec

import onnx
import pytest
import torch

from qrobust.checkpoint import load_checkpoint, save_checkpoint
from qrobust.cli import main
from qrobust.hardware import cpu_info
from qrobust.integer.onnx import int8_kernels, session, weight_types
from qrobust.integer.openvino import compile_onnx
from qrobust.quant import QuantConv2d, QuantLinear


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
    # --reduce-range auto: 7-bit weight codes exactly where this CPU's int8 kernels saturate
    assert meta["quant"]["reduce_range"] == {"mode": "auto", "cpu": cpu_info().to_dict()}
    reduced = meta["quant"]["recipe"]["weight"]["bits"] == 7
    assert reduced == cpu_info().u8s8_pairs_saturate
    assert meta["quant"]["recipe"]["text"] == ("w8a8,reduce-range" if reduced else "w8a8")
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
        if fmt == "onnx-int8-rounded-add" and find_spec("openvino"):  # the export for OpenVINO
            runs.append(lambda p: (c := compile_onnx(p, 1))({"pixels": codes})[c.output(0)])
        for run in runs:
            assert (torch.from_numpy(run(proto)).argmax(1) == want).float().mean() >= 0.99


@pytest.mark.parametrize("mode", ["on", "off"])
def test_reduce_range_on_and_off(float_ckpt, tmp_path, capsys, mode):
    out = tmp_path / f"cnn-{mode}"
    assert main(["quantize", "--ckpt", str(float_ckpt), "--recipe", "w8a8", "--calib", "64",
                 "--reduce-range", mode, "--out", str(out)]) == 0
    twin, meta = load_checkpoint(out)
    top = max(int(m.weight_codes()[0].abs().max()) for m in twin.modules()
              if isinstance(m, (QuantConv2d, QuantLinear)))
    assert top == (63 if mode == "on" else 127)
    capsys.readouterr()
    assert main(["export", "--ckpt", str(out), "--out", str(tmp_path / "m.onnx")]) == 0
    said = capsys.readouterr().out
    # full 8-bit weights exported as int8 (a VNNI CPU) are flagged: exact only with VNNI
    assert ("exact only on CPUs with VNNI" in said) == (mode == "off" and int8_kernels().exact_u8s8)
    assert weight_types(onnx.load(str(tmp_path / "m.onnx"))) == (
        ["int8"] * 5 if mode == "on" or int8_kernels().exact_u8s8 else ["uint8"] * 5)


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
