"""qrobust: adversarial robustness of quantized neural networks.

The public API is re-exported here; sub-packages hold the implementations.
"""

from qrobust.checkpoint import load_checkpoint, read_meta, save_checkpoint
from qrobust.data import Dataset, Split, load_dataset
from qrobust.errors import CheckpointError, ConfigError, DataError, QrobustError
from qrobust.models import ModelSpec, build_model
from qrobust.registry import Registry
from qrobust.train import TrainConfig, fit, train

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "Dataset", "ModelSpec", "QrobustError",
    "Registry", "Split", "TrainConfig", "build_model", "fit", "load_checkpoint",
    "load_dataset", "read_meta", "save_checkpoint", "train",
]
