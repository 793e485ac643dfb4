"""A digits-trained small-cnn (seconds on one core) for the quantization tests."""

import pytest

from qrobust.data import take
from qrobust.train import default_config, fit


@pytest.fixture(scope="session")
def calib(digits):
    return take(digits.train, 256, seed=1).tensors()[0]


@pytest.fixture(scope="session")
def fitted_cnn(digits):
    """(model, checkpoint metadata) of a small-cnn trained for 6 epochs on digits."""
    fitted = fit("small-cnn", digits, default_config("small-cnn", "digits", epochs=6),
                 progress=False)
    return fitted.model.eval(), fitted.meta
