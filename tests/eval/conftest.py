"""A saved digits small-cnn checkpoint and a tiny study around it (no training in the grid)."""

from __future__ import annotations

import pytest

from qrobust.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory, digits_cnn):
    out = tmp_path_factory.mktemp("ckpt") / "cnn"
    save_checkpoint(out, digits_cnn.model, digits_cnn.meta)
    return out


@pytest.fixture
def tiny_study(digits_ckpt):
    def make(**overrides) -> dict:
        study = {
            "name": "tiny",
            "data": {"dataset": "digits", "n_test": 48},
            "models": [{"name": "cnn", "checkpoint": str(digits_ckpt)}],
            "recipes": ["fp32", "w4a4"],
            "attacks": [{"name": "fgsm", "eps": [0, "4/255", "16/255"]},
                        {"name": "pgd", "eps": ["16/255"], "params": {"steps": 3}}],
            "seeds": [0],
            "batch_size": 32,
        }
        study.update(overrides)
        return study

    return make
