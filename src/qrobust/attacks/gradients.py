"""Gradient estimators: how the attack loop gets a loss value and its input gradient.

An estimator is called as ``est(model, x, loss_fn, need_grad=True) -> Evaluation`` where
``x`` is (B, ...) in [0, 1] and ``loss_fn`` maps logits (B, K) to per-sample losses (B,) to
maximize; ``est.prepare(model, x, y)`` may return a per-sample logit scale (B,) (temperature)
that the loop applies before the loss. Estimators compose through ``base``:
``EOT(10, base=BPDA())``, ``Temperature("hessian", base=Autograd())``.

- ``Autograd``: plain backpropagation (straight-through estimators inside fake-quant twins).
- ``BPDA``: forward through the real model, backward through each non-differentiable layer's
  ``surrogate()`` (Athalye et al., arXiv 1802.00420), via a straight-through identity
  ``s(h) + (g(h) - s(h)).detach()``.
- ``EOT(n)``: expectation over n draws of a randomized model; the n copies go through the model
  as ONE batch, and when the model is a Sequential whose randomness starts late only the random
  suffix is replicated (the deterministic prefix runs once: same values, same gradient).
- ``Temperature``: logits scaled by beta before the loss (Gupta & Ajanthan, arXiv 2003.13511):
  a fixed beta, one global beta = 1 / mean singular value of the input-logit Jacobian ("NJS"),
  or a per-sample beta maximizing the Hessian-norm proxy ||beta^2 J^T S(beta z) J||_F
  ("HNS"), S the softmax Jacobian. Decision boundaries are unchanged (beta > 0).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import nn

from qrobust.attacks.point import Evaluation
from qrobust.defenses.base import (
    bpda_targets,
    is_differentiable,
    is_randomized,
    split_at_randomness,
)
from qrobust.errors import ConfigError

log = logging.getLogger(__name__)
LossFn = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def input_gradients_only(model: object) -> Iterator[None]:
    """Within the block the model's parameters do not require gradients (restored after):
    autograd then neither tracks nor computes weight gradients, only the input gradient that
    attacks need (about 5% faster per step on CPU)."""
    params = ([p for p in model.parameters() if p.requires_grad]
              if isinstance(model, nn.Module) else [])
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Autograd:
    """Backpropagation through the model (STE through quantizers)."""

    name = "autograd"

    def prepare(self, model: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        return None

    def __call__(self, model: Callable, x: torch.Tensor, loss_fn: LossFn,
                 need_grad: bool = True) -> Evaluation:
        if not need_grad:
            with torch.no_grad():
                logits = model(x)
                return Evaluation(loss_fn(logits), logits)
        with torch.enable_grad(), input_gradients_only(model):
            xg = x.detach().requires_grad_(True)
            logits = model(xg)
            loss = loss_fn(logits)
            grad = None
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss.sum(), xg, allow_unused=True)
        if grad is None:  # the output does not depend on x differentiably (or at all)
            grad = torch.zeros_like(x)
        return Evaluation(loss.detach(), logits.detach(), grad)


@contextlib.contextmanager
def straight_through(model: nn.Module,
                     surrogates: dict[nn.Module, nn.Module] | None = None) -> Iterator[int]:
    """Within the block, every BPDA target layer g of ``model`` outputs
    ``s(h) + (g(h) - s(h)).detach()``: g's value, s's gradient. Yields the number of layers."""
    surrogates = surrogates or {}
    handles = []
    for m in bpda_targets(model) if isinstance(model, nn.Module) else []:
        s = surrogates.get(m) or m.surrogate()

        def hook(mod: nn.Module, inputs: tuple, out: torch.Tensor,
                 s: nn.Module = s) -> torch.Tensor:
            approx = s(inputs[0])
            return approx + (out - approx).detach()

        handles.append(m.register_forward_hook(hook))
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


class BPDA(Autograd):
    """Backward Pass Differentiable Approximation through non-differentiable layers (those that
    declare ``differentiable = False``), with their ``surrogate()`` or an explicit mapping."""

    name = "bpda"

    def __init__(self, surrogates: dict[nn.Module, nn.Module] | None = None) -> None:
        self.surrogates = surrogates

    def __call__(self, model: Callable, x: torch.Tensor, loss_fn: LossFn,
                 need_grad: bool = True) -> Evaluation:
        if not need_grad:
            return super().__call__(model, x, loss_fn, need_grad)
        with straight_through(model, self.surrogates):  # type: ignore[arg-type]
            return super().__call__(model, x, loss_fn, need_grad)


class _Replicated(nn.Module):
    """x (B, ...) -> logits (n*B, K) of n draws: ``rest(repeat(prefix(x)))``."""

    def __init__(self, prefix: nn.Module | None, rest: Callable, n: int) -> None:
        super().__init__()
        self.prefix, self.rest, self.n = prefix, rest, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prefix(x) if self.prefix is not None else x
        h = h.unsqueeze(0).expand(self.n, *h.shape).reshape(self.n * h.shape[0], *h.shape[1:])
        return self.rest(h)


class _LargestOutput:
    """Forward hooks on every submodule of ``module``: the largest output seen, in bytes."""

    def __init__(self, module: nn.Module) -> None:
        self.bytes = 0
        self.handles = [m.register_forward_hook(self._hook) for m in module.modules()]

    def _hook(self, module: nn.Module, inputs: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            self.bytes = max(self.bytes, out.numel() * out.element_size())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def draws_per_pass(n: int, bytes_per_draw: int) -> int:
    """How many of ``n`` draws to batch so that no activation is a block the allocator maps
    afresh (and page-faults in, and unmaps) on every pass: measured on small-cnn with MC dropout
    after every ReLU (EOT-10, 32 images, 1 thread), 10 draws per pass took 8.3 s against 5.6 s
    in chunks of 5 (glibc's 32 MB default); with large allocations kept every chunk size ran
    within 4 % of the others. Without glibc, all draws go in one pass."""
    from qrobust.hardware import fresh_mapping_bytes

    limit = fresh_mapping_bytes()
    if limit is None or bytes_per_draw <= 0:
        return n
    return max(1, min(n, limit // bytes_per_draw))


class EOT:
    """Expectation over Transformation (Athalye et al., arXiv 1802.00420): loss and gradient
    averaged over ``n`` draws of a randomized model, the draws batched into few passes.

    ``chunk``: draws per forward pass. ``"auto"`` (default) runs all n draws in the first pass,
    measures its largest activation, and from then on (per model and input shape) batches as
    many draws as keep every activation under the size the allocator would map afresh
    (:func:`draws_per_pass`): on small models that stays all n at once. The choice depends on
    the model, the input shape and the allocator, never on timings, so seeded runs repeat
    exactly. The returned logits are log of the mean softmax over draws (the model's vote); the
    loop counts a point as broken only when every draw is fooled (``Evaluation.draw_pred``)."""

    def __init__(self, n: int = 10, base: Autograd | None = None,
                 chunk: int | Literal["auto"] = "auto") -> None:
        if n < 1:
            raise ConfigError(f"EOT needs n >= 1 draws, got {n}")
        if chunk != "auto" and not (isinstance(chunk, int) and chunk >= 1):
            raise ConfigError(f"EOT chunk must be 'auto' or an int >= 1, got {chunk!r}")
        self.n = int(n)
        self.base = base or Autograd()
        self.chunk = chunk
        self.name = f"eot{self.n}+{self.base.name}"
        self._splits: dict[int, tuple] = {}
        self._chunks: dict[tuple[int, tuple[int, ...]], int] = {}  # (model, x shape) -> draws

    def prepare(self, model: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        return self.base.prepare(model, x, y)

    def _wrapped(self, model: Callable, n: int) -> nn.Module:
        key = id(model)
        if key not in self._splits:
            split = split_at_randomness(model) if isinstance(model, nn.Module) else None
            self._splits[key] = (model, split)  # keep model alive so the id stays unique
        split = self._splits[key][1]
        return _Replicated(*split, n) if split else _Replicated(None, model, n)

    def __call__(self, model: Callable, x: torch.Tensor, loss_fn: LossFn,
                 need_grad: bool = True) -> Evaluation:
        b, parts, done = x.shape[0], [], 0
        key = (id(model), tuple(x.shape))
        chunk = self.chunk if self.chunk != "auto" else self._chunks.get(key)
        while done < self.n:
            n = min(chunk or self.n, self.n - done)
            wrapped = self._wrapped(model, n)

            def mean_loss(logits: torch.Tensor, n: int = n) -> torch.Tensor:
                draws = logits.view(n, b, -1)
                return torch.stack([loss_fn(draws[i]) for i in range(n)]).mean(0)

            meter = _LargestOutput(wrapped.rest) if chunk is None and \
                isinstance(wrapped.rest, nn.Module) else None
            try:
                ev = self.base(wrapped, x, mean_loss, need_grad)
            finally:
                if meter is not None:
                    meter.remove()
            if chunk is None:  # the first pass of "auto" ran all draws and measured them
                per_draw = meter.bytes // self.n if meter else 0
                chunk = self._chunks[key] = draws_per_pass(self.n, per_draw)
            draws = ev.logits.view(n, b, -1)
            parts.append((n, ev, torch.softmax(draws, dim=-1).mean(0), draws.argmax(-1)))
            done += n
        w = [n / self.n for n, *_ in parts]
        loss = sum(wi * ev.loss for wi, (_, ev, _, _) in zip(w, parts, strict=True))
        probs = sum(wi * p for wi, (_, _, p, _) in zip(w, parts, strict=True))
        grad = None
        if need_grad:
            grad = sum(wi * ev.grad for wi, (_, ev, _, _) in zip(w, parts, strict=True))
        draw_pred = torch.cat([d for *_, d in parts])
        return Evaluation(loss, probs.clamp_min(1e-30).log(), grad, draw_pred)


def input_jacobian(model: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z (B, K) and the per-sample input-logit Jacobian J (B, K, D), D = x[0].numel(),
    by K backward passes (samples must not interact: eval-mode batch norm)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        z = model(xg)
        rows = []
        for k in range(z.shape[1]):
            (g,) = torch.autograd.grad(z[:, k].sum(), xg, retain_graph=k + 1 < z.shape[1],
                                       allow_unused=True)
            rows.append(torch.zeros_like(xg) if g is None else g)
    return z.detach(), torch.stack([r.flatten(1) for r in rows], dim=1)


def _mean_singular_value(jac: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(jac.double()).mean())


def global_temperature(model: Callable, x: torch.Tensor) -> float:
    """NJS: beta = 1 / (mean singular value of J over the samples of x)."""
    _, jac = input_jacobian(model, x)
    mean_sv = _mean_singular_value(jac)
    if not mean_sv > 0:
        log.warning("input-logit Jacobian is zero on every sample: temperature left at 1")
        return 1.0
    return 1.0 / mean_sv


def jacobian_temperature(model: Callable, x: torch.Tensor, y: torch.Tensor,
                         saturation: float = 1e-2) -> torch.Tensor:
    """NJS with the authors' gradient thresholding, (B,) float32: the global beta, times, for
    samples whose scaled softmax still gives the true class more than 1 - ``saturation``,
    log((1 - s)(K - 1) / s) / (range of the scaled logits), which brings the scaled logit range
    to that value (the softmax then leaves saturation)."""
    z, jac = input_jacobian(model, x)
    mean_sv = _mean_singular_value(jac)
    beta = 1.0 / mean_sv if mean_sv > 0 else 1.0
    zs = z.double() * beta
    p_true = torch.softmax(zs, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
    spread = (zs.amax(1) - zs.amin(1)).clamp_min(1e-30)
    k = z.shape[1]
    target_range = math.log((1 - saturation) * (k - 1) / saturation)
    thresh = target_range / spread
    scale = torch.where(p_true > 1 - saturation, beta * thresh, torch.full_like(spread, beta))
    return scale.float()


def hessian_proxy(z: torch.Tensor, gram: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """||beta^2 J^T S(beta z) J||_F for logits z (B, K), gram = J J^T (B, K, K) and betas
    (B, M) -> (B, M); S(u) = diag(softmax u) - softmax u softmax u^T. Uses
    ||J^T S J||_F^2 = tr(S G S G)."""
    p = torch.softmax(beta.unsqueeze(-1) * z.unsqueeze(1), dim=-1)  # B, M, K
    s = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # B, M, K, K
    sg = s @ gram.unsqueeze(1)
    tr = (sg * sg.transpose(-1, -2)).sum(dim=(-1, -2)).clamp_min(0)
    return beta**2 * tr.sqrt()


def hessian_temperature(model: Callable, x: torch.Tensor, y: torch.Tensor,
                        grid: int = 100) -> torch.Tensor:
    """HNS: per sample, the beta on a grid maximizing ``hessian_proxy``; (B,) float32.

    The grid spans the betas at which the non-top classes hold probability 1 - 1/K - 0.01 and
    1e-72 in total (from the gap between the two largest logits), as in the authors' code, but
    is geometric rather than linear (our choice: a linear grid of 100 points resolves the
    peak, at beta * gap of a few units, poorly). beta = 1 for misclassified points, zero gaps,
    or an optimum on the grid's edge (the proxy then gives no information)."""
    z, jac = input_jacobian(model, x)
    z, jac = z.double(), jac.double()
    gram = jac @ jac.transpose(1, 2)
    k = z.shape[1]
    top2 = z.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    ok = (z.argmax(1) == y) & (gap > 0)

    def bound(eps: float) -> torch.Tensor:
        return -math.log(eps / ((1 - eps) * (k - 1))) / gap.clamp_min(1e-30)

    lo, hi = bound(1 - 1 / k - 1e-2), bound(1e-72)
    ok &= (lo > 0) & (hi > lo)
    t = torch.linspace(0, 1, grid, dtype=torch.float64, device=z.device)
    lo, hi = lo.clamp_min(1e-30), hi.clamp_min(1e-30)
    betas = lo.unsqueeze(1) * (hi / lo).unsqueeze(1) ** t.unsqueeze(0)  # B, M, geometric
    best = hessian_proxy(z, gram, betas).argmax(dim=1)
    ok &= (best > 0) & (best < grid - 1)
    chosen = betas.gather(1, best.unsqueeze(1)).squeeze(1)
    return torch.where(ok, chosen, torch.ones_like(chosen)).float()


class Temperature:
    """Logit temperature scaling against vanishing / saturated gradients (Gupta & Ajanthan,
    arXiv 2003.13511). ``method``: "fixed" (use ``beta``), "jacobian" (NJS: one beta per
    attacked batch, then thresholding of saturated samples) or "hessian" (HNS, per sample).
    Betas are computed once per batch and restart, at the clean points. Gradients come from
    ``base``."""

    def __init__(self, method: Literal["fixed", "jacobian", "hessian"] = "hessian",
                 beta: float | None = None, base: Autograd | None = None) -> None:
        if method not in ("fixed", "jacobian", "hessian"):
            raise ConfigError(f"unknown temperature method '{method}'; valid: fixed, jacobian, "
                              "hessian")
        if method == "fixed" and not (beta is not None and beta > 0):
            raise ConfigError(f"method='fixed' needs beta > 0, got {beta}")
        self.method, self.beta = method, beta
        self.base = base or Autograd()
        self.name = f"temperature-{method}+{self.base.name}"

    def prepare(self, model: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if self.method == "fixed":
            return torch.full((x.shape[0],), float(self.beta), device=x.device)  # type: ignore[arg-type]
        inner = self.base.base if isinstance(self.base, EOT) else self.base
        # the Jacobian goes through BPDA surrogates when the gradients do
        ctx = (straight_through(model, inner.surrogates)  # type: ignore[arg-type]
               if isinstance(inner, BPDA) else contextlib.nullcontext())
        with ctx:
            if self.method == "jacobian":
                return jacobian_temperature(model, x, y).to(x.device)
            return hessian_temperature(model, x, y).to(x.device)

    def __call__(self, model: Callable, x: torch.Tensor, loss_fn: LossFn,
                 need_grad: bool = True) -> Evaluation:
        return self.base(model, x, loss_fn, need_grad)


def auto_estimator(model: Callable, eot_samples: int = 10) -> Autograd | EOT:
    """EOT for randomized models, BPDA for models with non-differentiable defense layers,
    EOT over BPDA for both, plain autograd otherwise (read from the Defense attributes)."""
    base = BPDA() if not is_differentiable(model) else Autograd()
    return EOT(eot_samples, base) if is_randomized(model) else base


ESTIMATORS = ("auto", "autograd", "bpda", "eot", "temperature-hessian", "temperature-jacobian")


def build_estimator(kind: str, model: Callable, eot_samples: int = 10
                    ) -> Autograd | EOT | Temperature:
    """An estimator by name (what a config file or the command line can hold): ``auto`` is
    :func:`auto_estimator`, ``eot`` is EOT over BPDA, ``temperature-*`` rescale the logits
    before the auto estimator (Gupta & Ajanthan, arXiv 2003.13511)."""
    from qrobust.errors import ConfigError

    if kind not in ESTIMATORS:
        raise ConfigError(f"unknown estimator '{kind}'; valid: {', '.join(ESTIMATORS)}")
    if kind == "autograd":
        return Autograd()
    if kind == "bpda":
        return BPDA()
    if kind == "eot":
        return EOT(eot_samples, BPDA())
    base = auto_estimator(model, eot_samples)
    return base if kind == "auto" else Temperature(kind.split("-")[1], base=base)
