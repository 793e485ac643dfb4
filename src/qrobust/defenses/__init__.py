"""Defenses: input filters, MC dropout, and (issue 7) DQ, SQ ensembles, Stochastic-Shield.

Every defense declares ``randomized`` / ``differentiable`` so that attacks pick EOT / BPDA.
"""

from qrobust.defenses.base import (
    DEFENSES,
    Defended,
    Defense,
    apply_defense,
    bpda_targets,
    defend,
    is_differentiable,
    is_randomized,
    reseed,
    split_at_randomness,
)
from qrobust.defenses.filters import BitDepth, GaussianFilter, MeanFilter, MedianFilter
from qrobust.defenses.mc_dropout import MCDropout, MCDropoutModel, insert_dropout

__all__ = [
    "DEFENSES", "BitDepth", "Defended", "Defense", "GaussianFilter", "MCDropout", "MCDropoutModel",
    "MeanFilter", "MedianFilter", "apply_defense", "bpda_targets", "defend", "insert_dropout", "is_differentiable",
    "is_randomized", "reseed", "split_at_randomness",
]

# issue 7 (defenses engineer): DQ, amplification, SQ, SQ ensembles, detection, Stochastic-Shield
from qrobust.defenses.amplification import amplification_ratios, compare_amplification  # noqa: E402,I001
from qrobust.defenses.dq import LipschitzRegularizer, dq_model, fit_dq, lipschitz_penalty  # noqa: E402
from qrobust.defenses.sq import StochasticQuantizer, sq_model, stochastic_quantize  # noqa: E402
from qrobust.defenses.ensemble import EnsembleLoss, SQEnsemble, build_sq_ensemble  # noqa: E402
from qrobust.defenses.detection import detection_auc, information_plane, mutual_information  # noqa: E402
from qrobust.defenses.shield import stochastic_shield  # noqa: E402

__all__ += [
    "EnsembleLoss", "LipschitzRegularizer", "SQEnsemble", "StochasticQuantizer",
    "amplification_ratios", "build_sq_ensemble", "compare_amplification", "detection_auc",
    "dq_model", "fit_dq", "information_plane", "lipschitz_penalty", "mutual_information",
    "sq_model", "stochastic_quantize", "stochastic_shield",
]
