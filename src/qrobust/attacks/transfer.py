"""Attacking the deployed model: adversarial examples crafted on the fake-quant twin (white-box,
STE gradients) and evaluated on the IntegerModel that really computes in integers
(``qrobust.integer.to_integer``), plus the score-based square attack run directly on the integer
model (it needs only logits).
"""

from __future__ import annotations

from typing import Any

import torch

from qrobust.attacks.base import Attack, ThreatModel
from qrobust.attacks.evaluate import _attack_points, evaluate_robustness, predict

DISAGREEMENT_THRESHOLD = 0.01


def transfer_to_integer(twin: Any, attack: Attack, x: torch.Tensor, y: torch.Tensor, *,
                        integer: Any | None = None, backend: str = "reference",
                        batch_size: int = 256, generator: torch.Generator | None = None,
                        progress: bool | None = None, x_adv: torch.Tensor | None = None) -> dict:
    """Attack ``twin`` on the points it classifies correctly and evaluate the adversarial
    examples on the integer model (built with ``to_integer(twin, backend)`` if not given).
    ``x_adv``: adversarial examples ``attack`` already made for ``twin`` on x (e.g.
    ``evaluate_robustness(..., return_adv=True)``): evaluated as they are, not attacked again.

    x (N, C, H, W) in [0, 1], y (N,). Metrics: twin/integer clean and robust accuracy,
    ``clean_disagreement`` and ``adv_disagreement`` (fraction of clean / attacked points whose
    twin and integer predictions differ), ``transfer_rate`` (among points the integer model
    classifies correctly and whose twin adversarial example fools the twin, the fraction that
    also fools the integer model), the attack description and ``warnings``."""
    if integer is None:
        from qrobust.integer import to_integer

        integer = to_integer(twin, backend)
    twin_clean, int_clean = predict(twin, x, batch_size), predict(integer, x, batch_size)
    twin_ok, int_ok = twin_clean == y, int_clean == y
    idx = twin_ok.nonzero().squeeze(1)
    if x_adv is None:
        x_adv, gstats = _attack_points(attack, x, y, idx, batch_size, generator, progress)
    else:
        gstats = {}
    twin_adv, int_adv = predict(twin, x_adv, batch_size), predict(integer, x_adv, batch_size)
    fooled_twin = twin_ok & (twin_adv != y)
    eligible = fooled_twin & int_ok
    n, n_att = len(y), max(len(idx), 1)
    metrics: dict = {
        "n": n,
        "twin_clean_acc": float(twin_ok.float().mean()),
        "integer_clean_acc": float(int_ok.float().mean()),
        "twin_robust_acc": float((twin_adv == y).float().mean()),
        "integer_robust_acc": float((int_adv == y).float().mean()),
        "clean_disagreement": float((twin_clean != int_clean).float().mean()),
        "adv_disagreement": float((twin_adv[idx] != int_adv[idx]).float().sum()) / n_att,
        "transfer_rate": (float((eligible & (int_adv != y)).sum()) / int(eligible.sum())
                          if bool(eligible.any()) else None),
        "n_transfer_eligible": int(eligible.sum()),
        **attack.describe(), **gstats,
        "deployment": integer.deployment() if hasattr(integer, "deployment") else None,
    }
    warnings = []
    if metrics["adv_disagreement"] > DISAGREEMENT_THRESHOLD:
        warnings.append(f"twin and integer model disagree on {metrics['adv_disagreement']:.1%} "
                        "of the adversarial examples: the twin's robustness is not the deployed "
                        "model's; also run the square attack on the integer model")
    metrics["warnings"] = warnings
    return metrics


def attack_integer_model(integer: Any, threat: ThreatModel, x: torch.Tensor, y: torch.Tensor, *,
                         queries: int = 1000, batch_size: int = 256,
                         generator: torch.Generator | None = None, progress: bool | None = None) -> dict:
    """The square attack (scores only) straight on the integer model; ``evaluate_robustness``
    metrics with the randomness check."""
    from qrobust.attacks.gradients import Autograd
    from qrobust.attacks.square import Square

    square = Square(integer, threat, steps=queries, estimator=Autograd())
    return evaluate_robustness(integer, square, x, y, batch_size=batch_size, generator=generator,
                               checks=("randomness",), progress=progress)
