"""Attack losses: logits (B, K), true labels y (B,), optional target labels (B,) -> (B,) values
that the attack *maximizes*. Untargeted when ``target`` is None.

- ``ce``: cross-entropy to y; targeted: minus cross-entropy to the target.
- ``margin``: Carlini-Wagner margin max_{j != y} z_j - z_y (targeted: z_t - max_{j != t} z_j);
  positive exactly when the attack succeeds.
- ``dlr``: Difference of Logits Ratio, Croce & Hein (arXiv 2003.01690), shift and scale
  invariant: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3); targeted
  -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), where z_pi is the sorted logit vector.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from qrobust.errors import ConfigError
from qrobust.registry import Registry

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
LOSSES: Registry[Loss] = Registry("attack loss")


def _pick(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, labels.unsqueeze(1)).squeeze(1)


def _best_other(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    masked = logits.scatter(1, labels.unsqueeze(1), -torch.inf)
    return masked.amax(dim=1)


@LOSSES.register("ce")
def ce(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    if target is not None:
        return -F.cross_entropy(logits, target, reduction="none")
    return F.cross_entropy(logits, y, reduction="none")


@LOSSES.register("margin")
def margin(logits: torch.Tensor, y: torch.Tensor,
           target: torch.Tensor | None = None) -> torch.Tensor:
    if target is not None:
        return _pick(logits, target) - _best_other(logits, target)
    return _best_other(logits, y) - _pick(logits, y)


@LOSSES.register("dlr")
def dlr(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    k = logits.shape[1]
    if k < (4 if target is not None else 3):
        raise ConfigError(f"the DLR loss needs at least {4 if target is not None else 3} "
                          f"classes, the model has {k}; use loss='ce' or 'margin'")
    z = logits.sort(dim=1, descending=True).values
    if target is not None:
        denom = z[:, 0] - 0.5 * (z[:, 2] + z[:, 3]) + 1e-12
        return -(_pick(logits, y) - _pick(logits, target)) / denom
    return -(_pick(logits, y) - _best_other(logits, y)) / (z[:, 0] - z[:, 2] + 1e-12)
