"""The functional core of quantization: pure functions, no state.

Uniform affine quantization (Jacob et al. 2018, arXiv 1712.05877):
``q = clamp(round(x / s) + z, qmin, qmax)`` and ``x_hat = (q - z) * s``. Rounding is *round half
up*, ``floor(v + 0.5)``, the rounding of the integer executor's rounding right shift, so that
the twin and the integer model round ties the same way. Gradients are straight-through (STE,
Bengio et al. 2013, arXiv 1308.3432): identity inside the clipping range, zero outside.
The 1-bit signed quantizer is ``s * sign(x)`` (sign(0) = +1) with the hard-tanh STE.
"""

from __future__ import annotations

import torch

from qrobust.quant.spec import QuantSpec


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """``floor(x + 0.5)``: nearest integer, ties towards +inf (no gradient)."""
    return torch.floor(x + 0.5)


def tracks_grad(x: torch.Tensor) -> bool:
    """Whether autograd records operations on ``x`` (else in-place arithmetic is safe)."""
    return x.requires_grad and torch.is_grad_enabled()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half up in the forward pass, identity gradient in the backward pass.

    ``x + (r - x)`` equals ``r`` exactly (``r - x`` is exact by Sterbenz's lemma, or ``-x``
    when ``r = 0``), so without autograd the rounding alone gives the same values."""
    if not tracks_grad(x):
        return round_half_up(x)
    return x + (round_half_up(x) - x).detach()


class _FakeQuantSTE(torch.autograd.Function):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` in place on one new tensor; backward:
    the clipped identity, from a saved boolean mask (the unfused graph keeps several float
    tensors per quantizer, which made QAT and twin attacks memory-bound)."""

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax):  # type: ignore[override]
        codes = (x / s).add_(0.5).floor_().add_(z)
        ctx.save_for_backward((codes < qmin) | (codes > qmax))
        return codes.clamp_(qmin, qmax).sub_(z).mul_(s)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (clipped,) = ctx.saved_tensors
        return grad.masked_fill(clipped, 0.0), None, None, None, None  # 3x torch.where's speed


