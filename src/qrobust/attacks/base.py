"""Threat models and the attack base class that owns THE attack loop.

Images are float tensors in [lower, upper] (default [0, 1]), shape (N, C, H, W) (any (N, ...)
works); models map them to logits (N, K). Every attack is ``init`` + ``step`` plugged into
``Attack.run``; how a loss value and its gradient are obtained (autograd/STE, EOT, BPDA, logit
temperature) is the job of a gradient estimator (``qrobust.attacks.gradients``), never of a copy
of the loop. As in AutoAttack (Croce & Hein, arXiv 2003.01690) only points that are not yet
broken keep being attacked (``early_stop``), across steps and restarts.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from qrobust.attacks.gradients import auto_estimator, build_estimator
from qrobust.attacks.losses import LOSSES, Loss
from qrobust.attacks.point import Evaluation
from qrobust.errors import ConfigError
from qrobust.registry import Registry

Norm = Literal["linf", "l2"]
NORMS = ("linf", "l2")
State = dict[str, torch.Tensor]  # every entry has the batch as its first dimension


def _gen_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def rand(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor,
         normal: bool = False) -> torch.Tensor:
    """Uniform [0, 1) (or standard normal) numbers drawn on the generator's device and moved
    to ``like``'s device and dtype, so CPU generators drive GPU attacks reproducibly."""
    draw = torch.randn if normal else torch.rand
    out = draw(shape, generator=generator, device=_gen_device(generator, like.device))
    return out.to(device=like.device, dtype=like.dtype)


