"""The robustness unit of work: one attack at one eps against one (defended) model and, where
there is one, its integer deployment. ``qrobust attack``, every study cell (local or Ray) and
the benchmarks call :func:`robustness_cell`; nothing else computes these metrics.

Metrics (accuracies in [0, 1] over ``n`` test points), from
:func:`qrobust.attacks.evaluate_robustness` and :func:`qrobust.attacks.transfer.transfer_metrics`:

* ``clean_acc`` / ``robust_acc``: the model on x / on x_adv (only clean-correct points are
  attacked); ``robust_acc_worst`` after the follow-up attacks of the checks (temperature,
  black-box); ``attack_success_rate``; ``mean_linf`` / ``mean_l2`` of the successful
  perturbations; the attack's description (``estimator``, ...) and gradient statistics;
* with an integer model: ``clean_acc_int`` / ``robust_acc_int`` (the integer model on x / on
  the model's x_adv: a transfer attack on the deployed model), ``transfer_rate``,
  ``clean_disagreement`` / ``adv_disagreement``; with the ``blackbox`` check and an Linf
  threat, ``robust_acc_int_square``: the score-based square attack run on the integer model
  itself, which needs no gradient;
* ``rng_seed``: the seed of the cell's one generator (attack draws and the defenses' own
  generators), so that the command can repeat a study cell exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from qrobust.attacks import ThreatModel, make_attack
from qrobust.attacks.evaluate import DEFAULT_CHECKS, evaluate_robustness, predict
from qrobust.attacks.transfer import DISAGREEMENT_THRESHOLD, attack_integer_model, transfer_metrics
from qrobust.defenses import apply_defense, reseed


def defended_pair(model: Any, integer: Any | None, defenses: list[tuple[str, dict]]
                  ) -> tuple[Any, Any | None, str | None]:
    """``defenses`` (name, params) applied in order around ``model`` and around its integer
    model: both views are attacked behind the same defenses. A defense that cannot wrap the
    integer model leaves it out, with the reason (recorded with the results)."""
    for name, params in defenses:
        model = apply_defense(model, name, params)
    note = None
    try:
        for name, params in defenses:
            integer = None if integer is None else apply_defense(integer, name, params)
    except Exception as err:  # noqa: BLE001 - recorded, the model is still evaluated
        integer = None
        note = f"defense '{name}' cannot wrap the integer model ({type(err).__name__}: {err})"
    for view in (model, integer):
        if isinstance(view, torch.nn.Module):
            view.eval()  # batch norm and friends in inference mode; MC dropout stays random
    return model, integer, note


@dataclass(frozen=True)
class RobustnessSpec:
    """What to run: attack (a name of ``qrobust.attacks.ATTACKS``) and its config-holdable
    ``params`` (``estimator`` by name, ``eot_samples``, steps, ...), the threat model, the masking
    checks, the square attack's queries on the integer model, the batch size."""

    attack: str = "standard"
    norm: str = "linf"
    eps: float = 8 / 255
    params: Mapping[str, Any] = field(default_factory=dict)
    checks: tuple[str, ...] = DEFAULT_CHECKS
    integer_queries: int = 1000
    batch_size: int = 256


@dataclass
class RobustnessResult:
    metrics: dict
    warnings: list[str]
    x_adv: torch.Tensor


def robustness_cell(model: Any, x: torch.Tensor, y: torch.Tensor, spec: RobustnessSpec,
                    seed: int, *, integer: Any | None = None,
                    clean_pred: torch.Tensor | None = None,
                    clean_pred_int: torch.Tensor | None = None,
                    progress: bool | None = None) -> RobustnessResult:
    """Attack ``model`` (the defended twin or float model, images (N, C, H, W) in [0, 1] ->
    logits) on x, y and replay its adversarial examples on ``integer`` (the same defense around
    the integer model, or None). One generator seeded by ``seed`` drives the attack and, via
    :func:`qrobust.defenses.reseed`, every randomized defense: the result depends on nothing
    else. ``clean_pred`` / ``clean_pred_int``: predictions on x already made (shared by the
    cells of a study that attack the same model)."""
    reseed(model, seed)
    reseed(integer, seed)
    generator = torch.Generator().manual_seed(seed)
    bs = spec.batch_size
    attack = make_attack(spec.attack, model, ThreatModel(spec.norm, spec.eps), spec.params)
    m = evaluate_robustness(model, attack, x, y, batch_size=bs, generator=generator,
                            checks=spec.checks, return_adv=True, progress=progress,
                            clean_pred=clean_pred)
    x_adv, twin_clean, pred_adv = m.pop("x_adv"), m.pop("clean_pred"), m.pop("pred_adv")
    warnings = m.pop("warnings")
    metrics: dict = {**m, "rng_seed": seed, "clean_acc_int": None, "robust_acc_int": None,
                     "transfer_rate": None, "clean_disagreement": None,
                     "adv_disagreement": None, "robust_acc_int_square": None}
    if integer is not None:
        int_clean = predict(integer, x, bs) if clean_pred_int is None else clean_pred_int
        attacked = (twin_clean == y) & (spec.eps > 0)
        t = transfer_metrics(y, twin_clean, pred_adv, int_clean, predict(integer, x_adv, bs),
                             attacked)
        metrics.update({"clean_acc_int": t["integer_clean_acc"],
                        "robust_acc_int": t["integer_robust_acc"],
                        **{k: t[k] for k in ("transfer_rate", "clean_disagreement",
                                             "adv_disagreement")}})
        if (t["adv_disagreement"] or 0.0) > DISAGREEMENT_THRESHOLD:
            warnings.append(f"twin and integer model disagree on {t['adv_disagreement']:.1%} of "
                            "the adversarial examples: the twin's robustness is not the "
                            "deployed model's")
        if "blackbox" in spec.checks and spec.norm == "linf" and spec.eps > 0:
            square = attack_integer_model(integer, ThreatModel("linf", spec.eps), x, y,
                                          queries=spec.integer_queries, batch_size=bs,
                                          generator=generator, progress=progress)
            metrics["robust_acc_int_square"] = square["robust_acc"]
    return RobustnessResult(metrics, warnings, x_adv)