class _CodesSTE(torch.autograd.Function):
    """``round(x / s)`` cast to ``dtype`` (in place); backward: ``grad / s`` in x's dtype."""

    @staticmethod
    def forward(ctx, x, s, dtype):  # type: ignore[override]
        ctx.s, ctx.in_dtype = s, x.dtype
        return (x / s).add_(0.5).floor_().to(dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.to(ctx.in_dtype) / ctx.s, None, None


def codes_ste(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``round_ste(x / scale)`` as ``dtype``: a quantized activation's integer codes, with
    the gradient ``1 / scale`` (``scale`` a constant scalar)."""
    return _CodesSTE.apply(x, scale.to(x.dtype), dtype)  # no graph when x needs no gradient


class _ScaleAccumulator(torch.autograd.Function):
    """``(acc + b) * s`` in float64 on one new tensor; b and s broadcast (1, C, 1, ...)."""

    @staticmethod
    def forward(ctx, acc, b, s):  # type: ignore[override]
        ctx.s, ctx.acc_dtype, ctx.has_b = s, acc.dtype, b is not None
        out = acc.to(torch.float64, copy=True)  # a copy even of float64: acc is an input
        return (out.add_(b) if b is not None else out).mul_(s)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        g = grad * ctx.s
        dims = [d for d in range(g.ndim) if d != 1]
        g_b = g.sum(dims, keepdim=True) if ctx.has_b and ctx.needs_input_grad[1] else None
        return g.to(ctx.acc_dtype), g_b, None


def scale_accumulator(acc: torch.Tensor, bias_codes: torch.Tensor | None,
                      s: torch.Tensor) -> torch.Tensor:
    """``(acc + bias_codes) * s`` in float64: an integer accumulator (N, C, ...) with its int32
    bias codes, as real values (``bias_codes`` and ``s`` shaped (1, C, 1, ...), ``s``
    constant); no graph when neither input needs a gradient."""
    if s.requires_grad:
        raise ValueError("the accumulator scale must be a constant")
    return _ScaleAccumulator.apply(acc, bias_codes, s)


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass, its gradient times ``factor`` in the backward pass (LSQ's
    step-size gradient scaling, ``1 / sqrt(n qmax)``: keeps the scale's updates in proportion
    to the weights' whatever the layer's size and bit width)."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Unbiased stochastic rounding: ``floor(x + u)``, u ~ U[0, 1), so E[result] = x.

    ``generator`` drives the noise (same seed, same result); identity gradient (STE).
    """
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + (torch.floor(x + u) - x).detach()


def _broadcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel (C,) tensor shaped to broadcast along axis 0 of ``x``; scalars unchanged."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 1 and t.numel() > 1:
        return t.view(-1, *([1] * (x.ndim - 1)))
    return t.reshape(()) if t.numel() == 1 else t


def quantize_codes(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer codes of ``x`` (float tensor holding integers in [qmin, qmax]), STE gradient.

    ``scale`` and ``zero_point`` are scalars or (C,) per channel along axis 0. Stochastic
    rounding is used when ``spec.rounding == 'stochastic'`` and a generator is given.
    """
    s, z = _broadcast(scale, x), _broadcast(zero_point, x)
    v = x / s
    if spec.is_sign:
        soft = v.clamp(-1.0, 1.0)
        return soft + (torch.where(v >= 0, 1.0, -1.0).to(x.dtype) - soft).detach()
    stochastic = spec.rounding == "stochastic" and generator is not None
    if not stochastic and not tracks_grad(v):  # the same values, in place on the new tensor v
        return v.add_(0.5).floor_().add_(z).clamp_(spec.qmin, spec.qmax)
    r = stochastic_round(v, generator) if stochastic else round_ste(v)
    return torch.clamp(r + z, spec.qmin, spec.qmax)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s`` with per-channel parameters along axis 0."""
    centred = codes - _broadcast(zero_point, codes)
    s = _broadcast(scale, codes)
    return centred * s if tracks_grad(centred) else centred.mul_(s)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Quantize then dequantize: the values the integer model represents, STE gradients."""
    fixed = not any(torch.is_tensor(t) and t.requires_grad for t in (scale, zero_point))
    deterministic = spec.rounding != "stochastic" or generator is None
    if tracks_grad(x) and fixed and deterministic and not spec.is_sign:  # same values, fused
        return _FakeQuantSTE.apply(x, _broadcast(scale, x), _broadcast(zero_point, x),
                                   spec.qmin, spec.qmax)
    return dequantize(quantize_codes(x, spec, scale, zero_point, generator), scale, zero_point)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor,
                       spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that map the real range [lo, hi] onto [qmin, qmax].

    The range is widened to contain 0 (so that 0, ReLU's output and zero padding, is exact).
    Symmetric: z = 0 and s = max|.| / qmax (unsigned: s = hi / qmax). Asymmetric: s =
    (hi - lo) / (qmax - qmin), z = qmin - round(lo / s). Sign quantizer: s = max|.|.
    """
    lo = torch.minimum(torch.as_tensor(lo, dtype=torch.float32), torch.zeros(()))
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.float32), torch.zeros(()))
    tiny = torch.finfo(torch.float32).tiny * 2**30
    if spec.is_sign:
        return torch.maximum(torch.maximum(-lo, hi), torch.full_like(hi, tiny)), torch.zeros_like(hi)
    if not spec.signed:
        scale = torch.clamp(hi / spec.qmax, min=tiny)
        return scale, torch.zeros_like(scale)
    if spec.symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / spec.qmax, min=tiny)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (spec.qmax - spec.qmin), min=tiny)
    zero = torch.clamp(spec.qmin - round_half_up(lo / scale), spec.qmin, spec.qmax)
    return scale, zero
