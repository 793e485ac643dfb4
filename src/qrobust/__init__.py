"""qrobust: adversarial robustness of quantized neural networks.

The public API is re-exported here; sub-packages hold the implementations. Importing the
package also registers every checkpoint kind (float, quantized, sq-ensemble).
"""

from qrobust.attacks import (
    APGD,
    ATTACKS,
    BPDA,
    EOT,
    FGSM,
    PGD,
    Autograd,
    Square,
    Temperature,
    ThreatModel,
    evaluate_robustness,
    transfer_to_integer,
)
from qrobust.certify import Certificate, Smoothed
from qrobust.checkpoint import load_checkpoint, read_meta, save_checkpoint
from qrobust.config import StudyConfig, load_study
from qrobust.data import Dataset, Split, load_dataset
from qrobust.defenses import DEFENSES, SQEnsemble, defend, fit_dq, stochastic_shield
from qrobust.errors import CheckpointError, ConfigError, DataError, QrobustError
from qrobust.eval import ResultStore, cell_key
from qrobust.eval.executors import run_study
from qrobust.integer import IntegerModel, to_integer
from qrobust.models import MODELS, ModelSpec, build_model
from qrobust.quant import QuantSpec, Recipe, parse_recipe, quantize
from qrobust.registry import Registry
from qrobust.report import write_report
from qrobust.train import TrainConfig, fit, train

__version__ = "0.1.0"

__all__ = [
    "APGD", "ATTACKS", "BPDA", "DEFENSES", "EOT", "FGSM", "MODELS", "PGD", "Autograd",
    "Certificate", "CheckpointError", "ConfigError", "DataError", "Dataset", "IntegerModel",
    "ModelSpec", "QrobustError", "QuantSpec", "Recipe", "Registry", "ResultStore", "SQEnsemble",
    "Smoothed", "Split", "Square", "StudyConfig", "Temperature", "ThreatModel", "TrainConfig",
    "build_model", "cell_key", "defend", "evaluate_robustness", "fit", "fit_dq", "load_checkpoint",
    "load_dataset", "load_study", "parse_recipe", "quantize", "read_meta", "run_study",
    "save_checkpoint", "stochastic_shield", "to_integer", "train", "transfer_to_integer",
    "write_report",
]
