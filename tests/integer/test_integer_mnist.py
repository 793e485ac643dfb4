"""The contract on real data: MNIST small-cnn (benchmarks/models/small-cnn-mnist) on a fixed
seeded 3,000-image subset of the test set (the full 10k runs in benchmarks/quant_accuracy.py)."""

from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from qrobust.errors import DataError
from qrobust.integer.agreement import contract, prediction_agreement

CKPT = Path(__file__).parents[2] / "benchmarks" / "models" / "small-cnn-mnist"


@pytest.fixture(scope="module")
def mnist_model():
    from qrobust.checkpoint import load_checkpoint
    from qrobust.data import load_dataset

    if not (CKPT / "model.safetensors").is_file():
        pytest.skip(f"{CKPT} is absent (train it: qrobust train --model small-cnn --data mnist)")
    try:
        ds = load_dataset("mnist")
    except DataError as err:
        pytest.skip(f"MNIST is not in ../shared/data: {err}")
    model, _ = load_checkpoint(CKPT)
    return model, ds


@pytest.mark.data
def test_mnist_twin_reference_ort_and_openvino_agree(mnist_model):
    from qrobust.data import take
    from qrobust.integer import to_integer
    from qrobust.quant import quantize

    model, ds = mnist_model
    twin = quantize(model, "w8a8", take(ds.train, 512).tensors()[0])
    x, _ = take(ds.test, 3000, seed=0).tensors()
    reference = to_integer(twin)
    report = contract(twin, reference, x)
    assert report.prediction_agreement >= 0.999
    assert report.max_abs <= 1 and report.max_mismatch_rate <= 1e-3, report.codes
    assert prediction_agreement(twin, to_integer(twin, "onnx"), x) >= 0.995
    if find_spec("openvino") is not None:  # exact on every x86 CPU with 7-bit weight codes
        rr = quantize(model, "w8a8,reduce-range", take(ds.train, 512).tensors()[0])
        assert prediction_agreement(rr, to_integer(rr, "openvino"), x) >= 0.995
    assert torch.isfinite(reference(x[:4])).all()
