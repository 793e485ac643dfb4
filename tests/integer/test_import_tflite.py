"""Contract: an imported int8 TFLite file computes LiteRT's codes bit for bit.

Exactness tests against LiteRT (ai-edge-litert) running the committed fixtures
(tests/integer/fixtures/make_tflite.py made them with TensorFlow's converter): every tensor the
program holds (slot ``t{i}`` = the file's tensor i) equals LiteRT's tensor i on 300 random images
and on the digits test set, for both kernel sets; predictions agree; bad files fail in one line.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tflite", reason="the [tflite] extra (tflite, ai-edge-litert) is not installed")
pytest.importorskip("ai_edge_litert", reason="the [tflite] extra (tflite, ai-edge-litert) is not "
                    "installed")

from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from qrobust.errors import ConfigError  # noqa: E402
from qrobust.integer.imports.tflite import (  # noqa: E402
    _resolver,
    input_table,
    pixel_codes,
    read_tflite,
)
from qrobust.integer.program import FlattenOp, LookupOp, OutputOp  # noqa: E402
from qrobust.integer.reference import execute  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
FILES = ("mlp_digits_int8.tflite", "cnn_digits_int8.tflite", "cnn_float_io.tflite",
         "gap_int8.tflite", "strided_same_int8.tflite", "se_block_int8.tflite",
         "softmax_float_io.tflite", "uint8_io.tflite", "zero_pad_int8.tflite", "unary_int8.tflite")
KERNELS = ("builtin", "reference")
N_RANDOM = 300

# op family -> (the fixture holding it, the op)
FAMILIES = {
    "FULLY_CONNECTED": ("mlp_digits_int8.tflite", "FULLY_CONNECTED"),
    "RESHAPE": ("mlp_digits_int8.tflite", "RESHAPE"),
    "CONV_2D": ("cnn_digits_int8.tflite", "CONV_2D"),
    "CONV_2D stride 2, SAME padded one more at the bottom": ("strided_same_int8.tflite", "CONV_2D"),
    "DEPTHWISE_CONV_2D": ("cnn_digits_int8.tflite", "DEPTHWISE_CONV_2D"),
    "ZeroPadding2D + CONV_2D (MobileNetV2 stem)": ("zero_pad_int8.tflite", "CONV_2D"),
    "ZeroPadding2D + DEPTHWISE_CONV_2D, RELU6": ("zero_pad_int8.tflite", "DEPTHWISE_CONV_2D"),
    "ADD": ("cnn_digits_int8.tflite", "ADD"),
    "MAX_POOL_2D": ("cnn_digits_int8.tflite", "MAX_POOL_2D"),
    "AVERAGE_POOL_2D": ("cnn_digits_int8.tflite", "AVERAGE_POOL_2D"),
    "CONCATENATION": ("cnn_digits_int8.tflite", "CONCATENATION"),
    "SOFTMAX": ("cnn_digits_int8.tflite", "SOFTMAX"),
    "SOFTMAX then DEQUANTIZE": ("softmax_float_io.tflite", "SOFTMAX"),
    "QUANTIZE": ("cnn_float_io.tflite", "QUANTIZE"),
    "QUANTIZE uint8 <-> int8": ("uint8_io.tflite", "QUANTIZE"),
    "HARD_SWISH": ("cnn_float_io.tflite", "HARD_SWISH"),
    "LOGISTIC": ("cnn_float_io.tflite", "LOGISTIC"),
    "TANH": ("unary_int8.tflite", "TANH"),
    "LEAKY_RELU": ("unary_int8.tflite", "LEAKY_RELU"),
    "RELU (unfused, after CONCATENATION)": ("unary_int8.tflite", "RELU"),
    "QUANTIZE int8 -> int8 (to the CONCATENATION's scale)": ("unary_int8.tflite", "QUANTIZE"),
    "MUL": ("cnn_float_io.tflite", "MUL"),
    "MUL (1, 1, 1, C) x (1, H, W, C)": ("se_block_int8.tflite", "MUL"),
    "MEAN keep dims": ("cnn_float_io.tflite", "MEAN"),
    "MEAN (GlobalAveragePooling2D)": ("gap_int8.tflite", "MEAN"),
    "DEQUANTIZE": ("cnn_float_io.tflite", "DEQUANTIZE"),
}


class Run:
    """One fixture imported and run on the same pixel codes by the program and by LiteRT."""

    def __init__(self, name: str, kernels: str, pixels: np.ndarray | None = None) -> None:
        self.path = FIXTURES / name
        self.imported = read_tflite(self.path, kernels)
        if pixels is None:  # random pixel codes of the file's input shape
            shape = (N_RANDOM, *self.imported.program.input_shape)
            pixels = np.random.default_rng(0).integers(0, 256, size=shape)
        self.pixels = pixels
        self.ours = execute(self.imported.program, torch.from_numpy(pixels), keep=True)
        self.theirs = _litert_tensors(self.path, kernels, self.imported, pixels)

    def pairs(self):
        """(tensor index, our codes in the file's layout, LiteRT's codes) of every int8 tensor
        the program holds."""
        for slot in self.ours:
            m = re.fullmatch(r"t(\d+)", slot)
            if m and int(m.group(1)) in self.theirs:
                i = int(m.group(1))
                yield i, self.file_layout(slot), self.theirs[i]

    def file_layout(self, slot: str) -> np.ndarray:
        """Our codes of ``slot`` in the file's layout: (N, H, W, C), or (N, F) with a flattened
        tensor's columns back in the file's H W C order."""
        codes = self.ours[slot].numpy()
        if codes.ndim == 4:
            return codes.transpose(0, 2, 3, 1)
        flat = {op.out: op.inp for op in self.imported.program.ops if isinstance(op, FlattenOp)}
        if slot in flat:
            c, h, w = self.ours[flat[slot]].shape[1:]
            return codes[:, _flat_order(h, w, c)]
        return codes

    def output_slot(self) -> str:
        return next(op.inp for op in self.imported.program.ops if isinstance(op, OutputOp))


def _litert_tensors(path: Path, kernels: str, imported, pixels: np.ndarray) -> dict[int, np.ndarray]:
    """Every int8 / uint8 tensor of the file, per image (N, ...), as LiteRT computes it."""
    it = Interpreter(model_path=str(path), experimental_op_resolver_type=_resolver(kernels),
                     experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    spec = imported.input
    nhwc = pixels.transpose(0, 2, 3, 1)
    feed = ((np.arange(256, dtype=np.float32) / np.float32(255))[nhwc] if spec.dtype == "float32"
            else input_table(imported.program, spec)[nhwc].astype(spec.dtype))
    details = [d for d in it.get_tensor_details() if d["dtype"] in (np.int8, np.uint8)]
    out: dict[int, list] = {d["index"]: [] for d in details}
    for image in feed:
        it.set_tensor(it.get_input_details()[0]["index"], image[None])
        it.invoke()
        for d in details:
            out[d["index"]].append(it.get_tensor(d["index"])[0].copy())
    return {i: np.stack(v) for i, v in out.items()}


def _flat_order(h: int, w: int, c: int) -> np.ndarray:
    """The program column of each file column of a flattened (1, H, W, C) tensor."""
    return np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)


@pytest.fixture(scope="module")
def runs():
    cache: dict = {}

    def get(name: str, kernels: str = "builtin") -> Run:
        if (name, kernels) not in cache:
            cache[name, kernels] = Run(name, kernels)
        return cache[name, kernels]

    return get


def _op_outputs(path: Path, op_name: str) -> list[int]:
    import tflite

    model = tflite.Model.GetRootAs(path.read_bytes(), 0)
    g = model.Subgraphs(0)
    names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    out = []
    for k in range(g.OperatorsLength()):
        op = g.Operators(k)
        oc = model.OperatorCodes(op.OpcodeIndex())
        if names[max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())] == op_name:
            out.append(int(op.Outputs(0)))
    return out


# ---- whole files ---------------------------------------------------------------------------
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name", FILES)
def test_every_tensor_bit_exact(runs, name, kernels):
    run = runs(name, kernels)
    compared = 0
    for i, ours, theirs in run.pairs():
        assert np.array_equal(ours, theirs), (
            f"tensor {i}: {np.mean(ours != theirs):.4%} of codes differ from LiteRT")
        compared += 1
    assert compared >= 3


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name", FILES)
def test_output_codes_and_predictions_identical(runs, name, kernels):
    run = runs(name, kernels)
    slot = run.output_slot()
    ours = run.ours[slot].numpy().reshape(len(run.pixels), -1)
    theirs = run.theirs[int(slot[1:])].reshape(len(run.pixels), -1)
    assert np.array_equal(ours, theirs)  # 100% identical output codes
    logits = run.ours["logits"].numpy()
    fast = execute(run.imported.program, torch.from_numpy(run.pixels))["logits"].numpy()
    assert np.array_equal(fast, logits)  # the executor's logits-only path (pools moved first)
    file_out = run.imported.runtime(run.pixels / 255.0)
    # the file's own prediction; a SOFTMAX output may tie where its input does not
    top = file_out.max(1, keepdims=True)
    assert np.all(file_out[np.arange(len(logits)), logits.argmax(1)] == top[:, 0])


@pytest.mark.parametrize("name", ["mlp_digits_int8.tflite", "cnn_digits_int8.tflite"])
def test_digits_bit_exact_and_accurate(digits, name):
    x, y = digits.test.x, digits.test.y
    run = Run(name, "builtin", x.astype(np.int64))
    slot = run.output_slot()
    ours = run.ours[slot].numpy().reshape(len(x), -1)
    assert np.array_equal(ours, run.theirs[int(slot[1:])].reshape(len(x), -1))
    pred = run.ours["logits"].numpy().argmax(1)
    assert np.array_equal(pred, run.imported.runtime(x / 255.0).argmax(1))
    assert (pred == y).mean() > 0.8  # the fixtures were fitted on digits


def test_dequantized_outputs_equal_runtime(runs):
    run = runs("mlp_digits_int8.tflite")
    logits = run.ours["logits"].numpy().astype(np.float64)
    np.testing.assert_allclose(logits, run.imported.runtime(run.pixels / 255.0), rtol=1e-6)
    run = runs("cnn_float_io.tflite")  # DEQUANTIZE: float32 (q - z) s
    np.testing.assert_allclose(run.ours["logits"].numpy(), run.imported.runtime(run.pixels / 255.0),
                               rtol=1e-5, atol=1e-7)


# ---- one test per op family ----------------------------------------------------------------
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_op_family_bit_exact(runs, family, kernels):
    name, op_name = FAMILIES[family]
    run = runs(name, kernels)
    path = run.path
    if op_name in ("SOFTMAX", "DEQUANTIZE"):  # the program ends at their input codes
        slot = run.output_slot()
        ours = run.ours[slot].numpy()
        assert np.array_equal(ours.reshape(len(ours), -1),
                              run.theirs[int(slot[1:])].reshape(len(ours), -1))
        return
    outputs = _op_outputs(path, op_name)
    assert outputs, f"fixture {path.name} has no {op_name}"
    for i in outputs:
        assert np.array_equal(run.file_layout(f"t{i}"), run.theirs[i]), (
            f"{family} output tensor {i} differs from LiteRT")


def test_table_ops_are_lookups(runs):
    program = runs("cnn_float_io.tflite").imported.program
    tables = {op.out for op in program.ops if isinstance(op, LookupOp)}
    for family in ("QUANTIZE", "HARD_SWISH", "LOGISTIC", "MEAN"):
        for i in _op_outputs(FIXTURES / "cnn_float_io.tflite", family):
            assert f"t{i}" in tables


# ---- input spec, runtime -------------------------------------------------------------------
def test_input_spec_and_provenance():
    path = FIXTURES / "cnn_float_io.tflite"
    imp = read_tflite(path)
    spec = imp.input
    assert (spec.layout, spec.dtype, spec.mean, spec.std) == ("NHWC", "float32", (0.0,), (1.0,))
    assert imp.program.input_shape == (3, 12, 12)
    assert imp.format == "tflite" and imp.source == str(path)
    assert imp.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    table = input_table(imp.program, spec)
    assert table.shape == (256,) and np.all(np.diff(table) >= 0)
    imp = read_tflite(FIXTURES / "mlp_digits_int8.tflite")
    assert imp.input.dtype == "int8"
    assert np.array_equal(input_table(imp.program, imp.input),
                          pixel_codes(imp.input.scale, imp.input.zero_point))


def test_pixel_codes_match_litert_quantize():
    # int8-input files get their input codes from pixel_codes (no QUANTIZE in the file): it
    # quantizes as LiteRT's own QUANTIZE does, which made the float-input file's table
    imp = read_tflite(FIXTURES / "cnn_float_io.tflite")
    assert np.array_equal(input_table(imp.program, imp.input),
                          pixel_codes(imp.input.scale, imp.input.zero_point))
    imp = read_tflite(FIXTURES / "mlp_digits_int8.tflite")
    # scale 1/255, zero point -128
    assert np.array_equal(input_table(imp.program, imp.input), np.arange(256) - 128)


# ---- bad input -----------------------------------------------------------------------------
def test_unsupported_op_names_op_index_and_list():
    with pytest.raises(ConfigError) as e:
        read_tflite(FIXTURES / "unsupported_resize.tflite")  # Keras' UpSampling2D
    msg = str(e.value)
    assert "\n" not in msg
    assert "unsupported TFLite op EXPAND_DIMS (operator 1)" in msg
    assert "supported: ADD, AVERAGE_POOL_2D" in msg and "SOFTMAX" in msg


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.02])
def test_truncated_file_one_line_error(tmp_path, cut):
    data = (FIXTURES / "cnn_digits_int8.tflite").read_bytes()
    bad = tmp_path / "cut.tflite"
    bad.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(ConfigError) as e:
        read_tflite(bad)
    assert "\n" not in str(e.value) and "cut.tflite" in str(e.value)


def test_damaged_files_import_or_fail_in_one_line(tmp_path):
    # cut anywhere, or one byte changed: either a valid file (a weight changed) or a ConfigError
    data = (FIXTURES / "cnn_float_io.tflite").read_bytes()
    rng = np.random.default_rng(0)
    cases = [data[:int(len(data) * c)] for c in (0.05, 0.3, 0.6, 0.8, 0.95, 0.99)]
    for i in rng.integers(8, len(data), size=12):
        damaged = bytearray(data)
        damaged[i] ^= 0xFF
        cases.append(bytes(damaged))
    for n, case in enumerate(cases):
        bad = tmp_path / f"damaged{n}.tflite"
        bad.write_bytes(case)
        try:
            read_tflite(bad)
        except ConfigError as e:
            assert "\n" not in str(e) and bad.name in str(e)


def test_not_a_tflite_file(tmp_path):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="not a TFLite flatbuffer"):
        read_tflite(bad)
    with pytest.raises(ConfigError, match="cannot read TFLite file"):
        read_tflite(tmp_path / "missing.tflite")


def test_unknown_kernels():
    with pytest.raises(ConfigError, match="unknown TFLite kernels 'xnnpack'; valid: builtin"):
        read_tflite(FIXTURES / "mlp_digits_int8.tflite", kernels="xnnpack")


@pytest.mark.parametrize("name", ["cnn_digits_int8.tflite", "mlp_digits_int8.tflite",
                                  "se_block_int8.tflite", "cnn_float_io.tflite"])
def test_program_twin_equals_the_program_and_has_gradients(name):
    """The twin of an imported TFLite program computes the executor's exact logits (the
    two-step roundings come from the executor; the float line gives the gradient)."""
    from qrobust.integer.base import pixel_codes as grid
    from qrobust.integer.imports import ProgramIntegerModel, program_twin

    imp = read_tflite(FIXTURES / name)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand((64, *imp.program.input_shape), generator=gen, requires_grad=True)
    out = program_twin(imp.program, imp.input)(x)
    exact = ProgramIntegerModel(imp.program).forward_pixels(grid(x.detach()))
    assert torch.equal(out.detach().float(), exact.float())
    out[:, 0].sum().backward()
    assert float(x.grad.abs().sum()) > 0
