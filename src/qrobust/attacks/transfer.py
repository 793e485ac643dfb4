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


def _share(mask: torch.Tensor) -> float | None:
    return float(mask.float().mean()) if mask.numel() else None


def transfer_metrics(y: torch.Tensor, twin_clean: torch.Tensor, twin_adv: torch.Tensor,
                     int_clean: torch.Tensor, int_adv: torch.Tensor,
                     attacked: torch.Tensor) -> dict:
    """The one definition of how a twin's adversarial examples fare on the integer model, from
    predictions (N,) on the clean and adversarial inputs and the (N,) mask of attacked points:

    * ``integer_clean_acc``, ``integer_robust_acc``: the integer model on x / on x_adv;
    * ``clean_disagreement``: share of all points whose twin and integer predictions differ;
    * ``adv_disagreement``: the same on the attacked points' x_adv (None if none was attacked);
    * ``transfer_rate``: of the points the integer model gets right and whose x_adv fools the
      twin, the share whose x_adv also fools the integer model (None if there are none);
      ``n_transfer_eligible``: how many such points."""
    eligible = (twin_clean == y) & (twin_adv != y) & (int_clean == y)
    return {"integer_clean_acc": _share(int_clean == y),
            "integer_robust_acc": _share(int_adv == y),
            "clean_disagreement": _share(twin_clean != int_clean),
            "adv_disagreement": _share(twin_adv[attacked] != int_adv[attacked]),
            "transfer_rate": _share(int_adv[eligible] != y[eligible]),
            "n_transfer_eligible": int(eligible.sum())}


def transfer_to_integer(twin: Any, attack: Attack, x: torch.Tensor, y: torch.Tensor, *,
                        integer: Any | None = None, backend: str = "reference",
                        batch_size: int = 256, generator: torch.Generator | None = None,
                        progress: bool | None = None, x_adv: torch.Tensor | None = None) -> dict:
    """Attack ``twin`` on the points it classifies correctly and evaluate the adversarial
    examples on the integer model (built with ``to_integer(twin, backend)`` if not given).
    ``x_adv``: adversarial examples ``attack`` already made for ``twin`` on x (e.g.
    ``evaluate_robustness(..., return_adv=True)``): evaluated as they are, not attacked again.

    x (N, C, H, W) in [0, 1], y (N,). Metrics: twin clean and robust accuracy, those of
    :func:`transfer_metrics` (the attacked points are those the twin gets right), the attack
    description and ``warnings``."""
    if integer is None:
        from qrobust.integer import to_integer

        integer = to_integer(twin, backend)
    twin_clean, int_clean = predict(twin, x, batch_size), predict(integer, x, batch_size)
    twin_ok = twin_clean == y
    idx = twin_ok.nonzero().squeeze(1)
    if x_adv is None:
        x_adv, gstats = _attack_points(attack, x, y, idx, batch_size, generator, progress)
    else:
        gstats = {}
    twin_adv, int_adv = predict(twin, x_adv, batch_size), predict(integer, x_adv, batch_size)
    metrics: dict = {
        "n": len(y),
        "twin_clean_acc": float(twin_ok.float().mean()),
        "twin_robust_acc": float((twin_adv == y).float().mean()),
        **transfer_metrics(y, twin_clean, twin_adv, int_clean, int_adv, twin_ok),
        **attack.describe(), **gstats,
        "deployment": integer.deployment() if hasattr(integer, "deployment") else None,
    }
    warnings = []
    if (metrics["adv_disagreement"] or 0.0) > DISAGREEMENT_THRESHOLD:
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


@torch.no_grad()
def replay_on_runtime(twin: Any, file_model: Any, x: torch.Tensor, y: torch.Tensor,
                      x_adv: torch.Tensor, batch_size: int = 256) -> dict:
    """Adversarial examples found on the twin, replayed on the original file's runtime.

    ``clean_acc_runtime`` / ``robust_acc_runtime``: the runtime on x / on x_adv;
    ``n_fool_twin``: points the twin got right whose x_adv fools it; ``n_fool_runtime``: of
    those, how many still fool the runtime; ``transfer_rate_runtime`` (of those the runtime
    got right, the share fooled: :func:`qrobust.attacks.transfer.transfer_metrics`)."""
    twin_clean, twin_adv = predict(twin, x, batch_size), predict(twin, x_adv, batch_size)
    rt_clean, rt_adv = predict(file_model, x, batch_size), predict(file_model, x_adv, batch_size)
    attacked = twin_clean == y
    t = transfer_metrics(y, twin_clean, twin_adv, rt_clean, rt_adv, attacked)
    fooled = attacked & (twin_adv != y)
    return {"clean_acc_runtime": t["integer_clean_acc"],
            "robust_acc_runtime": t["integer_robust_acc"],
            "transfer_rate_runtime": t["transfer_rate"],
            "n_fool_twin": int(fooled.sum()), "n_fool_runtime": int((fooled & (rt_adv != y)).sum())}
