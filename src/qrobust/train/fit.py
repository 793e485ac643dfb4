"""Build, train and describe a model on a dataset: the path shared by the CLI, demo and studies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from qrobust.data import Dataset, train_val_split
from qrobust.models import ModelSpec, build_model
from qrobust.train.loop import LossTerm, TrainConfig, accuracy, train


@dataclass
class Fitted:
    model: nn.Module
    meta: dict  # checkpoint metadata: model spec, dataset, metrics, config, seed


def model_spec(arch: str, data: Dataset, dropout: float = 0.0, **kwargs) -> ModelSpec:
    mean, std = data.channel_stats()
    return ModelSpec(arch, data.input_shape, data.num_classes, dropout, tuple(mean), tuple(std),
                     kwargs)


def fit(arch: str, data: Dataset, cfg: TrainConfig, *, dropout: float = 0.0,
        extra_losses: Sequence[LossTerm] = (), progress: bool | None = None,
        model: nn.Module | None = None, arch_params: dict | None = None) -> Fitted:
    """Train ``arch`` (or a given ``model``) on ``data`` and measure test accuracy.
    ``arch_params``: the architecture's own options (``width`` of small-cnn), stored in the
    checkpoint's model spec."""
    import torch

    spec = model_spec(arch, data, dropout, **(arch_params or {}))
    torch.manual_seed(cfg.seed)
    model = model if model is not None else build_model(spec)
    tr, val = train_val_split(data.train, cfg.val_fraction, cfg.seed)
    result = train(model, tr, val, cfg, extra_losses, progress)
    metrics = {"test_acc": accuracy(model, data.test, progress=progress, desc="test accuracy"),
               "val_acc": result.best_val_acc,
               "best_epoch": result.best_epoch, "epochs_run": len(result.history),
               "train_seconds": round(result.seconds, 2), "n_test": len(data.test)}
    meta = {"model": spec.to_dict(), "dataset": data.name, "metrics": metrics,
            "train_config": cfg.to_dict(), "seed": cfg.seed, "history": result.history}
    return Fitted(model, meta)
