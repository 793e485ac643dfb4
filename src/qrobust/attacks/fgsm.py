"""FGSM (Goodfellow et al., arXiv 1412.6572), optionally from a random start
(Wong et al., "Fast is better than free", arXiv 2001.03994): one ascent step of size
``step_size`` (default eps; 1.25 eps with a random start) from x or a uniform point of the ball."""

from __future__ import annotations

from typing import Any

import torch

from qrobust.attacks.base import ATTACKS, Attack, Evaluation, State, ThreatModel


@ATTACKS.register("fgsm")
class FGSM(Attack):
    name = "fgsm"

    def __init__(self, model: Any, threat: ThreatModel, *, random_start: bool = False,
                 step_size: float | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("steps", 1)
        super().__init__(model, threat, **kwargs)
        self.random_start = random_start
        default = 1.25 * threat.eps if random_start else threat.eps
        self.step_size = float(step_size) if step_size is not None else default

    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> State:
        x0 = self.threat.random_start(x, generator) if self.random_start else x.clone()
        return {"x_adv": x0}

    def step(self, state: State, ev: Evaluation, t: int,
             generator: torch.Generator | None) -> State:
        assert ev.grad is not None
        moved = self.threat.ascent(state["x_adv"], ev.grad, self.step_size)
        return {**state, "x_adv": self.threat.project(moved, state["x"])}
