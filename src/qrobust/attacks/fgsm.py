"""FGSM (Goodfellow et al., arXiv 1412.6572), optionally from a random start
(Wong et al., "Fast is better than free", arXiv 2001.03994): one ascent step of size
``alpha`` (default eps; 1.25 eps with a random start) from x or a uniform point of the ball.

It is PGD with one constant step, so it reuses PGD's ``init`` and ``step``."""

from __future__ import annotations

from typing import Any

from qrobust.attacks.base import ATTACKS, ThreatModel
from qrobust.attacks.pgd import PGD


@ATTACKS.register("fgsm")
class FGSM(PGD):
    name = "fgsm"

    def __init__(self, model: Any, threat: ThreatModel, *, random_start: bool = False,
                 alpha: float | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("steps", 1)
        default = 1.25 * threat.eps if random_start else threat.eps
        super().__init__(model, threat, alpha=alpha if alpha is not None else default,
                         random_start=random_start, schedule="constant", **kwargs)
