"""Certified training of quantized networks: QA-IBP (Lechner et al., AAAI 2023,
arXiv 2211.16187).

The training loss adds the cross-entropy of the interval worst case of the fake-quant twin over
the L-infinity ball of radius eps: logits ``-m`` where ``m[k]`` is a lower bound of
``logit[y] - logit[k]``, computed through the twin's own rounding with the last linear layer
elided (Gowal et al., arXiv 1810.12715; :func:`qrobust.quant.intervals.margin_lower_bounds`).
The schedule of Gowal et al.: eps and the term's weight stay at 0 for a warm-up, then rise
linearly to their targets, then hold. The result is proved, not just attacked, by
:mod:`qrobust.verify` on the lowered integer program.

``box < 1`` is SABR (Müller et al., ICLR 2023, arXiv 2210.04871): the bound covers a box of
``box x eps`` around a PGD point of the ball instead of the whole ball.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError
from qrobust.quant.intervals import margin_lower_bounds

DEFAULT_RECIPE = "w8a8,pt,relu6"  # per-tensor weights: one output scale (exact MILP margins)


@dataclass
class IntervalLoss:
    """``weight(t) * CE(worst-case logits over the eps(t) ball)``, a loss term of the training
    loop (``train(..., extra_losses=[IntervalLoss(...)])``); ``eps`` in [0, 1] pixel units.
    Counts its own calls (one per batch) for the schedule."""

    eps: float
    warmup_steps: int
    ramp_steps: int
    weight: float = 1.0
    box: float = 1.0
    attack_steps: int = 8
    seed: int = 0
    step: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.eps < 1 or self.weight <= 0:
            raise ConfigError(f"certified training needs 0 < eps < 1 (pixel units) and a "
                              f"positive weight, got eps={self.eps}, weight={self.weight}")
        if self.warmup_steps < 0 or self.ramp_steps < 0:
            raise ConfigError("warm-up and ramp lengths must be >= 0")
        if not 0 < self.box <= 1 or self.attack_steps < 1:
            raise ConfigError(f"the propagated box is a fraction in (0, 1] of the ball and the "
                              f"attack takes >= 1 step, got box={self.box}, "
                              f"attack_steps={self.attack_steps}")
        self._generator = torch.Generator().manual_seed(self.seed)

    def schedule(self) -> float:
        """The fraction of the targets reached at the current step."""
        t = self.step - self.warmup_steps
        return 0.0 if t < 0 else min(1.0, (t + 1) / max(self.ramp_steps, 1))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 logits: torch.Tensor) -> torch.Tensor:
        frac = self.schedule()
        self.step += 1
        if frac == 0:
            return logits.new_zeros(())
        eps = frac * self.eps
        lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        if self.box < 1:
            lo, hi = self._small_box(model, x, y, lo, hi, self.box * eps)
        margins = margin_lower_bounds(model, lo, hi, y)
        return frac * self.weight * F.cross_entropy(-margins.float(), y)

    def _small_box(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lo: torch.Tensor,
                   hi: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
        """SABR (Müller et al., ICLR 2023, arXiv 2210.04871): the box of ``radius`` around a
        PGD point of the ball, placed so that it stays inside the ball. A bound on a small box
        where the loss is high regularises far less than one on the whole ball, and the
        network it trains is proved by the complete verifier, not by the bound."""
        mid = (lo + hi) / 2  # the centres the small box may take: [lo + r, hi - r]
        c_lo, c_hi = torch.minimum(lo + radius, mid), torch.maximum(hi - radius, mid)
        centre = c_lo + torch.rand(x.shape, generator=self._generator) * (c_hi - c_lo)
        alpha = 2.5 * (c_hi - c_lo).max().item() / 2 / self.attack_steps
        was_training = model.training
        model.eval()  # no observer updates or dropout while attacking
        with torch.enable_grad():
            for _ in range(self.attack_steps):
                point = centre.detach().requires_grad_()
                grad, = torch.autograd.grad(F.cross_entropy(model(point).float(), y), point)
                centre = torch.minimum(torch.maximum(centre + alpha * grad.sign(), c_lo), c_hi)
        model.train(was_training)
        centre = centre.detach()
        return torch.maximum(centre - radius, lo), torch.minimum(centre + radius, hi)


def fit_certified(arch: str, data, cfg, eps: float, recipe: str = DEFAULT_RECIPE,
                  init: nn.Module | None = None, weight: float = 1.0,
                  warmup_epochs: float = 1.0, ramp_epochs: float | None = None,
                  progress: bool | None = None, arch_params: dict | None = None,
                  box: float = 1.0):
    """Train the quantized twin of ``arch`` (or of the float model ``init``) with QA-IBP on
    ``data``. ``ramp_epochs`` defaults to half the epochs after the warm-up. Returns
    :class:`qrobust.train.Fitted` (the twin; save it with ``kind="quantized"``) whose metadata
    adds ``quant = {"recipe": ..., "certified": {...}}``."""
    from qrobust.defenses.dq import fit_twin

    # no early stopping or best-validation restore: clean accuracy peaks before the ramp ends
    cfg = replace(cfg, val_fraction=0.0, patience=None)
    steps = -(-len(data.train) // cfg.batch_size)
    ramp = ramp_epochs if ramp_epochs is not None else max(cfg.epochs - warmup_epochs, 1) / 2
    term = IntervalLoss(eps, int(warmup_epochs * steps), int(ramp * steps), weight, box,
                        seed=cfg.seed)
    fitted = fit_twin(arch, data, cfg, recipe, [term], init, progress, arch_params)
    fitted.meta["quant"]["certified"] = {"method": "qa-ibp" if box == 1 else "qa-sabr",
                                         "eps": eps, "weight": weight, "box": box,
                                         "warmup_epochs": warmup_epochs, "ramp_epochs": ramp}
    return fitted
