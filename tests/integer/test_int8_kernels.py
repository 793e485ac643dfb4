"""int8 kernels and the CPU: the int16 pair-sum bound, the runtime probe, reduce-range recipes,
and the contract on a CIFAR-10-sized model whose u8 x s8 products do saturate on CPUs without
VNNI (it fails if the export trusts those kernels there)."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qrobust.checkpoint import load_checkpoint
from qrobust.errors import ConfigError
from qrobust.hardware import CpuInfo, cpu_info, parse_cpuinfo
from qrobust.integer import int8, to_integer
from qrobust.integer.agreement import prediction_agreement
from qrobust.integer.onnx import export_int8, lower_for_export, session, weight_types
from qrobust.integer.program import ConvOp, LinearOp, input_codes
from qrobust.quant import parse_recipe, quantize, resolve_reduce_range

RESNET20 = Path(__file__).parents[2] / "benchmarks" / "models" / "resnet20-cifar10"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-128, 127), min_size=1, max_size=9), st.integers(1, 255))
def test_pair_sum_bound_is_the_worst_pair(weights, x_max):
    w = torch.tensor([weights])
    worst = max((abs(x_max * a + x_max * b) for a, b in itertools.combinations(weights, 2)
                 if a * b > 0), default=0)
    worst = max(worst, *(abs(x_max * a) for a in weights))  # a single product, or mixed signs
    assert int8.pair_sum_bound(w, x_max) == worst


def test_seven_bit_weights_never_saturate_and_eight_bit_ones_can():
    g = torch.Generator().manual_seed(0)
    assert int8.u8s8_safe(torch.randint(-63, 64, (64, 144), generator=g))
    assert int8.u8s8_safe(torch.full((1, 9), -64))  # 255 x -128 fits int16 exactly
    assert not int8.u8s8_safe(torch.tensor([[127, 2, 127]]))  # 255 x 254 > 32767
    assert int8.u8s8_safe(torch.tensor([[127, -127, 1]]))  # opposite signs partly cancel


def test_cpuinfo_flags_decide_saturation():
    avx2 = parse_cpuinfo("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\n"
                         "processor\t: 1\nflags\t: avx512_vnni\n", "x86_64")
    assert avx2 == CpuInfo("x86_64", "AMD EPYC", frozenset({"avx2"}))
    assert avx2.u8s8_pairs_saturate and "no VNNI" in avx2.describe()
    assert not CpuInfo("x86_64", "Xeon", frozenset({"avx2", "avx512_vnni"})).u8s8_pairs_saturate
    assert not CpuInfo("x86_64", "Core", frozenset({"avx2", "avx_vnni"})).u8s8_pairs_saturate
    assert CpuInfo("x86_64", "unknown", frozenset()).u8s8_pairs_saturate  # unknown: assume the worst
    assert not CpuInfo("aarch64", "Neoverse", frozenset()).u8s8_pairs_saturate


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_the_runtime_saturates_exactly_where_the_cpu_flags_say(backend):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
        from qrobust.integer.openvino import int8_kernels
    else:
        from qrobust.integer.onnx import int8_kernels
    kernels = int8_kernels()
    if cpu_info().x86:
        assert kernels.probe_saturates == cpu_info().u8s8_pairs_saturate, kernels
    assert kernels.exact_u8s8 == (not kernels.probe_saturates and not cpu_info().u8s8_pairs_saturate)
    assert kernels.to_dict()["cpu"]["model"] == cpu_info().model


def test_reduce_range_recipes_keep_weights_to_seven_bits(trained, calib):
    recipe = parse_recipe("w8a8,first=8,reduce-range")
    assert recipe.weight.bits == 7 and recipe.act.bits == 8
    assert all(o.weight.bits == 7 for o in recipe.overrides)
    twin = quantize(trained("resnet20"), recipe, calib)
    program = lower_for_export(twin, (1, 8, 8), "onnx")
    layers = [op for op in program.ops if isinstance(op, (ConvOp, LinearOp))]
    assert all(int(op.weight.abs().max()) <= 63 and int8.u8s8_safe(op.weight) for op in layers)
    assert weight_types(export_int8(program, "qdq", exact_u8s8=False)) == ["int8"] * len(layers)
    assert parse_recipe("w4a4,reduce-range").weight.bits == 4  # low bit widths are safe already


def test_resolve_reduce_range():
    assert resolve_reduce_range("w8a8", "auto", saturating_cpu=True).text == "w8a8,reduce-range"
    assert resolve_reduce_range("w8a8", "auto", saturating_cpu=False).text == "w8a8"
    assert resolve_reduce_range("w8a8", "on", saturating_cpu=False).weight.bits == 7
    assert resolve_reduce_range("w8a8", "off", saturating_cpu=True).weight.bits == 8
    assert resolve_reduce_range("w4a4", "on").text == "w4a4"  # nothing to reduce
    assert resolve_reduce_range("w8", "on").text == "w8"  # weight-only: no int8 kernels
    assert resolve_reduce_range("w8a8,reduce-range", "on").text == "w8a8,reduce-range"
    with pytest.raises(ConfigError, match="valid: auto, on, off"):
        resolve_reduce_range("w8a8", "sometimes")


def synthetic_cifar(n: int, seed: int) -> torch.Tensor:
    """Smooth colour fields plus noise, 3x32x32 in [0, 1]: enough for the committed CIFAR-10
    resnet20 to predict several classes and for its activations to span their ranges."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear")
    return (low + 0.15 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def cifar_resnet20():
    if not (RESNET20 / "model.safetensors").is_file():
        pytest.skip(f"{RESNET20} is absent (benchmarks/models/retrain.sh makes it)")
    return load_checkpoint(RESNET20)[0]


def test_cifar_sized_contract_holds_on_this_cpu_and_fails_on_saturation(cifar_resnet20):
    twin = quantize(cifar_resnet20, "w8a8", synthetic_cifar(256, 1))
    x = synthetic_cifar(384, 2)
    ort_model = to_integer(twin, "onnx", threads=1)
    assert prediction_agreement(twin, ort_model, x) >= 0.995
    assert ort_model.deployment()["u8s8_exact"] == ort_model.kernels.exact_u8s8
    # the same program with int8 weights everywhere, run by this CPU's u8 x s8 kernels: where
    # they saturate, this contract is what catches it (58 of 512 predictions moved on an
    # AVX2-only EPYC)
    program = lower_for_export(twin, (3, 32, 32), "onnx")
    naive = session(export_int8(program, "qdq", exact_u8s8=True), threads=1)
    pixels = input_codes(program.input_op, torch.floor(x * 255 + 0.5).long()).to(torch.uint8)
    naive_pred = torch.from_numpy(naive.run(["logits"], {"pixels": pixels.numpy()})[0]).argmax(1)
    agreement = float((naive_pred == twin(x).argmax(1)).float().mean())
    if ort_model.kernels.probe_saturates:
        assert agreement < 0.97
    else:
        assert agreement >= 0.995


def test_openvino_refuses_weights_it_cannot_run_exactly(cifar_resnet20):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from qrobust.integer.openvino import int8_kernels

    calib, x = synthetic_cifar(256, 1), synthetic_cifar(384, 2)
    rr = quantize(cifar_resnet20, "w8a8,reduce-range", calib)
    assert prediction_agreement(rr, to_integer(rr, "openvino", threads=1), x) >= 0.995
    twin = quantize(cifar_resnet20, "w8a8", calib)
    if int8_kernels().exact_u8s8:
        assert prediction_agreement(twin, to_integer(twin, "openvino", threads=1), x) >= 0.995
    else:
        with pytest.raises(ConfigError, match="reduce-range"):
            to_integer(twin, "openvino")


def test_uint8_weights_run_exactly_on_every_cpu(trained, all_digits, calib):
    """The u8 x u8 export (what a CPU without VNNI gets) is checked on every machine."""
    twin = quantize(trained("resnet20"), "w8a8", calib)
    program = lower_for_export(twin, (1, 8, 8), "onnx")
    proto = export_int8(program, "qdq", exact_u8s8=False)
    assert set(weight_types(proto)) == {"uint8"}
    pixels = torch.floor(all_digits * 255 + 0.5).to(torch.uint8).numpy()
    got = session(proto, threads=1).run(["logits"], {"pixels": pixels})[0]
    want = to_integer(twin)(all_digits).numpy()
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.995
