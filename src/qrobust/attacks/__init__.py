"""Attacks: one loop (``Attack.run``), algorithms as init/step, gradient estimators plugged in.
The algorithm modules register themselves in ``ATTACKS`` when imported here.

``ATTACKS.get("pgd")(model, ThreatModel("linf", 8 / 255), steps=10)(x, y, generator=gen)``.
"""

from qrobust.attacks import checks
from qrobust.attacks.apgd import APGD, APGDDLR
from qrobust.attacks.base import (
    ATTACKS,
    Attack,
    AttackResult,
    ThreatModel,
    make_attack,
    random_targets,
)
from qrobust.attacks.evaluate import evaluate_robustness, robustness_curve
from qrobust.attacks.fgsm import FGSM
from qrobust.attacks.gradients import (
    BPDA,
    EOT,
    Autograd,
    Temperature,
    auto_estimator,
    global_temperature,
    hessian_temperature,
)
from qrobust.attacks.losses import LOSSES
from qrobust.attacks.pgd import PGD
from qrobust.attacks.point import Evaluation, is_success
from qrobust.attacks.square import Square
from qrobust.attacks.suite import STANDARD, Budget, Fast, Standard, Suite
from qrobust.attacks.transfer import attack_integer_model, transfer_to_integer

__all__ = [
    "APGD", "APGDDLR", "ATTACKS", "BPDA", "EOT", "FGSM", "LOSSES", "PGD", "STANDARD", "Attack",
    "AttackResult", "Autograd", "Budget", "Evaluation", "Fast", "Square", "Standard", "Suite",
    "Temperature", "ThreatModel", "attack_integer_model",
    "auto_estimator", "checks", "evaluate_robustness", "global_temperature",
    "hessian_temperature", "is_success", "make_attack", "random_targets", "robustness_curve",
    "transfer_to_integer",
]