def randint(low: int, high: int, shape: tuple[int, ...], generator: torch.Generator | None,
            device: torch.device) -> torch.Tensor:
    """Integers in [low, high) drawn on the generator's device, returned on ``device``."""
    out = torch.randint(low, high, shape, generator=generator,
                        device=_gen_device(generator, device))
    return out.to(device)


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _per_sample(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A (B,) tensor reshaped to broadcast against ``like`` (B, ...); floats pass through."""
    if isinstance(v, torch.Tensor) and v.ndim == 1:
        return v.view(-1, *([1] * (like.ndim - 1)))
    return v


@dataclass(frozen=True)
class ThreatModel:
    """Perturbations with ``||x_adv - x||_norm <= eps`` inside the box [lower, upper]."""

    norm: Norm
    eps: float
    lower: float = 0.0
    upper: float = 1.0

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm '{self.norm}'; valid: {', '.join(NORMS)}")
        if not (isinstance(self.eps, int | float) and math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if not self.lower < self.upper:
            raise ConfigError(f"box bounds must satisfy lower < upper, got [{self.lower}, "
                              f"{self.upper}]")

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The point of the eps-ball around ``x`` (x inside the box) nearest to ``x_adv`` in
        the chosen norm, then clipped to the box. For linf this is the exact projection onto
        ball and box; for l2 the clip only shrinks the perturbation, so the result stays in
        both. Idempotent (up to float rounding for l2)."""
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            n = _flat_norm(delta)
            factor = torch.where(n > self.eps, self.eps / n.clamp_min(1e-30), torch.ones_like(n))
            delta = delta * _per_sample(factor, delta)
        return (x + delta).clamp(self.lower, self.upper)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A point drawn uniformly from the ball around ``x``, projected into the box."""
        if self.norm == "linf":
            u = rand(x.shape, generator, x)
            return self.project(x + (2 * u - 1) * self.eps, x)
        g = rand(x.shape, generator, x, normal=True)
        d = x[0].numel()
        r = rand((x.shape[0],), generator, x) ** (1 / d)
        direction = g / _flat_norm(g).clamp_min(1e-30).view(-1, *([1] * (x.ndim - 1)))
        return self.project(x + direction * _per_sample(r * self.eps, x), x)

    def ascent(self, x_adv: torch.Tensor, grad: torch.Tensor,
               size: torch.Tensor | float) -> torch.Tensor:
        """One steepest-ascent step of length ``size`` (float or (B,)) in the norm's geometry:
        sign(grad) for linf, grad / ||grad||_2 for l2. Not projected."""
        if self.norm == "linf":
            direction = grad.sign()
        else:
            direction = grad / _flat_norm(grad).clamp_min(1e-30).view(-1, *([1] * (grad.ndim - 1)))
        return x_adv + _per_sample(size, x_adv) * direction

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample distance (B,) in the threat model's norm."""
        delta = (x_adv - x).flatten(1)
        return delta.abs().amax(dim=1) if self.norm == "linf" else delta.norm(dim=1)

    def to_dict(self) -> dict:
        return {"norm": self.norm, "eps": self.eps, "lower": self.lower, "upper": self.upper}


@dataclass
class AttackResult:
    """x_adv (B, ...) in the threat model; success (B,) as judged by the attack's own
    evaluations; loss (B,) best loss seen; stats: gradient and query diagnostics."""

    x_adv: torch.Tensor
    success: torch.Tensor
    loss: torch.Tensor
    stats: dict = field(default_factory=dict)


def random_targets(y: torch.Tensor, num_classes: int,
                   generator: torch.Generator | None) -> torch.Tensor:
    """A uniformly random label different from y for every sample."""
    return (y + randint(1, num_classes, tuple(y.shape), generator, y.device)) % num_classes


class Attack:
    """Base class: subclasses set ``name`` and override ``init`` and ``step``.

    ``attack = ATTACKS.get("pgd")(model, threat, steps=10, estimator=None, targeted=False)``;
    ``x_adv = attack(x, y, generator=gen)`` (torchattacks-style call) or ``attack.run(...)``
    for the full ``AttackResult``. ``estimator=None`` picks one from the model's defense
    attributes (``auto_estimator``: EOT for randomized, BPDA for non-differentiable parts).
    For targeted attacks pass ``target=`` labels to ``run`` or let a random target != y be
    drawn from ``generator``.

    Per sample the loop keeps the first successful point (deterministic models) and drops it
    from the batch (``early_stop``); when the estimator is randomized (EOT) it keeps the point
    of highest expected loss instead and attacks every point for all steps, because a point
    that fooled n draws can still be classified correctly by a fresh draw. Restarts attack
    only the points not yet broken.
    """

    name: ClassVar[str] = "attack"
    uses_gradient: ClassVar[bool] = True
    default_loss: ClassVar[str] = "ce"

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], threat: ThreatModel, *,
                 steps: int = 10, restarts: int = 1, loss: str | None = None,
                 estimator: object | None = None, targeted: bool = False,
                 early_stop: bool = True) -> None:
        if not isinstance(threat, ThreatModel):
            raise ConfigError(f"threat must be a ThreatModel, got {type(threat).__name__}")
        if steps < 1 or restarts < 1:
            raise ConfigError(f"steps and restarts must be >= 1, got {steps} and {restarts}")
        self.model = model
        self.threat = threat
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.loss_name = loss or self.default_loss
        self.loss: Loss = LOSSES.get(self.loss_name)
        self.estimator = estimator if estimator is not None else auto_estimator(model)
        self.targeted = bool(targeted)
        self.early_stop = bool(early_stop)

    # --- what algorithms override -------------------------------------------------------
    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> State:
        """Per-sample state for one restart; must hold the starting point ``"x_adv"``."""
        raise NotImplementedError

    def step(self, state: State, ev: Evaluation, t: int,
             generator: torch.Generator | None) -> State:
        """Given the evaluation of ``state["x_adv"]`` at iteration t, the next state."""
        raise NotImplementedError

    # --- the one loop ---------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                 target: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(x, y, generator, target).x_adv

    def with_estimator(self, estimator: object) -> Attack:
        """The same attack (same parameters) with another gradient estimator."""
        other = copy.copy(self)
        other.estimator = estimator
        return other

    def describe(self) -> dict:
        return {"attack": self.name, **self.threat.to_dict(), "steps": self.steps,
                "restarts": self.restarts, "loss": self.loss_name, "targeted": self.targeted,
                "estimator": getattr(self.estimator, "name", type(self.estimator).__name__)}

    def _evaluate(self, state: State, need_grad: bool) -> Evaluation:
        y, target, scale = state["y"], state.get("target"), state.get("scale")

        def loss_fn(logits: torch.Tensor) -> torch.Tensor:
            z = logits * scale.unsqueeze(1) if scale is not None else logits
            return self.loss(z, y, target)

        return self.estimator(self.model, state["x_adv"], loss_fn, need_grad=need_grad)

    def run(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
            target: torch.Tensor | None = None) -> AttackResult:
        """Attack a batch: x (B, ...) in the box, y (B,) int64 true labels."""
        x, y = x.detach(), y.detach()
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"x has {x.shape[0]} images but y has {y.shape[0]} labels")
        if self.targeted and target is None:
            with torch.no_grad():
                k = self.model(x[:1]).shape[-1]
            target = random_targets(y, k, generator)
        b = x.shape[0]
        best_x, best_loss = x.clone(), torch.full((b,), -math.inf, device=x.device)
        success = torch.zeros(b, dtype=torch.bool, device=x.device)
        grads = zero_grads = small_grads = 0
        for _ in range(self.restarts):
            everyone = torch.arange(b, device=x.device)
            idx = (~success).nonzero().squeeze(1) if self.early_stop else everyone
            if idx.numel() == 0:
                break
            state: State = {"idx": idx, "x": x[idx], "y": y[idx]}
            if target is not None:
                state["target"] = target[idx]
            scale = self.estimator.prepare(self.model, state["x"], state["y"])
            if scale is not None:
                state["scale"] = scale
            state.update(self.init(state["x"], generator))
            for t in range(self.steps + 1):
                need_grad = self.uses_gradient and t < self.steps
                ev = self._evaluate(state, need_grad)
                if ev.grad is not None:
                    norms = _flat_norm(ev.grad)
                    grads += norms.numel()
                    zero_grads += int((norms == 0).sum())
                    small_grads += int((norms < 1e-8).sum())
                won = ev.success(state["y"], state.get("target"))
                pos = state["idx"]
                if ev.draw_pred is None:  # deterministic: the first success is kept
                    better = (~success[pos]) & (won | (ev.loss > best_loss[pos]))
                else:  # randomized: the highest expected loss is kept, success or not
                    better = ev.loss > best_loss[pos]
                best_x[pos[better]] = state["x_adv"][better]
                best_loss[pos[better]] = ev.loss[better]
                success[pos[better]] = won[better]
                if t == self.steps:
                    break
                if self.early_stop and ev.draw_pred is None and bool(won.any()):
                    keep = ~won
                    if not bool(keep.any()):
                        break
                    state, ev = {k: v[keep] for k, v in state.items()}, ev.select(keep)
                state = self.step(state, ev, t, generator)
        stats = {"grad_evals": grads, "zero_grad_fraction": zero_grads / grads if grads else None,
                 "small_grad_fraction": small_grads / grads if grads else None}
        return AttackResult(best_x, success, best_loss, stats)


