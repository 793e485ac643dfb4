"""OpenVINO int8 backend: agreement with the twin, and the rounded-add export it runs.

8-bit weights are ``reduce-range`` (7-bit codes): OpenVINO runs them exactly on every x86 CPU,
with or without VNNI (tests/integer/test_int8_kernels.py checks the refusal of full 8-bit
weights where they could saturate)."""

import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from qrobust.errors import ConfigError
from qrobust.integer import to_integer
from qrobust.integer.agreement import prediction_agreement
from qrobust.integer.onnx import export_int8, session
from qrobust.integer.program import lower
from qrobust.quant import quantize

needs_openvino = pytest.mark.skipif(find_spec("openvino") is None,
                                    reason="the openvino extra is not installed")


@needs_openvino
@pytest.mark.parametrize("arch,recipe", [("small-cnn", "w8a8,reduce-range"), ("mlp", "w4a8,pt"),
                                         ("resnet20", "w8a8,reduce-range")])
def test_twin_and_openvino_int8_agree(trained, all_digits, calib, arch, recipe):
    twin, x = quantize(trained(arch), recipe, calib), all_digits
    ov_model = to_integer(twin, "openvino", threads=1)
    assert prediction_agreement(twin, ov_model, x) >= 0.995
    # and with ORT, logit for logit: both run the same integer program, so logits differ only
    # where a near-tie rounds the other way. Plain QDQ under OpenVINO (its fused residual adds
    # skip a rounding) changed the logits of every image of digits resnet20; measured 1.1% here.
    got, want = ov_model(x), to_integer(twin, "onnx", threads=1)(x)
    differs = (got - want).abs().amax(1) > 1e-4 * float(want.abs().max())
    assert float(differs.float().mean()) <= 0.05


def _producers(proto):
    return {o: n for n in proto.graph.node for o in n.output}


def test_rounded_add_export_keeps_the_rounding_and_the_values(trained, all_digits, calib):
    program = lower(quantize(trained("resnet20"), "w8a8,reduce-range", calib), (1, 8, 8))
    qdq, rounded = export_int8(program, "qdq"), export_int8(program, "qdq-rounded-add")
    # in qdq, residual adds read conv outputs through Q -> DQ; in qdq-rounded-add, through
    # Round -> Clip -> Mul, with no dead Q node left behind
    for proto, pattern in ((qdq, "DequantizeLinear"), (rounded, "Mul")):
        producer = _producers(proto)
        adds = [n for n in proto.graph.node if n.op_type == "Add" and n.output[0] != "logits"]
        assert adds and any(producer[i].op_type == pattern for n in adds for i in n.input)
    producer = _producers(rounded)
    from_conv = [producer[producer[producer[producer[i].input[0]].input[0]].input[0]]
                 for n in rounded.graph.node if n.op_type == "Add" for i in n.input
                 if i in producer and producer[i].op_type == "Mul"]
    assert from_conv and {n.op_type for n in from_conv} == {"Div"}
    consumed = {i for n in rounded.graph.node for i in n.input} | {"logits"}
    assert all(set(n.output) <= consumed for n in rounded.graph.node)
    assert {t.name for t in rounded.graph.initializer} <= consumed
    # same program: ORT gives the same predictions for both formats
    pixels = (all_digits * 255).round().to(torch.uint8).numpy()
    a = session(qdq, 1).run(["logits"], {"pixels": pixels})[0]
    b = session(rounded, 1).run(["logits"], {"pixels": pixels})[0]
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.999
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()


def test_openvino_missing_is_a_clear_error(trained, calib, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(ConfigError, match="qrobust\\[openvino\\]"):
        to_integer(quantize(trained("small-cnn"), "w8a8", calib), "openvino")


@needs_openvino
def test_openvino_needs_8bit_activations(trained, calib):
    with pytest.raises(ConfigError, match="8-bit"):
        to_integer(quantize(trained("small-cnn"), "w4a4", calib), "openvino")


@pytest.mark.parametrize("backend", ["onnx", pytest.param("openvino", marks=needs_openvino)])
def test_exported_backends_need_an_input_shape(trained, calib, backend):
    twin = quantize(trained("small-cnn"), "w8a8,reduce-range", calib)
    twin.meta["input_shape"] = None  # e.g. a twin quantized without one
    with pytest.raises(ConfigError, match=f"the {backend} backend needs the input shape"):
        to_integer(twin, backend)
    assert to_integer(twin, backend, input_shape=(1, 8, 8))(calib[:2]).shape == (2, 10)
