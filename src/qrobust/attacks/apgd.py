"""Auto-PGD (Croce & Hein, arXiv 2003.01690): PGD with momentum 0.75 and a step size that
starts at 2 eps and halves at checkpoints when progress stalls, restarting from the best point.

Checkpoints at iterations ceil(p_j * steps) with p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06). At a checkpoint the step size of a sample is
halved if (1) the loss increased in fewer than rho = 0.75 of the iterations since the previous
checkpoint, or (2) the step size was not halved at the previous checkpoint and the best loss
has not improved since. ``apgd`` uses the CE loss, ``apgd-dlr`` the DLR loss (any loss works).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qrobust.attacks.base import ATTACKS, Attack, State, ThreatModel, _per_sample
from qrobust.attacks.point import Evaluation


def checkpoints(steps: int) -> list[int]:
    """Iterations (0 < w < steps) at which APGD may halve its step size."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    ws = sorted({math.ceil(pj * steps - 1e-9) for pj in p[1:]})
    return [w for w in ws if 0 < w < steps]


@ATTACKS.register("apgd")
class APGD(Attack):
    name = "apgd"
    rho = 0.75
    momentum = 0.75

    def __init__(self, model: Any, threat: ThreatModel, *, random_start: bool = True,
                 **kwargs: Any) -> None:
        kwargs.setdefault("steps", 100)
        super().__init__(model, threat, **kwargs)
        self.random_start = random_start
        self.checkpoints = checkpoints(self.steps)

    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> State:
        x0 = self.threat.random_start(x, generator) if self.random_start else x.clone()
        b = x.shape[0]
        zeros = torch.zeros(b, device=x.device)
        return {"x_adv": x0, "x_prev": x0.clone(), "x_max": x0.clone(),
                "g_max": torch.zeros_like(x0), "loss_max": zeros - math.inf,
                "loss_prev": zeros - math.inf, "loss_max_ck": zeros - math.inf,
                "eta": zeros + 2 * self.threat.eps, "count": zeros.clone(),
                "reduced": torch.zeros(b, dtype=torch.bool, device=x.device)}

    def step(self, state: State, ev: Evaluation, t: int,
             generator: torch.Generator | None) -> State:
        assert ev.grad is not None
        s = dict(state)
        x_cur, g = s["x_adv"], ev.grad
        if t > 0:
            s["count"] = s["count"] + (ev.loss > s["loss_prev"]).float()
        improved = ev.loss > s["loss_max"]
        m = _per_sample(improved, x_cur)
        s["x_max"] = torch.where(m, x_cur, s["x_max"])
        s["g_max"] = torch.where(m, g, s["g_max"])
        s["loss_max"] = torch.where(improved, ev.loss, s["loss_max"])
        s["loss_prev"] = ev.loss
        if t in self.checkpoints:
            i = self.checkpoints.index(t)
            interval = t - (self.checkpoints[i - 1] if i > 0 else 0)
            cond1 = s["count"] < self.rho * interval
            cond2 = (~s["reduced"]) & (s["loss_max_ck"] >= s["loss_max"])
            reduce = cond1 | cond2
            r = _per_sample(reduce, x_cur)
            s["eta"] = torch.where(reduce, s["eta"] / 2, s["eta"])
            x_cur = torch.where(r, s["x_max"], x_cur)
            g = torch.where(r, s["g_max"], g)
            s["count"] = torch.zeros_like(s["count"])
            s["loss_max_ck"] = s["loss_max"].clone()
            s["reduced"] = reduce
        x = s["x"]
        z = self.threat.project(self.threat.ascent(x_cur, g, s["eta"]), x)
        if t == 0:
            x_next = z
        else:
            a = self.momentum
            moved = x_cur + a * (z - x_cur) + (1 - a) * (x_cur - s["x_prev"])
            x_next = self.threat.project(moved, x)
        s["x_prev"], s["x_adv"] = x_cur, x_next
        return s


@ATTACKS.register("apgd-dlr")
class APGDDLR(APGD):
    name = "apgd-dlr"
    default_loss = "dlr"
