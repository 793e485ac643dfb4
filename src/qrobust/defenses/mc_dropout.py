"""Monte Carlo dropout as a training-free defense (the stochastic half of Stochastic-Shield,
Qendro et al., arXiv 2105.06512; MC dropout: Gal & Ghahramani, arXiv 1506.02142).

``insert_dropout`` puts dropout layers into a copy of an already trained model at a chosen
placement and rate; the layers stay on in eval mode. ``MCDropoutModel`` averages the class
probabilities of T stochastic passes, which run as one batch of T x N images. Rate, placement
and T are parameters: the paper does not fix them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from qrobust.defenses.base import DEFENSES, split_at_randomness
from qrobust.errors import ConfigError

PLACEMENTS = ("classifier", "linear", "relu")


class MCDropout(nn.Module):
    """Inverted dropout that is active in train *and* eval mode; masks come from ``generator``
    (given, or its own seeded 0; drawn on its device and moved to the input's), never from
    torch's global RNG."""

    randomized = True
    differentiable = True

    def __init__(self, p: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout rate must be in [0, 1), got {p}")
        self.p = float(p)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return x
        u = torch.rand(x.shape, generator=self.generator,
                       device=self.generator.device).to(x.device, x.dtype)
        return x * (u >= self.p).to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _targets(model: nn.Module, placement: str | Sequence[str]) -> list[tuple[str, bool]]:
    """(module name, insert before?) pairs for a placement."""
    named = list(model.named_modules())
    if isinstance(placement, str):
        if placement == "classifier":
            linears = [n for n, m in named if isinstance(m, nn.Linear)]
            return [(linears[-1], True)] if linears else []
        if placement == "linear":
            return [(n, True) for n, m in named if isinstance(m, nn.Linear)]
        if placement == "relu":
            return [(n, False) for n, m in named if isinstance(m, nn.ReLU | nn.ReLU6)]
        raise ConfigError(f"unknown dropout placement '{placement}'; valid: "
                          f"{', '.join(PLACEMENTS)} or a list of module names")
    names = dict(named)
    missing = [n for n in placement if n not in names or n == ""]
    if missing:
        raise ConfigError(f"modules {missing} not found in the model; valid names: "
                          f"{[n for n, _ in named if n][:20]}")
    return [(n, False) for n in placement]


def insert_dropout(model: nn.Module, rate: float, placement: str | Sequence[str] = "classifier",
                   generator: torch.Generator | None = None) -> nn.Module:
    """A copy of ``model`` (weights shared by value, the original untouched) with ``MCDropout``
    layers inserted: before the last ``nn.Linear`` ("classifier"), before every linear layer
    ("linear"), after every ReLU ("relu"), or after each named module. All inserted layers draw
    from ``generator`` (default: a new one seeded 0)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    out = copy.deepcopy(model)
    targets = _targets(out, placement)
    if not targets:
        raise ConfigError(f"placement {placement!r} matches no module of this model")
    for name, before in targets:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name)
        old = getattr(parent, child)
        drop = MCDropout(rate, generator)
        setattr(parent, child, nn.Sequential(drop, old) if before else nn.Sequential(old, drop))
    return out.eval()


class MCDropoutModel(nn.Module):
    """log of the mean softmax over ``passes`` stochastic passes of ``model``:
    x (N, C, H, W) in [0, 1] -> (N, K) log-probabilities (use them as logits)."""

    randomized = True
    differentiable = True

    def __init__(self, model: nn.Module, passes: int = 10) -> None:
        super().__init__()
        if passes < 1:
            raise ConfigError(f"passes (T) must be >= 1, got {passes}")
        self.model = model
        self.passes = passes
        # the deterministic layers before the first dropout run once, not T times
        self._split = split_at_randomness(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[0], self.passes
        prefix, rest = self._split if self._split is not None else (None, self.model)
        h = prefix(x) if prefix is not None else x
        reps = h.unsqueeze(0).expand(t, *h.shape).reshape(t * n, *h.shape[1:])
        logp = torch.log_softmax(rest(reps), dim=-1).view(t, n, -1)
        return torch.logsumexp(logp, dim=0) - math.log(self.passes)


@DEFENSES.register("mc-dropout")
def mc_dropout(model: nn.Module, rate: float = 0.1, placement: str | Sequence[str] = "classifier",
               passes: int = 10, seed: int | None = None) -> nn.Module:
    """Stochastic defense: dropout inserted at ``placement``, ``passes`` passes averaged."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return MCDropoutModel(insert_dropout(model, rate, placement, gen), passes)
