"""The one training loop, with pluggable loss terms and batch transforms."""

from qrobust.train.fit import Fitted, fit, model_spec
from qrobust.train.loop import (
    LossTerm,
    TrainConfig,
    TrainResult,
    accuracy,
    default_config,
    predict,
    train,
)

__all__ = [
    "Fitted", "LossTerm", "TrainConfig", "TrainResult", "accuracy", "default_config", "fit",
    "model_spec", "predict", "train",
]
