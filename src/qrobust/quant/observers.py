"""Observers: choose a quantizer's scale and zero point from observed values.

An observer is a pure function ``(x, spec) -> (scale, zero_point)``. ``x`` is (C, n) for
per-channel specs (one row per output channel) and (n,) otherwise. Registered: ``minmax``
(the observed range), ``percentile`` (the ``spec.percentile``-th percentile of |x| / of the
tails, robust to outliers) and ``mse`` (the clipping range minimising the squared
quantization error over a grid of 64 shrink factors of the min-max range, as in
Banner et al., arXiv 1810.05723). ``spec.clip`` fixes the range and bypasses observation;
the 1-bit sign quantizer uses s = mean|x| (the L2-optimal scale of XNOR-Net, arXiv 1603.05279)
whatever the observer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qrobust.quant.functional import qparams_from_range
from qrobust.quant.spec import QuantSpec
from qrobust.registry import Registry

Observer = Callable[[torch.Tensor, QuantSpec], tuple[torch.Tensor, torch.Tensor]]
OBSERVERS: Registry[Observer] = Registry("observer")
MSE_GRID = 64
MSE_BLOCK = 2**22  # elements of one pass of the MSE search (16 MB)


def _rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    x = x.detach().float()
    return x.reshape(x.shape[0], -1) if spec.granularity == "channel" else x.reshape(1, -1)


def _squeeze(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return t if spec.granularity == "channel" else t.reshape(())


@OBSERVERS.register("minmax")
def minmax(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows(x, spec)
    lo, hi = rows.amin(1), rows.amax(1)
    s, z = qparams_from_range(lo, hi, spec)
    return _squeeze(s, spec), _squeeze(z, spec)


@OBSERVERS.register("percentile")
def percentile(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows(x, spec)
    q = spec.percentile / 100.0
    n = rows.shape[1]
    k_hi = max(1, min(n, int(round(q * n))))
    k_lo = max(1, min(n, int(round((1 - q) * n)) + 1))
    hi = rows.kthvalue(k_hi, dim=1).values
    lo = rows.kthvalue(k_lo, dim=1).values
    if spec.symmetric and spec.signed:
        hi = rows.abs().kthvalue(k_hi, dim=1).values
        lo = -hi
    s, z = qparams_from_range(lo, hi, spec)
    return _squeeze(s, spec), _squeeze(z, spec)


@OBSERVERS.register("mse")
def mse(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows(x, spec)
    shrink = 1.0 - torch.arange(MSE_GRID, dtype=torch.float32) / MSE_GRID
    s, z = qparams_from_range(rows.amin(1, keepdim=True) * shrink,
                              rows.amax(1, keepdim=True) * shrink, spec)  # (C, MSE_GRID)
    step = max(1, MSE_BLOCK // rows.numel())  # grid points per pass
    err = torch.cat([_squared_error(rows, s[:, i:i + step], z[:, i:i + step], spec)
                     for i in range(0, MSE_GRID, step)], dim=1)
    best = err.argmin(1, keepdim=True)  # the first minimum: the widest of equally good ranges
    return _squeeze(s.gather(1, best)[:, 0], spec), _squeeze(z.gather(1, best)[:, 0], spec)


def _squared_error(rows: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                   spec: QuantSpec) -> torch.Tensor:
    """Mean squared fake-quantization error of each row (C, n) under each of its candidate
    qparams (C, k): (C, k), computed in place on one (C, k, n) tensor (``fake_quantize``'s
    formula written in place: through ``fake_quantize`` the search takes 1.8x as long, and
    QAT observes the weights at every step)."""
    s, z = s[:, :, None], z[:, :, None]
    q = (rows[:, None, :] / s).add_(0.5).floor_().add_(z).clamp_(spec.qmin, spec.qmax)
    return q.sub_(z).mul_(s).sub_(rows[:, None, :]).square_().mean(2)


def observe(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for ``x`` under ``spec`` (fixed clip, sign rule, or the observer)."""
    if spec.clip is not None:
        lo = torch.tensor(-spec.clip if spec.signed else 0.0)
        hi = torch.tensor(spec.clip)
        s, z = qparams_from_range(lo, hi, spec)
        if spec.is_sign:  # {-clip, +clip}
            s = torch.tensor(float(spec.clip))
        if spec.granularity == "channel" and x.ndim > 0:
            s, z = s.expand(x.shape[0]).clone(), z.expand(x.shape[0]).clone()
        return s, z
    if spec.is_sign:
        s = _rows(x, spec).abs().mean(1).clamp(min=1e-12)
        return _squeeze(s, spec), _squeeze(torch.zeros_like(s), spec)
    return OBSERVERS.get(spec.observer)(x, spec)
