import numpy as np
import pytest
import torch

from qrobust.errors import ConfigError
from qrobust.train import TrainConfig, accuracy, default_config, fit


def test_small_cnn_learns_digits(digits_cnn):
    assert digits_cnn.meta["metrics"]["test_acc"] > 0.9
    assert digits_cnn.meta["metrics"]["val_acc"] > 0.9


def test_same_seed_same_weights(digits):
    cfg = TrainConfig(epochs=1, batch_size=64, seed=3)
    a = fit("mlp", digits, cfg, progress=False).model.state_dict()
    b = fit("mlp", digits, cfg, progress=False).model.state_dict()
    c = fit("mlp", digits, TrainConfig(epochs=1, batch_size=64, seed=4), progress=False)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not torch.equal(a["2.weight"], c.model.state_dict()["2.weight"])


def test_extra_loss_terms_are_called_and_change_training(digits):
    calls = []

    def shrink(model, x, y, logits):
        calls.append(len(y))
        return 10.0 * sum((p ** 2).sum() for p in model.parameters())

    cfg = TrainConfig(epochs=1, batch_size=256, seed=0, weight_decay=0.0)
    plain = fit("mlp", digits, cfg, progress=False).model
    shrunk = fit("mlp", digits, cfg, extra_losses=[shrink], progress=False).model
    assert sum(calls) == int(round(0.9 * len(digits.train)))
    norm = lambda m: sum((p ** 2).sum().item() for p in m.parameters())  # noqa: E731
    assert norm(shrunk) < 0.5 * norm(plain)


def test_early_stopping_restores_best_epoch(digits):
    cfg = TrainConfig(epochs=30, batch_size=64, seed=0, patience=1, lr=0.5, schedule="constant")
    fitted = fit("mlp", digits, cfg, progress=False)
    hist = fitted.meta["history"]
    assert len(hist) < 30
    best = max(h["val_acc"] for h in hist)
    assert fitted.meta["metrics"]["val_acc"] == best
    assert fitted.meta["metrics"]["best_epoch"] == 1 + int(np.argmax([h["val_acc"] for h in hist]))


def test_noise_augmentation_and_adam(digits):
    cfg = TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=3e-3, noise_sigma=0.25,
                      schedule="cosine", seed=0)
    fitted = fit("small-cnn", digits, cfg, progress=False)
    assert accuracy(fitted.model, digits.test) > 0.5
    # the kept epoch is chosen by accuracy under the training noise (a smoothing base model)
    hist = fitted.meta["history"]
    assert fitted.meta["metrics"]["val_acc"] == max(h["val_acc"] for h in hist)


def test_noisy_accuracy_is_seeded_and_lower_under_heavy_noise(digits_cnn, digits):
    model = digits_cnn.model
    clean = accuracy(model, digits.test)
    a = accuracy(model, digits.test, noise_sigma=1.0, seed=5)
    assert a == accuracy(model, digits.test, noise_sigma=1.0, seed=5)
    assert a < clean - 0.2  # a clean-trained net under sigma=1 noise: far below clean


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError):
        TrainConfig(val_fraction=1.0)


def test_default_recipes():
    assert default_config("mlp", "mnist").optimizer == "adam"  # Gorsline: Adam 1e-3, batch 32
    assert default_config("mlp", "mnist").batch_size == 32
    cifar = default_config("resnet20", "cifar10", epochs=2)
    assert cifar.flip and cifar.crop_padding == 4 and cifar.epochs == 2


def test_one_cycle_on_a_run_too_short_for_its_warm_up(digits):
    """A few steps leave no room for one-cycle's warm-up phase: the loop anneals instead of
    dividing by zero inside the scheduler."""
    from qrobust.data import take
    from qrobust.data.core import Dataset

    tiny = Dataset(digits.name, take(digits.train, 120), digits.test, digits.classes,
                   digits.source)
    fitted = fit("mlp", tiny, TrainConfig(epochs=1, batch_size=32, seed=0), progress=False)
    assert len(fitted.meta["history"]) == 1
