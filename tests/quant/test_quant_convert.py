"""quantize(): folding exactness, the twin's properties, recipes on real layers, QAT,
checkpoints."""

import copy

import pytest
import torch

from qrobust.checkpoint import load_checkpoint, read_meta
from qrobust.data import take
from qrobust.errors import ConfigError
from qrobust.models import ModelSpec, Normalize, build_model
from qrobust.quant import (
    QuantAct,
    QuantConv2d,
    QuantInput,
    QuantLinear,
    quantize,
    save_quantized,
    set_generator,
)
from qrobust.quant.qat import finetune, qat_config


def _random_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def test_batchnorm_folding_is_exact_up_to_float_error():
    torch.manual_seed(0)
    model = _random_bn(build_model(ModelSpec("resnet20", (3, 16, 16), 10, mean=(0.4, 0.5, 0.6),
                                             std=(0.2, 0.25, 0.3))))
    twin = quantize(model, "w16")  # weight-only, 16 bits: only folding changes the function
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in twin.modules())
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(x), twin(x)
    assert torch.allclose(out, ref, atol=2e-3 * float(ref.abs().max()))


def test_normalize_folding_pads_with_the_mean():
    """With the mean on the 1/255 grid, the a16 twin equals the float model (zero padding in
    normalized space = padding with the mean code) up to 16-bit rounding."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("small-cnn", (3, 8, 8), 10, mean=(77 / 255, 0.5, 30 / 255),
                                  std=(0.3, 0.2, 0.25)))
    model[0] = Normalize((77 / 255, 128 / 255, 30 / 255), (0.3, 0.2, 0.25))
    x = torch.randint(0, 256, (16, 3, 8, 8), generator=torch.Generator().manual_seed(2)) / 255.0
    twin = quantize(model, "w16a16", x)
    assert isinstance(twin.get_submodule("0"), QuantInput)
    assert twin.get_submodule("0").zero_point.flatten().tolist() == [77.0, 128.0, 30.0]
    with torch.no_grad():
        ref, out = model(x), twin(x)
    assert torch.allclose(out, ref, atol=2e-3 * float(ref.abs().max()))


def test_twin_is_deterministic_in_eval_and_passes_gradients(fitted_cnn, calib):
    model, _ = fitted_cnn
    twin = set_generator(quantize(model, "w4a4,stochastic", calib), torch.Generator())
    x = calib[:16].clone().requires_grad_()
    out1, out2 = twin(x), twin(x)
    assert out1.dtype == torch.float32 and torch.equal(out1, out2)
    twin.train()
    twin.get_submodule("aq.2").generator.manual_seed(0)
    noisy1 = twin(x)
    twin.get_submodule("aq.2").generator.manual_seed(0)
    assert torch.equal(noisy1, twin(x)) and not torch.equal(noisy1, out1)  # seeded, random
    twin.eval()
    out1.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # STE through every rounding
    grads = [p.grad for p in twin.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert model.training is False and isinstance(model[1], torch.nn.Conv2d)  # untouched
    assert not isinstance(model[1], QuantConv2d)


def test_structure_and_overrides(fitted_cnn, calib):
    model, _ = fitted_cnn
    twin = quantize(model, "w4a4,first=8,last=8", calib)
    layers = {n: m for n, m in twin.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    assert sorted(layers) == ["1", "10", "12", "3", "6"]
    assert layers["1"].wspec.bits == 8 and layers["12"].wspec.bits == 8
    assert layers["3"].wspec.bits == 4 and layers["10"].wspec.bits == 4
    acts = {n: m for n, m in twin.named_modules() if isinstance(m, QuantAct)}
    assert acts["aq.11"].spec.bits == 8  # feeds the last layer
    assert acts["aq.2"].spec.bits == 4 and not acts["aq.2"].spec.signed
    codes, _, _ = layers["3"].weight_codes()
    assert int(codes.abs().max()) <= 7 and torch.equal(codes, codes.round())


def test_unknown_layer_and_uncalibrated_errors(fitted_cnn, calib):
    model, _ = fitted_cnn
    with pytest.raises(ConfigError, match="no conv/linear layer named 'conv9'.*valid: 1, 10"):
        quantize(model, "w4a4,conv9=8", calib)
    with pytest.raises(ConfigError, match="not calibrated"):
        quantize(model, "w4a4")(calib[:2])
    with pytest.raises(ConfigError, match="Normalize"):
        quantize(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), "w8a8", calib)


@pytest.mark.parametrize("bits", [1, 3])
def test_gorsline_weights_and_biases_on_the_grid(bits):
    torch.manual_seed(0)
    model = build_model(ModelSpec("mlp", (1, 8, 8), 10))
    twin = quantize(model, f"gorsline{bits}")
    assert isinstance(twin.get_submodule("0"), Normalize)  # float activations, Normalize kept
    levels = max(1, 2 ** (bits - 1) - 1)
    for layer in (m for m in twin.modules() if isinstance(m, QuantLinear)):
        for t in (layer.quant_weight(), layer.quant_bias()):
            scaled = t.detach() * levels
            assert torch.allclose(scaled, scaled.round(), atol=1e-5)
            assert float(t.detach().abs().max()) <= 1.0 + 1e-6
            if bits == 1:
                assert set(t.detach().abs().unique().tolist()) == {1.0}


def test_qat_improves_a_2bit_twin(fitted_cnn, digits, calib):
    from qrobust.train import accuracy

    model, _ = fitted_cnn
    twin = quantize(model, "w2a2", calib)
    val = take(digits.test, 200, seed=3)
    before = accuracy(twin, val)
    trained = copy.deepcopy(twin)
    finetune(trained, digits, qat_config(epochs=3, lr=1e-3, seed=0), progress=False)
    assert accuracy(trained, val) > before
    assert not torch.equal(trained.get_submodule("3").weight, twin.get_submodule("3").weight)
    # activation scales are frozen during QAT
    assert torch.equal(trained.get_submodule("aq.2").scale, twin.get_submodule("aq.2").scale)


def test_quantized_checkpoint_round_trip(fitted_cnn, calib, tmp_path):
    model, meta = fitted_cnn
    twin = quantize(model, "w4a8,first=8", calib)
    save_quantized(tmp_path / "q", twin, meta, calib=len(calib))
    stored = read_meta(tmp_path / "q")
    assert stored["kind"] == "quantized" and stored["quant"]["recipe"]["text"] == "w4a8,first=8"
    loaded, _ = load_checkpoint(tmp_path / "q")
    assert loaded.recipe == twin.recipe and loaded.input_shape == (1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(calib), twin(calib))


def test_a_widened_twin_loads_widened_and_an_older_checkpoint_loads_plain(fitted_cnn, calib,
                                                                          tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from qrobust.checkpoint import weights_path
    from qrobust.quant import QuantInput, widen_input

    model, meta = fitted_cnn
    wide = widen_input(quantize(model, "w8a8", calib), -1.5, 2.5)
    save_quantized(tmp_path / "wide", wide, meta)
    loaded, _ = load_checkpoint(tmp_path / "wide")
    (a,), (b,) = ([m for m in t.modules() if isinstance(m, QuantInput)] for t in (wide, loaded))
    assert b.step == a.step == 4 and torch.equal(b.offset, a.offset)
    noisy = calib + 0.5 * torch.randn(calib.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(noisy), wide(noisy))
    # a file written before the window was saved: no input_step / offset -> plain pixel codes
    plain = quantize(model, "w8a8", calib)
    save_quantized(tmp_path / "old", plain, meta)
    tensors = load_file(str(weights_path(tmp_path / "old")))
    old = {k: v for k, v in tensors.items() if not k.endswith(("input_step", "offset"))}
    assert len(old) < len(tensors)
    with safe_open(str(weights_path(tmp_path / "old")), framework="pt") as f:
        header = f.metadata()
    save_file(old, str(weights_path(tmp_path / "old")), metadata=header)
    restored, _ = load_checkpoint(tmp_path / "old")
    (c,) = [m for m in restored.modules() if isinstance(m, QuantInput)]
    assert c.step == 1 and not c.offset.any()
    with torch.no_grad():
        assert torch.equal(restored(calib), plain(calib))
