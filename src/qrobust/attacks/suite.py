"""Worst-case attack suites, run as one attack: ``standard`` (the default everywhere) and ``fast``.

``standard`` follows AutoAttack's standard version (Croce & Hein, arXiv 2003.01690), at its
budgets unless ``budget_scale`` says otherwise, each stage on the points the earlier ones left
robust, a point robust only if every stage failed on it:

1. ``apgd-ce``: APGD on the cross-entropy, 100 iterations, 1 restart;
2. ``apgd-t``: targeted APGD on the DLR loss, 100 iterations, against each of the 9 classes
   the model scores highest after the true one (AutoAttack's APGD-T);
3. ``apgd-ce+temperature`` (quantized twins, or when the first stage's gradients vanish):
   APGD-CE through the Hessian logit temperature (Gupta & Ajanthan, arXiv 2003.13511), the
   adaptive estimator for gradients masked by rounding;
4. ``square``: the Square attack, 5000 queries (linf; scores only, so gradient masking does not
   stop it).

AutoAttack's FAB-T is not run. Every gradient stage uses the estimator the model needs
(``auto_estimator``: EOT for randomized models, BPDA around non-differentiable defenses); for a
randomized model a point counts as broken only when every EOT draw is fooled, and the caller's
independent re-evaluation decides. ``fast`` is a single PGD-10 (qrobust's former default),
labelled as such in every result.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from qrobust.attacks.apgd import APGD
from qrobust.attacks.base import ATTACKS, Attack, AttackResult, ThreatModel
from qrobust.attacks.checks import vanishing_gradients
from qrobust.attacks.gradients import Temperature, auto_estimator
from qrobust.attacks.pgd import PGD
from qrobust.attacks.square import Square
from qrobust.defenses.base import is_randomized
from qrobust.errors import ConfigError
from qrobust.quant.modules import QuantAct, QuantConv2d, QuantLinear


@dataclass(frozen=True)
class Budget:
    """Iterations of each APGD stage, target classes of APGD-T, Square queries, restarts."""

    steps: int = 100
    targets: int = 9
    queries: int = 5000
    restarts: int = 1

    def scaled(self, factor: float) -> Budget:
        if not 0 < factor <= 1:
            raise ConfigError(f"budget_scale must be in (0, 1], got {factor}")
        return replace(self, steps=max(1, math.ceil(self.steps * factor)),
                       queries=max(1, math.ceil(self.queries * factor)))


STANDARD = Budget()


def is_quantized(model: Any) -> bool:
    """True when ``model`` holds fake-quant layers (a twin, maybe behind defenses)."""
    return isinstance(model, nn.Module) and any(
        isinstance(m, (QuantAct, QuantConv2d, QuantLinear)) for m in model.modules())


class Suite(Attack):
    """Attacks run in order on a batch, each on the points still robust; subclasses list them
    in ``stages``. ``budget_scale`` (explicit) shrinks iterations and queries."""

    suite = "suite"
    includes_checks: tuple[str, ...] = ()  # evaluate_robustness checks the suite already runs

    def __init__(self, model: Any, threat: ThreatModel, *, budget_scale: float = 1.0,
                 estimator: object | None = None, restarts: int = 1, loss: str | None = None,
                 targeted: bool = False, steps: int | None = None, **kwargs: Any) -> None:
        if loss is not None or targeted:
            raise ConfigError(f"the {self.suite} suite fixes its losses and targets; drop "
                              "loss/targeted (or attack with a single algorithm)")
        budget = STANDARD.scaled(budget_scale) if budget_scale != 1.0 else STANDARD
        self.budget = replace(budget, restarts=restarts, steps=steps or budget.steps)
        estimator = estimator if estimator is not None else auto_estimator(model)
        super().__init__(model, threat, steps=self.budget.steps, restarts=restarts,
                         estimator=estimator, **kwargs)
        self.budget_scale = budget_scale

    def stages(self, num_classes: int) -> list[tuple[str, Attack, int | None]]:
        """(label, attack, target rank or None): rank r attacks the r-th highest other class."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"attack": self.name, "suite": self.suite, **self.threat.to_dict(),
                "budget": asdict(self.budget), "budget_scale": self.budget_scale,
                "steps": self.budget.steps, "restarts": self.budget.restarts,
                "loss": "per stage", "targeted": False,
                "estimator": getattr(self.estimator, "name", type(self.estimator).__name__)}

    def run(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
            target: torch.Tensor | None = None) -> AttackResult:
        x, y = x.detach(), y.detach()
        with torch.no_grad():
            order = self.model(x).argsort(dim=1, descending=True)  # for APGD-T's targets
        b = x.shape[0]
        x_adv, success = x.clone(), torch.zeros(b, dtype=torch.bool, device=x.device)
        loss = torch.full((b,), -math.inf, device=x.device)
        broken: dict[str, int] = {}
        grads = zeros = smalls = 0.0
        masked, randomized = False, is_randomized(self.model)
        for label, attack, rank in self.stages(order.shape[1]):
            if label.endswith("+temperature") and not (masked or is_quantized(self.model)):
                continue
            idx = (~success).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            tgt = None if rank is None else order[idx, rank]
            res = attack.run(x[idx], y[idx], generator, target=tgt)
            if randomized:  # broken only if every draw was fooled (the attack's own verdict)
                won = res.success
            else:  # misclassified, whichever class a targeted stage reached
                with torch.no_grad():
                    won = self.model(res.x_adv).argmax(1) != y[idx]
            first = loss[idx] == -math.inf  # keep the first stage's point where nothing wins
            keep = won | first
            x_adv[idx[keep]] = res.x_adv[keep]
            loss[idx[keep]] = res.loss[keep]
            success[idx[won]] = True
            broken[label] = broken.get(label, 0) + int(won.sum())
            n = res.stats.get("grad_evals") or 0
            if n:
                grads += n
                zeros += res.stats["zero_grad_fraction"] * n
                smalls += res.stats["small_grad_fraction"] * n
                masked = masked or bool(vanishing_gradients(res.stats["zero_grad_fraction"],
                                                            res.stats["small_grad_fraction"]))
        stats = {"grad_evals": int(grads), "zero_grad_fraction": zeros / grads if grads else None,
                 "small_grad_fraction": smalls / grads if grads else None,
                 "stage_broken": broken}
        return AttackResult(x_adv, success, loss, stats)


