"""Quantization-aware training: fine-tune the twin with the one training loop (STE gradients)."""

from __future__ import annotations

from qrobust.data import Dataset, train_val_split
from qrobust.train import TrainConfig, TrainResult, train


def qat_config(epochs: int = 1, lr: float | None = None, seed: int = 0,
               batch_size: int = 128) -> TrainConfig:
    """Adam, cosine-decayed from ``lr`` (default 1e-4), no weight decay: a gentle fine-tune of
    a PTQ-initialised twin (activation scales stay at their calibrated values)."""
    return TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="adam",
                       lr=lr if lr is not None else 1e-4, schedule="cosine", weight_decay=0.0,
                       seed=seed)


def finetune(twin, data: Dataset, cfg: TrainConfig, progress: bool | None = None) -> TrainResult:
    """QAT: train ``twin`` in place on ``data.train`` (10% held out, best epoch kept)."""
    tr, val = train_val_split(data.train, cfg.val_fraction, cfg.seed)
    result = train(twin, tr, val, cfg, progress=progress)
    twin.eval()
    return result
