"""Quantization-aware training: fine-tune the twin with the one training loop (STE gradients)."""

from __future__ import annotations

from qrobust.data import Dataset, train_val_split
from qrobust.train import TrainConfig, TrainResult, default_config, train


def qat_config(epochs: int = 1, lr: float | None = None, seed: int = 0,
               batch_size: int = 128, dataset: str = "") -> TrainConfig:
    """Adam, cosine-decayed from ``lr`` (default 1e-4), no weight decay, with the dataset's
    training augmentation (crops and flips on CIFAR-10): a fine-tune of a PTQ-initialised twin.
    Adam for LSQ recipes too: the twin has its batch norms folded, and LSQ's SGD at 0.01 broke
    a folded resnet20 (CIFAR-10 train accuracy 0.25 after an epoch at w4a4; after 60 steps at
    w2a2, SGD at 1e-3 reached 0.28 test accuracy where Adam at 1e-4 reached 0.46)."""
    augment = default_config("", dataset)
    return TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="adam",
                       lr=lr if lr is not None else 1e-4, schedule="cosine", weight_decay=0.0,
                       seed=seed, crop_padding=augment.crop_padding, flip=augment.flip)


def finetune(twin, data: Dataset, cfg: TrainConfig, progress: bool | None = None) -> TrainResult:
    """QAT: train ``twin`` in place on ``data.train`` (10% held out, best epoch kept)."""
    tr, val = train_val_split(data.train, cfg.val_fraction, cfg.seed)
    result = train(twin, tr, val, cfg, progress=progress)
    twin.eval()
    return result
