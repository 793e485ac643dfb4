"""Digits-trained float models (seconds on one core), shared by the integer contract tests."""

import pytest
import torch

from qrobust.data import take
from qrobust.train import default_config, fit

EPOCHS = {"small-cnn": 6, "mlp": 8, "resnet20": 3}


@pytest.fixture(scope="session")
def calib(digits):
    return take(digits.train, 256, seed=1).tensors()[0]


@pytest.fixture(scope="session")
def trained(digits):
    cache: dict = {}

    def get(arch: str) -> torch.nn.Module:
        if arch not in cache:
            cfg = default_config(arch, "digits", epochs=EPOCHS[arch], patience=None)
            cache[arch] = fit(arch, digits, cfg, progress=False).model.eval()
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def all_digits(digits):
    """All 1,797 digits images (train and test): the contract tests' evaluation set."""
    return torch.cat([digits.train.tensors()[0], digits.test.tensors()[0]])
