"""LSQ (learned step sizes): the gradient of a learned scale, training moves it, and a trained
LSQ twin still lowers to an integer program that matches it (the contract)."""

import math

import pytest
import torch

from qrobust.checkpoint import load_checkpoint
from qrobust.integer import to_integer
from qrobust.integer.agreement import contract
from qrobust.quant import QuantAct, parse_recipe, quantize
from qrobust.quant.checkpoint import save_quantized
from qrobust.quant.qat import finetune
from qrobust.train import TrainConfig
from qrobust.train.fit import model_spec


def test_lsq_scale_gradient_is_the_papers():
    """d x_hat / d s = -x/s + round(x/s) inside the range, qmin or qmax outside (Esser et al.
    2020, eq. 3), times the gradient scale 1/sqrt(n qmax). "Inside" is decided on the rounded
    code, as for the input's STE mask (the paper decides on x/s: they differ within half a
    step of the range's ends)."""
    spec = parse_recipe("w4a4,lsq").act
    act = QuantAct(spec)
    act._set(torch.tensor(0.5), torch.tensor(0.0))
    act.train()
    x = torch.tensor([[0.1, 0.74, 1.3, 3.0, 9.0, -0.2]], dtype=torch.float64)
    act(x).sum().backward()
    v = x / 0.5
    r = torch.floor(v + 0.5)
    inside = (r >= spec.qmin) & (r <= spec.qmax)
    per_value = torch.where(inside, -v + r,
                            torch.where(r < spec.qmin, float(spec.qmin), float(spec.qmax)))
    want = per_value.sum() / math.sqrt(x[0].numel() * spec.qmax)
    assert act.scale.grad is not None
    assert torch.allclose(act.scale.grad.double(), want, atol=1e-6)


def test_eval_mode_lsq_scales_are_constants(trained, calib):
    twin = quantize(trained("small-cnn"), "w4a4,lsq", calib)
    x = calib[:8].clone().requires_grad_()
    twin(x).sum().backward()  # an attack's gradient: no graph through the scales
    assert all(p.grad is None for n, p in twin.named_parameters() if n.endswith("scale"))
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("arch,recipe", [("small-cnn", "w2a2,lsq"), ("mlp", "w3a3,lsq,pt"),
                                         ("resnet20", "w4a4,lsq,first=8,last=8")])
def test_trained_lsq_twin_and_integer_model_agree(trained, digits, calib, all_digits, tmp_path,
                                                  arch, recipe):
    twin = quantize(trained(arch), recipe, calib)
    scales = {n: p.detach().clone() for n, p in twin.named_parameters() if n.endswith("scale")}
    assert scales
    cfg = TrainConfig(epochs=1, batch_size=64, optimizer="sgd", lr=0.01, schedule="cosine",
                      weight_decay=0.0, seed=0)
    finetune(twin, digits, cfg, progress=False)
    moved = [n for n, p in twin.named_parameters() if n in scales and not torch.equal(p, scales[n])]
    assert len(moved) == len(scales), "every learned scale is trained"
    report = contract(twin, to_integer(twin), all_digits)
    for name, d in report.codes.items():
        assert d.max_abs <= 1 and d.mismatch_rate <= 1e-3, (name, d)
    assert report.prediction_agreement >= 0.999
    # a saved LSQ twin reloads with its learned scales: identical logits
    meta = {"model": model_spec(arch, digits).to_dict(), "dataset": "digits"}
    path = save_quantized(tmp_path / "lsq", twin, meta)
    again, _ = load_checkpoint(path)
    assert torch.equal(again(all_digits[:64]), twin(all_digits[:64]))
