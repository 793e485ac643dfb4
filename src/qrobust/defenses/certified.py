"""Certified training of quantized networks: QA-IBP (Lechner et al., AAAI 2023,
arXiv 2211.16187).

The training loss adds the cross-entropy of the interval worst case (every wrong class at its
upper bound, the label at its lower bound; Gowal et al., arXiv 1810.12715) of the fake-quant
twin over the L-infinity ball of radius eps, bounds computed through the twin's own rounding
(:func:`qrobust.quant.intervals.interval_forward`). The schedule of Gowal et al.: eps and the
term's weight stay at 0 for a warm-up, then rise linearly to their targets, then hold. The
result is proved, not just attacked, by :mod:`qrobust.verify` on the lowered integer program.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError
from qrobust.quant.intervals import interval_forward, worst_case_logits

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
    step: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.eps < 1 or self.weight <= 0:
            raise ConfigError(f"certified training needs 0 < eps < 1 (pixel units) and a "
                              f"positive weight, got eps={self.eps}, weight={self.weight}")
        if self.warmup_steps < 0 or self.ramp_steps < 0:
            raise ConfigError("warm-up and ramp lengths must be >= 0")

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
        lo, hi = interval_forward(model, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
        return frac * self.weight * F.cross_entropy(worst_case_logits(lo, hi, y).float(), y)


def fit_certified(arch: str, data, cfg, eps: float, recipe: str = DEFAULT_RECIPE,
                  init: nn.Module | None = None, weight: float = 1.0,
                  warmup_epochs: float = 1.0, ramp_epochs: float | None = None,
                  progress: bool | None = None, arch_params: dict | None = None):
    """Train the quantized twin of ``arch`` (or of the float model ``init``) with QA-IBP on
    ``data``. ``ramp_epochs`` defaults to half the epochs after the warm-up. Returns
    :class:`qrobust.train.Fitted` (the twin; save it with ``kind="quantized"``) whose metadata
    adds ``quant = {"recipe": ..., "certified": {...}}``."""
    from qrobust.defenses.dq import fit_twin

    # no early stopping or best-validation restore: clean accuracy peaks before the ramp ends
    cfg = replace(cfg, val_fraction=0.0, patience=None)
    steps = -(-len(data.train) // cfg.batch_size)
    ramp = ramp_epochs if ramp_epochs is not None else max(cfg.epochs - warmup_epochs, 1) / 2
    term = IntervalLoss(eps, int(warmup_epochs * steps), int(ramp * steps), weight)
    fitted = fit_twin(arch, data, cfg, recipe, [term], init, progress, arch_params)
    fitted.meta["quant"]["certified"] = {"method": "qa-ibp", "eps": eps, "weight": weight,
                                         "warmup_epochs": warmup_epochs, "ramp_epochs": ramp}
    return fitted
