"""A differentiable stochastic quantizer (SQ), after Farkya, Raghavan, Ziskind (arXiv 2312.00105).

The paper does not publish its SQ formula; this is ours. For an activation x, a clipping
range [lo, hi] and b bits (scale s = (hi - lo) / (2^b - 1)):

    u    = (clamp(x, lo, hi) - lo) / s                      in [0, 2^b - 1]
    q(x) = lo + s * (floor(u) + Bernoulli(u - floor(u)))    (stochastic rounding)

Unbiased: E[q(x)] = clamp(x, lo, hi), because E[floor(u) + Bernoulli(frac(u))] = u.
Gradient estimator: dq/dx = 1 for lo <= x <= hi and 0 outside (the straight-through
estimator of the clamp). Since E[q(x)] = clamp(x), this is exactly the derivative of the
*expected* output, so a gradient averaged over the noise (EOT) is the gradient of the
expected network layer by layer: an attacker that backpropagates through SQ with EOT is
given the right signal, not a masked one.

Randomness: every function takes a ``torch.Generator`` and every module owns one (given, or
its own seeded 0; :func:`sq_model` gives all its quantizers one shared generator, so layers
draw successive numbers of one stream), and :func:`qrobust.defenses.reseed` reseeds them all;
nothing here touches torch's global RNG. SQ stays random in eval mode: that is the defense
(``randomized = True``, attack it with EOT).
"""

from __future__ import annotations

import torch
from torch import nn

from qrobust.defenses.base import DEFENSES
from qrobust.errors import ConfigError


class _StochasticRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        low = torch.floor(u)
        noise = torch.rand(u.shape, generator=generator, dtype=u.dtype, device=u.device)
        return low + (noise < (u - low)).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def stochastic_round(u: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """floor(u) + Bernoulli(u - floor(u)): unbiased rounding to integers, gradient 1 (STE).

    ``u``: any float tensor. Same generator state, same result.
    """
    return _StochasticRound.apply(u, generator)


def stochastic_quantize(x: torch.Tensor, bits: int, lo: float, hi: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """SQ of ``x`` on 2^bits uniform levels in [lo, hi]; E[output] = clamp(x, lo, hi).

    Gradient: 1 inside [lo, hi], 0 outside. Output has the shape and dtype of ``x``.
    """
    if not 1 <= bits <= 16 or not hi > lo:
        raise ConfigError(f"stochastic quantizer needs 1 <= bits <= 16 and hi > lo, got bits={bits}, "
                          f"range [{lo}, {hi}]")
    scale = (hi - lo) / (2**bits - 1)
    u = (torch.clamp(x, lo, hi) - lo) / scale
    return lo + scale * stochastic_round(u, generator)


class StochasticQuantizer(nn.Module):
    """Clipped stochastic activation quantizer, random in train *and* eval mode.

    ``lo=0, hi=6`` makes it a stochastic ReLU6 quantizer (it replaces ReLU in :func:`sq_model`).
    """

    randomized = True

    def __init__(self, bits: int = 4, lo: float = 0.0, hi: float = 6.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 1 <= bits <= 16 or not hi > lo:
            raise ConfigError(f"StochasticQuantizer needs 1 <= bits <= 16 and hi > lo, got "
                              f"bits={bits}, range [{lo}, {hi}]")
        self.bits, self.lo, self.hi = bits, lo, hi
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gen = self.generator
        if x.device != gen.device:  # a CPU generator cannot draw on another device
            gen = None
        return stochastic_quantize(x, self.bits, self.lo, self.hi, gen)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, lo={self.lo}, hi={self.hi}"


def sq_model(model: nn.Module, bits: int = 4, hi: float = 6.0,
             generator: torch.Generator | None = None) -> nn.Module:
    """A copy of ``model`` with every ``nn.ReLU``/``nn.ReLU6`` replaced by a stochastic
    ReLU-``hi`` quantizer of ``bits`` bits, all drawing from ``generator`` (default: a new one
    seeded 0). The returned module has ``randomized = True``."""
    import copy

    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    out = copy.deepcopy(model)
    replaced = _replace_relus(out, lambda: StochasticQuantizer(bits, 0.0, hi, generator))
    if replaced == 0:
        raise ConfigError("sq_model found no nn.ReLU / nn.ReLU6 modules to replace; models must "
                          "use ReLU modules (not functional calls)")
    out.randomized = True
    out.differentiable = True
    return out


def _replace_relus(module: nn.Module, make) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU | nn.ReLU6):
            setattr(module, name, make())
            count += 1
        else:
            count += _replace_relus(child, make)
    return count


@DEFENSES.register("sq")
def sq_defense(model: nn.Module, bits: int = 4, hi: float = 6.0, seed: int | None = None) -> nn.Module:
    """Training-free SQ: a trained model's ReLUs become stochastic ReLU-``hi`` quantizers.

    ``seed``: of the SQ noise's generator (None: 0; studies reseed it per cell).
    (For trained SQ networks and ensembles see :mod:`qrobust.defenses.ensemble`.)
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return sq_model(model, bits=bits, hi=hi, generator=gen)
