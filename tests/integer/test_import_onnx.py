"""Contract: an int8 ONNX file quantized by ONNX Runtime's ``quantize_static`` (QDQ and
QOperator), imported as an integer program, agrees with ONNX Runtime running the file:
identical predictions on >= 99.9% of inputs and output codes within 1 LSB (0 where ORT's
requantization is reproduced exactly); the program twin agrees with the program.

Weights are int8 with ``reduce_range`` (7-bit codes) or uint8: on CPUs without VNNI, ORT's
u8 x s8 kernels saturate int16 pair sums for full 8-bit weights (qrobust.integer.int8), a
runtime defect the import warns about but cannot follow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qrobust.integer.base import pixel_codes
from qrobust.integer.imports import ProgramIntegerModel, agreement, import_file, program_twin
from qrobust.integer.imports.base import output_codes

ort_q = pytest.importorskip("onnxruntime.quantization")
N_IMAGES = 1000


class _Reader(ort_q.CalibrationDataReader):
    """Random images normalised as the file expects, in a few batches (seeded)."""

    def __init__(self, shape, mean, std, seed=0):
        g = np.random.default_rng(seed)
        self.batches = iter([{"x": ((g.integers(0, 256, (8, *shape)) / 255.0 - mean) / std)
                              .astype(np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


def make_file(tmp_path, model: nn.Module, shape=(3, 8, 8), fmt="qdq", per_channel=True,
              activation="u8", weight="s8", symmetric=False, mean=0.5, std=0.25,
              name="model") -> str:
    """Export ``model`` with torch.onnx and quantize it with ORT's quantize_static."""
    torch.manual_seed(0)
    float_path, path = tmp_path / f"{name}.float.onnx", tmp_path / f"{name}.onnx"
    torch.onnx.export(model.eval(), torch.rand(1, *shape), str(float_path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                      opset_version=17, dynamo=False)
    types = {"u8": ort_q.QuantType.QUInt8, "s8": ort_q.QuantType.QInt8}
    ort_q.quantize_static(
        str(float_path), str(path), _Reader(shape, mean, std),
        quant_format=ort_q.QuantFormat.QDQ if fmt == "qdq" else ort_q.QuantFormat.QOperator,
        per_channel=per_channel, activation_type=types[activation], weight_type=types[weight],
        reduce_range=weight == "s8", extra_options={"ActivationSymmetric": symmetric})
    return str(path)


def images(shape=(3, 8, 8), n=N_IMAGES, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).float() / 255.0


def check(path, shape=(3, 8, 8), mean=0.5, std=0.25, exact=True):
    """Import ``path`` and measure it against ORT; returns the Agreement."""
    imp = import_file(path, mean=(mean,), std=(std,))
    x = images(shape)
    got = agreement(imp, ProgramIntegerModel(imp.program), x)
    assert got.same_prediction >= 0.999, got
    assert got.max_code_diff is not None and got.max_code_diff <= 1, got
    if exact:  # every op reproduced bit for bit
        assert got.max_code_diff == 0, got
    return got


# ---- models: one per op family --------------------------------------------------------------
class Family(nn.Module):
    """Stem conv + ReLU, the family's block, then flatten + linear (the logits)."""

    def __init__(self, block: str):
        super().__init__()
        self.block = block
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.side = nn.Conv2d(8, 8, 1)
        spatial = {"maxpool": 4, "avgpool": 4, "gap": 1}.get(block, 8)
        width = 16 if block == "concat" else 8
        self.fc = nn.Linear(width * spatial * spatial, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        b = self.block
        if b == "conv":
            y = torch.relu(self.conv(y))
        elif b == "depthwise":
            y = torch.relu(self.dw(y))
        elif b == "add":
            y = y + self.side(y)
        elif b == "mul":
            y = y * torch.sigmoid(self.side(y))
        elif b == "maxpool":
            y = nn.functional.max_pool2d(y, 2)
        elif b == "avgpool":
            y = nn.functional.avg_pool2d(y, 2)
        elif b == "gap":
            y = nn.functional.adaptive_avg_pool2d(y, 1)
        elif b == "concat":
            y = torch.cat([y, self.side(y)], 1)
        elif b == "hardswish":
            y = nn.functional.hardswish(self.conv(y))
        elif b == "sigmoid":
            y = torch.sigmoid(self.conv(y))
        return self.fc(y.flatten(1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3 * 8 * 8, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x.flatten(1))))


# every family is reproduced bit for bit (QLinearAveragePool by FloatAvgPoolOp)
INEXACT: set[str] = set()
FAMILIES = ["conv", "depthwise", "add", "mul", "maxpool", "avgpool", "gap", "concat",
            "hardswish", "sigmoid"]


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
@pytest.mark.parametrize("block", FAMILIES)
def test_op_family_matches_onnxruntime(tmp_path, block, fmt):
    torch.manual_seed(0)
    path = make_file(tmp_path, Family(block), fmt=fmt)
    check(path, exact=block not in INEXACT)


@pytest.mark.parametrize("fmt,per_channel,activation,weight,symmetric", [
    ("qdq", True, "u8", "s8", False),
    ("qdq", False, "s8", "s8", True),
    ("qdq", False, "u8", "u8", False),
    ("qdq", True, "s8", "s8", False),
    ("qoperator", True, "s8", "s8", True),
    ("qoperator", False, "u8", "s8", False),
    ("qoperator", False, "u8", "u8", False),
])
def test_quantization_settings_match_onnxruntime(tmp_path, fmt, per_channel, activation, weight,
                                                  symmetric):
    """Per-channel / per-tensor weights, uint8 / int8 activations, symmetric / asymmetric."""
    torch.manual_seed(1)
    path = make_file(tmp_path, Family("add"), fmt=fmt, per_channel=per_channel,
                     activation=activation, weight=weight, symmetric=symmetric)
    check(path)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_mlp_matches_onnxruntime(tmp_path, fmt):
    torch.manual_seed(2)
    check(make_file(tmp_path, MLP(), fmt=fmt))


class Mixed(nn.Module):
    """Everything at once (a MobileNet-ish block): depthwise, hard-swish, residual add, concat,
    squeeze-excite style mul, max and average pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.se = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        y = nn.functional.max_pool2d(torch.relu(self.stem(x)), 2)
        y = y + self.pw(nn.functional.hardswish(self.dw(y)))
        y = torch.cat([y, y * torch.sigmoid(self.pw(y))], 1)
        y = nn.functional.avg_pool2d(torch.relu(self.se(y)), 2)
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_twin_matches_program_and_has_gradients(tmp_path, fmt):
    torch.manual_seed(3)
    path = make_file(tmp_path, Mixed(), fmt=fmt)
    imp = import_file(path, mean=(0.5,), std=(0.25,))
    integer = ProgramIntegerModel(imp.program)
    got = agreement(imp, integer, images())
    assert got.same_prediction >= 0.999 and got.max_code_diff <= 1, got

    twin = program_twin(imp.program, imp.input)
    x = images(n=300)
    with torch.no_grad():
        a, b = twin(x), integer(x)
    assert bool((a.argmax(1) == b.argmax(1)).all())
    assert int((output_codes(imp.program, a) - output_codes(imp.program, b)).abs().max()) <= 1
    xg = x[:8].clone().requires_grad_(True)
    twin(xg)[:, 0].sum().backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0


def test_input_table_is_the_runtime_quantizer(tmp_path):
    """The per-channel input table holds exactly the codes ORT's QuantizeLinear gives for
    each pixel code, here with per-channel mean/std."""
    torch.manual_seed(4)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    path = make_file(tmp_path, Family("conv"), mean=np.array(mean).reshape(1, 3, 1, 1),
                     std=np.array(std).reshape(1, 3, 1, 1))
    imp = import_file(path, mean=mean, std=std)
    table = imp.program.input_op.table
    assert table.shape == (3, 256)
    assert bool((table[:, 1:] >= table[:, :-1]).all())  # monotone in the pixel code
    x = images()
    got = agreement(imp, ProgramIntegerModel(imp.program), x)
    assert got.same_prediction >= 0.999 and got.max_code_diff == 0, got
    codes = ProgramIntegerModel(imp.program).intermediate_codes(pixel_codes(x[:4]))
    assert codes[imp.program.input_op.out].shape == (4, 3, 8, 8)


def test_program_storage_round_trip(tmp_path):
    """program_state -> safetensors-compatible tensors + JSON -> the same program, the same
    codes; the twin skeleton loads them back (what checkpoints do)."""
    import json

    from qrobust.integer.imports.twin import ProgramTwin, program_from_state, program_state

    torch.manual_seed(5)
    imp = import_file(make_file(tmp_path, Mixed(), fmt="qoperator"), mean=(0.5,), std=(0.25,))
    meta, tensors = program_state(imp.program)
    meta = json.loads(json.dumps(meta))  # JSON-able
    again = program_from_state(meta, tensors)
    x = pixel_codes(images(n=64))
    a = ProgramIntegerModel(imp.program).intermediate_codes(x)
    b = ProgramIntegerModel(again).intermediate_codes(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    twin = ProgramTwin.skeleton(meta)
    twin.load_state_dict(tensors)
    with torch.no_grad():
        assert torch.equal(twin(images(n=64)), program_twin(imp.program)(images(n=64)))


def test_verifier_decides_imported_programs(tmp_path):
    """An imported conv program is verified (tests/verify/test_imported.py checks soundness):
    at eps 0 the box is the image itself, robust for its own prediction."""
    from qrobust.integer.reference import execute
    from qrobust.verify import verify

    imp = import_file(make_file(tmp_path, Family("conv")), mean=(0.5,), std=(0.25,))
    codes = pixel_codes(images(n=1))[0]
    pred = int(execute(imp.program, codes.unsqueeze(0))["logits"].argmax(1))
    assert verify(imp.program, codes, pred, 0, timeout=10).status == "robust"


def test_unknown_suffix_is_refused(tmp_path):
    from qrobust.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown suffix '.pb'"):
        import_file(tmp_path / "model.pb")


class Nhwc(nn.Module):
    """Takes NHWC images (as TensorFlow-made files do) and transposes them first."""

    def __init__(self):
        super().__init__()
        self.inner = Family("depthwise")

    def forward(self, x):
        return self.inner(x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_nhwc_input_layout(tmp_path, fmt):
    torch.manual_seed(6)
    float_path, path = tmp_path / "nhwc.float.onnx", tmp_path / "nhwc.onnx"
    torch.onnx.export(Nhwc().eval(), torch.rand(1, 8, 8, 3), str(float_path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                      opset_version=17, dynamo=False)
    g = np.random.default_rng(0)
    reader = iter([{"x": ((g.integers(0, 256, (8, 8, 8, 3)) / 255.0 - 0.5) / 0.25)
                    .astype(np.float32)} for _ in range(4)])

    class Reader(ort_q.CalibrationDataReader):
        def get_next(self):
            return next(reader, None)

    ort_q.quantize_static(
        str(float_path), str(path), Reader(),
        quant_format=ort_q.QuantFormat.QDQ if fmt == "qdq" else ort_q.QuantFormat.QOperator,
        per_channel=True, reduce_range=True)
    imp = import_file(path, mean=(0.5,), std=(0.25,), layout="NHWC")
    assert imp.program.input_shape == (3, 8, 8)
    got = agreement(imp, ProgramIntegerModel(imp.program), images())
    assert got.same_prediction >= 0.999 and got.max_code_diff == 0, got


def test_unfused_int8_groups_within_one_code(tmp_path):
    """int8 activations in QDQ form: ORT (without VNNI) runs convs, pools, concat, add and mul
    in float between DequantizeLinear and QuantizeLinear; the program's integer ops agree
    within one code (measured: 0.02% of output codes off by one)."""
    torch.manual_seed(0)
    check(make_file(tmp_path, Mixed(), activation="s8", per_channel=False), exact=False)


def test_warns_where_the_runtime_saturates(tmp_path):
    """Full 8-bit int8 weights on a CPU whose u8 x s8 kernels saturate int16 pair sums: the
    runtime itself is inexact there, and the import says so."""
    from qrobust.integer.onnx.session import int8_kernels

    if int8_kernels().exact_u8s8:
        pytest.skip("this CPU's u8 x s8 kernels are exact (VNNI)")
    torch.manual_seed(0)
    path = make_file(tmp_path, Mixed(), fmt="qoperator", weight="u8")  # stored as int8, 8-bit
    with pytest.warns(UserWarning, match="saturate int16 pair sums"):
        import_file(path, mean=(0.5,), std=(0.25,))