@ATTACKS.register("standard")
class Standard(Suite):
    name = suite = "standard"
    includes_checks = ("blackbox", "temperature")

    def stages(self, num_classes: int) -> list[tuple[str, Attack, int | None]]:
        bud, est, threat, m = self.budget, self.estimator, self.threat, self.model
        common = {"steps": bud.steps, "restarts": bud.restarts, "estimator": est}
        out: list[tuple[str, Attack, int | None]] = [("apgd-ce", APGD(m, threat, **common), None)]
        if num_classes >= 4:  # the targeted DLR loss needs 4 classes
            targeted = APGD(m, threat, loss="dlr", targeted=True, **common)
            out += [(f"apgd-t{r}", targeted, r) for r in range(1, min(bud.targets, num_classes - 1) + 1)]
        out.append(("apgd-ce+temperature",
                    APGD(m, threat, **{**common, "estimator": Temperature("hessian", base=est)}),
                    None))
        if threat.norm == "linf":
            out.append(("square", Square(m, threat, steps=bud.queries, restarts=bud.restarts,
                                         estimator=est), None))
        return out


@ATTACKS.register("fast")
class Fast(Suite):
    """PGD-10, one restart: quick, and an upper bound that a stronger attack may lower."""

    name = suite = "fast"

    def __init__(self, model: Any, threat: ThreatModel, **kwargs: Any) -> None:
        kwargs.setdefault("steps", 10)
        super().__init__(model, threat, **kwargs)

    def stages(self, num_classes: int) -> list[tuple[str, Attack, int | None]]:
        return [("pgd", PGD(self.model, self.threat, steps=self.budget.steps,
                            restarts=self.budget.restarts, estimator=self.estimator), None)]
