"""Robustness evaluation: clean accuracy, robust accuracy, and masking checks attached.

As in AutoAttack (Croce & Hein, arXiv 2003.01690) the attack runs only on points the model
classifies correctly, follow-up attacks run only on points still robust, and the adversarial
examples are re-evaluated by the model (an independent forward pass: for randomized models this
is the honest measurement). The estimator (autograd / EOT / BPDA / temperature) was chosen by
the attack from the model's Defense attributes and is recorded in the metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from qrobust.attacks import checks as chk
from qrobust.attacks.base import Attack
from qrobust.attacks.gradients import Temperature
from qrobust.progress import bar as progress_bar

DEFAULT_CHECKS = ("gradients", "randomness", "blackbox", "temperature")
Model = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict(model: Model, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels (N,) for images x (N, ...), in batches, without gradients."""
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([model(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])


def _attack_points(attack: Attack, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                   batch_size: int, generator: torch.Generator | None,
                   progress: bool | None) -> tuple[torch.Tensor, dict]:
    """Adversarial examples for the points ``idx`` (others unchanged) and summed grad stats."""
    x_adv = x.clone()
    evals = zeros = smalls = 0.0
    broken: dict[str, int] = {}
    chunks = list(idx.split(batch_size))
    for part in progress_bar(chunks, desc=attack.name, unit="batch", progress=progress):
        res = attack.run(x[part], y[part], generator)
        x_adv[part] = res.x_adv
        for stage, k in res.stats.get("stage_broken", {}).items():
            broken[stage] = broken.get(stage, 0) + k
        n = res.stats["grad_evals"]
        if n:
            evals += n
            zeros += res.stats["zero_grad_fraction"] * n
            smalls += res.stats["small_grad_fraction"] * n
    stats = {"grad_evals": int(evals),
             "zero_grad_fraction": zeros / evals if evals else None,
             "small_grad_fraction": smalls / evals if evals else None}
    if broken:  # a suite: points each stage broke (each stage ran on the points still robust)
        stats["stage_broken"] = broken
    return x_adv, stats


def evaluate_robustness(model: Model, attack: Attack, x: torch.Tensor, y: torch.Tensor, *,
                        batch_size: int = 256, generator: torch.Generator | None = None,
                        checks: Sequence[str] = DEFAULT_CHECKS, blackbox_queries: int = 300,
                        return_adv: bool = False, progress: bool | None = None,
                        clean_pred: torch.Tensor | None = None) -> dict:
    """Metrics of ``attack`` against ``model`` on x (N, C, H, W) in [0, 1], y (N,).

    Returns a dict: n, clean_acc, robust_acc (attack only), robust_acc_worst (after the
    follow-up attacks of the checks), attack_success_rate (among clean-correct points),
    mean_linf / mean_l2 (perturbation norms of the successful adversarial examples), the
    attack's description (attack, norm, eps, steps, estimator, ...), gradient statistics,
    ``warnings`` (list of strings from ``qrobust.attacks.checks``) and, with ``return_adv``,
    ``x_adv`` (N, C, H, W), ``clean_pred`` (N,): the model's prediction on x that decided
    which points were attacked, and ``pred_adv`` (N,): its prediction on x_adv for the
    attacked points, its clean prediction elsewhere. ``checks`` is any subset of gradients,
    randomness, blackbox, temperature; blackbox and temperature re-attack the points still
    robust (extra cost). ``clean_pred``: the model's predictions on x, if already made (a
    randomized model's clean draw is then shared by every attack on it). At eps 0 nothing is
    attacked: robust accuracy is a fresh prediction on x.
    """
    unknown = set(checks) - set(DEFAULT_CHECKS)
    if unknown:
        from qrobust.errors import ConfigError

        raise ConfigError(f"unknown checks {sorted(unknown)}; valid: {', '.join(DEFAULT_CHECKS)}")
    n = len(y)
    clean = predict(model, x, batch_size) if clean_pred is None else clean_pred
    pred, correct = clean.clone(), clean == y
    idx = correct.nonzero().squeeze(1)
    if attack.threat.eps == 0:  # the identity attack: every check would only repeat it
        x_adv, checks = x.clone(), ()
        gstats = {"grad_evals": 0, "zero_grad_fraction": None, "small_grad_fraction": None}
    else:
        x_adv, gstats = _attack_points(attack, x, y, idx, batch_size, generator, progress)
    pred[idx] = predict(model, x_adv[idx], batch_size)
    robust = correct & (pred == y)
    fooled = correct & ~robust
    n_correct, n_robust = int(correct.sum()), int(robust.sum())
    delta = (x_adv - x).flatten(1)[fooled]
    metrics: dict = {"n": n, "clean_acc": n_correct / n, "robust_acc": n_robust / n,
                     "attack_success_rate": 1 - n_robust / n_correct if n_correct else None,
                     "mean_linf": float(delta.abs().amax(1).mean()) if len(delta) else None,
                     "mean_l2": float(delta.norm(dim=1).mean()) if len(delta) else None,
                     **attack.describe(), **gstats}
    warnings: list[str] = chk.outside_threat_model(
        metrics["mean_linf"] if attack.threat.norm == "linf" else metrics["mean_l2"],
        attack.threat.norm, attack.threat.eps)
    if "gradients" in checks:
        warnings += chk.vanishing_gradients(gstats["zero_grad_fraction"],
                                            gstats["small_grad_fraction"])
    if "randomness" in checks:
        is_random = chk.output_is_random(model, x[: min(n, 64)])
        metrics["model_randomized"] = is_random
        warnings += chk.randomness_under_deterministic_attack(is_random, metrics["estimator"])
    worst = robust.clone()
    checks = [c for c in checks if c not in getattr(attack, "includes_checks", ())]
    if "temperature" in checks and attack.uses_gradient and bool(worst.any()):
        t_attack = attack.with_estimator(Temperature("hessian", base=attack.estimator))
        still = worst.nonzero().squeeze(1)
        t_adv, _ = _attack_points(t_attack, x, y, still, batch_size, generator, progress)
        broken = predict(model, t_adv[still], batch_size) != y[still]
        worst[still[broken]] = False
        metrics["robust_acc_temperature"] = int(worst.sum()) / n
        warnings += chk.temperature_much_stronger(metrics["robust_acc"],
                                                  metrics["robust_acc_temperature"])
    if "blackbox" in checks and attack.threat.norm == "linf" and bool(worst.any()):
        from qrobust.attacks.square import Square

        square = Square(model, attack.threat, steps=blackbox_queries, estimator=attack.estimator)
        still = worst.nonzero().squeeze(1)
        s_adv, _ = _attack_points(square, x, y, still, batch_size, generator, progress)
        broken = predict(model, s_adv[still], batch_size) != y[still]
        worst[still[broken]] = False
        metrics["blackbox_broken"] = int(broken.sum())
        warnings += chk.blackbox_beats_whitebox(int(broken.sum()), len(still))
    metrics["robust_acc_worst"] = int(worst.sum()) / n
    metrics["warnings"] = warnings
    if return_adv:
        metrics["x_adv"], metrics["clean_pred"], metrics["pred_adv"] = x_adv, clean, pred
    return metrics


def robustness_curve(model: Model, make_attack: Callable[[float], Attack],
                     eps: Sequence[float], x: torch.Tensor, y: torch.Tensor,
                     **kwargs) -> dict:
    """``evaluate_robustness`` at every eps (``make_attack(eps) -> Attack``); the result holds
    ``points`` (one metrics dict per eps) and ``warnings``, including accuracy rising with
    eps (on ``robust_acc_worst``)."""
    points = [evaluate_robustness(model, make_attack(e), x, y, **kwargs) for e in eps]
    warnings = chk.accuracy_rises_with_eps(list(eps), [p["robust_acc_worst"] for p in points])
    for p in points:
        warnings += [w for w in p["warnings"] if w not in warnings]
    return {"points": points, "warnings": warnings}
