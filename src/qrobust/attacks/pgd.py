"""PGD (Madry et al., arXiv 1706.06083): projected steepest ascent from a random point of the
ball, with restarts and a step-size schedule.

Step size ``alpha`` (default 2.5 eps / steps, Madry et al.) times the schedule factor at
iteration t of T: "constant" 1, "linear" 1 - t/T, "cosine" (1 + cos(pi t / T)) / 2, or
"step" halving at 50% and 75% of the steps."""

from __future__ import annotations

import math
from typing import Any

import torch

from qrobust.attacks.base import ATTACKS, Attack, State, ThreatModel
from qrobust.attacks.point import Evaluation
from qrobust.errors import ConfigError

SCHEDULES = {
    "constant": lambda t, n: 1.0,
    "linear": lambda t, n: 1.0 - t / n,
    "cosine": lambda t, n: 0.5 * (1.0 + math.cos(math.pi * t / n)),
    "step": lambda t, n: 0.5 ** ((t >= 0.5 * n) + (t >= 0.75 * n)),
}


@ATTACKS.register("pgd")
class PGD(Attack):
    name = "pgd"

    def __init__(self, model: Any, threat: ThreatModel, *, alpha: float | None = None,
                 random_start: bool = True, schedule: str = "constant", **kwargs: Any) -> None:
        super().__init__(model, threat, **kwargs)
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown step schedule '{schedule}'; valid: {', '.join(SCHEDULES)}")
        self.alpha = float(alpha) if alpha is not None else 2.5 * threat.eps / self.steps
        self.random_start = random_start
        self.schedule = schedule

    def describe(self) -> dict:
        return {**super().describe(), "alpha": self.alpha, "schedule": self.schedule,
                "random_start": self.random_start}

    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> State:
        x0 = self.threat.random_start(x, generator) if self.random_start else x.clone()
        return {"x_adv": x0}

    def step(self, state: State, ev: Evaluation, t: int,
             generator: torch.Generator | None) -> State:
        assert ev.grad is not None
        size = self.alpha * SCHEDULES[self.schedule](t, self.steps)
        moved = self.threat.ascent(state["x_adv"], ev.grad, size)
        return {**state, "x_adv": self.threat.project(moved, state["x"])}
