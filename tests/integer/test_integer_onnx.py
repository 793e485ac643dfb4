"""ONNX Runtime int8 backend: agreement with the twin, integer-only graph, fp32 baseline."""

import numpy as np
import pytest
import torch

from qrobust.errors import ConfigError
from qrobust.integer import to_integer
from qrobust.integer.agreement import prediction_agreement
from qrobust.integer.onnx import export_int8, float_model_proto, fused_op_types, session
from qrobust.integer.program import lower
from qrobust.quant import quantize

INTEGER_OPS = {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "MaxPool", "Flatten",
               "Reshape", "MatMulInteger", "Pad", "Where", "Add", "Cast", "Mul", "Identity"}
# A QDQ graph holds only standard ONNX ops; the float ops sit between DequantizeLinear and
# QuantizeLinear, except the last layer whose float output is the logits.
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "Conv", "Add", "GlobalAveragePool", "MatMul",
           "MaxPool", "Flatten", "Reshape", "Pad", "Where"}
# What ORT runs after fusing the QDQ groups: integer kernels only (QGemm: uint8 x int8 with
# int32 accumulation and a float output, the logits).
FUSED_OPS = {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm",
             "MatMulIntegerToFloat", "MaxPool", "Flatten", "Reshape", "Pad", "Where"}


@pytest.mark.parametrize("arch,recipe", [("small-cnn", "w8a8"), ("mlp", "w4a8,pt"),
                                         ("resnet20", "w8a8")])
def test_twin_and_ort_int8_agree(trained, all_digits, calib, arch, recipe):
    twin = quantize(trained(arch), recipe, calib)
    for fmt in ("qdq", "qoperator"):
        ort_model = to_integer(twin, "onnx", threads=1, fmt=fmt)
        assert prediction_agreement(twin, ort_model, all_digits) >= 0.995


@pytest.mark.parametrize("arch,recipe", [("small-cnn", "w8a8"), ("mlp", "w4a8,pt"),
                                         ("resnet20", "w8a8")])
def test_qdq_is_standard_onnx_fused_into_integer_kernels(trained, all_digits, calib, arch, recipe):
    program = lower(quantize(trained(arch), recipe, calib), (1, 8, 8))
    qdq, qop = export_int8(program, "qdq"), export_int8(program, "qoperator")
    assert {n.op_type for n in qdq.graph.node} <= QDQ_OPS
    assert {n.domain for n in qdq.graph.node} <= {""}  # no contrib ops: portable
    assert {n.op_type for n in qop.graph.node} <= INTEGER_OPS
    fused = set(fused_op_types(qdq))
    assert fused <= FUSED_OPS, fused - FUSED_OPS
    pixels = (all_digits * 255).round().to(torch.uint8).numpy()
    got = session(qdq, 1).run(["logits"], {"pixels": pixels})[0]
    want = session(qop, 1).run(["logits"], {"pixels": pixels})[0]
    assert np.array_equal(got.argmax(1), want.argmax(1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_ort_needs_8bit_activations(trained, calib):
    with pytest.raises(ConfigError, match="8-bit"):
        to_integer(quantize(trained("small-cnn"), "w4a4", calib), "onnx")
    with pytest.raises(ConfigError, match="unknown ONNX int8 format"):
        to_integer(quantize(trained("small-cnn"), "w8a8", calib), "onnx", fmt="qlinear")


def test_fp32_graph_matches_a_16bit_activation_twin(trained, digits, calib):
    """The fp32 baseline is the same network with float activations: a w8a16 twin (same
    8-bit weights, activations on a 2^-16 grid) is an independent oracle."""
    model = trained("resnet20")
    program = lower(quantize(model, "w8a8", calib), (1, 8, 8))
    sess = session(float_model_proto(program), threads=1)
    x = digits.test.tensors()[0][:100]  # on the 1/255 pixel grid already
    got = torch.from_numpy(sess.run(["logits"], {"x": x.numpy()})[0])
    with torch.no_grad():  # calibrated on x itself: 16-bit activations that never clip
        want = quantize(model, "w8a16", x)(x)
    err = float((got - want).abs().max())
    # measured 0.3% of the largest logit on digits resnet20 (16-bit activations are not float)
    assert err <= float(want.abs().max()) * 1e-2, err
    assert np.mean((got.argmax(1) == want.argmax(1)).numpy()) >= 0.99
