"""Shared fixtures. Tests use the embedded digits data or tiny files they write themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _few_threads():
    # CI has 2 cores; keep each test's intra-op parallelism predictable
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def digits():
    from qrobust.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_cnn(digits):
    """A small-cnn trained on digits for a few epochs (about 2 s), test accuracy > 0.9."""
    from qrobust.train import TrainConfig, fit

    cfg = TrainConfig(epochs=8, batch_size=64, lr=0.05, seed=0)
    return fit("small-cnn", digits, cfg, progress=False)


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real dataset {name} not present at {path}")
    return path


@pytest.fixture(scope="session")
def digits_mlp_w4a4(digits, tmp_path_factory):
    """A w4a4 MLP checkpoint on digits (about 2 s): its integer program has linear bounds, so
    small-eps verification queries take milliseconds. Returns (float ckpt, quantized ckpt)."""
    from qrobust.checkpoint import save_checkpoint
    from qrobust.quant import quantize, save_quantized
    from qrobust.train import TrainConfig, fit

    fitted = fit("mlp", digits, TrainConfig(epochs=5, batch_size=64, lr=0.05, seed=0),
                 progress=False)
    root = tmp_path_factory.mktemp("mlp")
    save_checkpoint(root / "float", fitted.model, fitted.meta)
    calib = digits.train.subset(slice(0, 64)).tensors()[0]
    twin = quantize(fitted.model.eval(), "w4a4", calib).eval()
    save_quantized(root / "w4a4", twin, fitted.meta)
    return root / "float", root / "w4a4"
