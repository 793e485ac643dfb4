"""What the attack loop learns at one point (:class:`Evaluation`) and when an attack has
reached its goal; the one module both the loop (:mod:`qrobust.attacks.base`) and the gradient
estimators (:mod:`qrobust.attacks.gradients`) build on."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def is_success(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Untargeted: prediction != y. Targeted: prediction == target. (B,) bool."""
    pred = logits.argmax(dim=-1)
    return pred == target if target is not None else pred != y


@dataclass(frozen=True)
class Evaluation:
    """What the loop learns at one point: loss to maximize (B,), logits (B, K) (for EOT: log
    of the mean softmax over draws), the gradient (B, ...) or None, and for randomized models
    the prediction of every draw (n, B): a point then counts as adversarial only if *every*
    draw is fooled, so that it stays adversarial under fresh randomness."""

    loss: torch.Tensor
    logits: torch.Tensor
    grad: torch.Tensor | None = None
    draw_pred: torch.Tensor | None = None

    def select(self, keep: torch.Tensor) -> Evaluation:
        return Evaluation(self.loss[keep], self.logits[keep],
                          None if self.grad is None else self.grad[keep],
                          None if self.draw_pred is None else self.draw_pred[:, keep])

    def success(self, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """(B,) bool: the attack's goal is reached (on every draw for randomized models)."""
        won = is_success(self.logits, y, target)
        if self.draw_pred is not None:
            each = self.draw_pred == target if target is not None else self.draw_pred != y
            won = won & each.all(dim=0)
        return won
