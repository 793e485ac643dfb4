"""Square Attack, linf (Andriushchenko et al., arXiv 1912.00049): a score-based black-box
attack that needs only the model's logits, never gradients, so it also runs on the integer
model.

Start: vertical stripes x + eps * (+-1 per column and channel). Each iteration picks a random
s x s window per image and sets the perturbation inside it to +-eps per channel; the proposal
is kept if it increases the margin loss. The window side s = round(sqrt(p * H * W)) follows
the paper's schedule: p = p_init halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000,
8000 (rescaled to ``steps`` queries as if steps were 10000).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qrobust.attacks.base import ATTACKS, Attack, State, ThreatModel, randint
from qrobust.attacks.point import Evaluation
from qrobust.errors import ConfigError

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init: float, t: int, steps: int) -> float:
    """The fraction p of pixels the window covers at iteration t of ``steps``."""
    it = int(t / steps * 10000) if steps > 0 else t
    return p_init / 2 ** sum(it > h for h in _HALVINGS)


@ATTACKS.register("square")
class Square(Attack):
    name = "square"
    uses_gradient = False
    default_loss = "margin"

    def __init__(self, model: Any, threat: ThreatModel, *, p_init: float = 0.8,
                 **kwargs: Any) -> None:
        kwargs.setdefault("steps", 1000)
        super().__init__(model, threat, **kwargs)
        if threat.norm != "linf":
            raise ConfigError("the Square attack is implemented for the linf norm only; "
                              "use norm='linf' or a gradient attack for l2")
        if not 0 < p_init <= 1:
            raise ConfigError(f"p_init must be in (0, 1], got {p_init}")
        self.p_init = p_init

    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> State:
        b, c, _, w = x.shape
        signs = randint(0, 2, (b, c, 1, w), generator, x.device).to(x.dtype)
        x0 = self.threat.project(x + self.threat.eps * (2 * signs - 1), x)
        return {"x_adv": x0, "x_best": x0.clone(),
                "loss_best": torch.full((b,), -math.inf, device=x.device)}

    def step(self, state: State, ev: Evaluation, t: int,
             generator: torch.Generator | None) -> State:
        s = dict(state)
        better = ev.loss > s["loss_best"]
        s["x_best"] = torch.where(better.view(-1, 1, 1, 1), s["x_adv"], s["x_best"])
        s["loss_best"] = torch.where(better, ev.loss, s["loss_best"])
        x, best = s["x"], s["x_best"]
        b, c, h, w = x.shape
        p = square_fraction(self.p_init, t, self.steps)
        side = max(1, min(h, w, round(math.sqrt(p * h * w))))
        rows = randint(0, h - side + 1, (b,), generator, x.device)
        cols = randint(0, w - side + 1, (b,), generator, x.device)
        r, q = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        in_r = (r.view(1, h) >= rows.view(b, 1)) & (r.view(1, h) < rows.view(b, 1) + side)
        in_c = (q.view(1, w) >= cols.view(b, 1)) & (q.view(1, w) < cols.view(b, 1) + side)
        window = (in_r.view(b, 1, h, 1) & in_c.view(b, 1, 1, w))
        signs = randint(0, 2, (b, c, 1, 1), generator, x.device).to(x.dtype)
        proposal = torch.where(window, x + self.threat.eps * (2 * signs - 1), best)
        s["x_adv"] = self.threat.project(proposal, x)
        return s