ATTACKS: Registry[type[Attack]] = Registry("attack")


def make_attack(name: str, model: Callable, threat: ThreatModel, params: dict) -> Attack:
    """``ATTACKS.get(name)(model, threat, **params)``, from parameters a config file or the
    command line can hold: ``estimator`` a name of ``qrobust.attacks.gradients.ESTIMATORS``
    (default ``auto``: EOT for randomized, BPDA for non-differentiable defenses) and
    ``eot_samples`` (an int >= 1, default 10) its EOT draws, since YAML cannot hold an
    estimator object."""
    params = dict(params)
    samples = params.pop("eot_samples", None)
    kind = params.pop("estimator", None)
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)
                                or samples < 1):
        raise ConfigError(f"eot_samples must be an integer >= 1, got {samples!r}")
    if kind is not None and not isinstance(kind, str):
        params["estimator"] = kind  # an estimator object (the Python API)
    elif kind is not None or samples is not None:
        params["estimator"] = build_estimator(kind or "auto", model, samples or 10)
    cls = ATTACKS.get(name)
    try:
        return cls(model, threat, **params)
    except TypeError as err:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if bad is None:
            raise
        raise ConfigError(f"attack '{name}' has no parameter '{bad.group(1)}' (check the "
                          "spelling)") from None
