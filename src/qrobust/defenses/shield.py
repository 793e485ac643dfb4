"""Stochastic-Shield (Qendro, Ha, de Jong, Maji 2021, arXiv 2105.06512), training-free.

An input filter in front of an already trained (quantized) model, plus Monte Carlo dropout
inserted into the model and kept on at inference, the class probabilities averaged over T
stochastic passes:

    shield(x) = log( 1/T sum_t softmax( model_with_dropout_t( filter(x) ) ) )

The paper fixes neither the filter, its size, the dropout rate and placement, nor T; all are
parameters here (defaults: 3x3 median filter, rate 0.1 before the classifier, T = 10; ours).
The result is a :class:`~qrobust.defenses.base.Defended` pipeline ``(filter, MC-dropout
model)``: it reports ``randomized = True`` (attack with EOT) and, for the bit-depth filter,
``differentiable = False`` (attack with BPDA: the filter is replaced by its ``surrogate()``,
the identity, on the backward pass; the median is attacked through its own exact gradient,
see :mod:`qrobust.defenses.filters`). Always report it under the
adaptive attack beside the plain one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qrobust.defenses.base import DEFENSES, Defended, defend, split_at_randomness
from qrobust.defenses.filters import FILTERS
from qrobust.defenses.mc_dropout import MCDropoutModel, insert_dropout
from qrobust.errors import ConfigError


def make_filter(name: str, size: int = 3, bits: int = 4, sigma: float | None = None) -> nn.Module:
    """An input filter by name: median / mean / gaussian (``size``, ``sigma``), bit-depth
    (``bits``), or ``none``."""
    if name == "none":
        return nn.Identity()
    if name not in FILTERS:
        raise ConfigError(f"unknown shield filter '{name}'; valid: {', '.join(sorted(FILTERS))}, none")
    if name == "bit-depth":
        return FILTERS[name](bits)
    if name == "gaussian":
        return FILTERS[name](size, sigma)
    return FILTERS[name](size)


class _ToFloat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def as_sequential(model: nn.Module) -> nn.Module:
    """An ``nn.Sequential`` of the same modules when ``model`` is a torch.fx GraphModule whose
    graph is a plain chain of sub-module calls (a quantized twin of a sequential model), so
    that the shield can run its deterministic prefix once; otherwise ``model`` itself."""
    graph = getattr(model, "graph", None)
    if graph is None or isinstance(model, nn.Sequential):
        return model
    nodes = list(graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return model
    chain, prev = [], nodes[0]
    for node in nodes[1:-1]:
        if node.args != (prev,) or node.kwargs or len(prev.users) != 1:
            return model
        if node.op == "call_module":
            chain.append((str(node.target).replace(".", "_"), model.get_submodule(str(node.target))))
        elif node.op == "call_method" and node.target == "float":  # the twin's float32 logits
            chain.append((f"to_float_{len(chain)}", _ToFloat()))
        else:
            return model
        prev = node
    if nodes[-1].args != (prev,):
        return model
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(chain)).train(model.training)


@DEFENSES.register("shield")
def stochastic_shield(model: nn.Module, filter: str = "median", size: int = 3, bits: int = 4,
                      sigma: float | None = None, rate: float = 0.1,
                      placement: str | Sequence[str] = "classifier", passes: int = 10,
                      seed: int | None = None) -> Defended:
    """Stochastic-Shield around a trained ``model`` (float, quantized twin, any nn.Module).

    ``filter``: median, mean, gaussian, bit-depth or none; ``rate``: dropout probability in
    [0, 1) inserted at ``placement`` (classifier, linear, relu or a list of module names);
    ``passes``: T; ``seed``: seeds the dropout masks' generator (None: 0). Input
    (N, C, H, W) in [0, 1] -> (N, classes) log mean probabilities. ``model`` is not modified.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    dropped = insert_dropout(as_sequential(model), rate, placement, gen)
    split = split_at_randomness(dropped)
    if split is None:
        return defend(MCDropoutModel(dropped, passes), make_filter(filter, size, bits, sigma))
    # same function, cheaper: the deterministic layers before the first dropout run once, and
    # only the rest runs T times (and n times under EOT, which splits at the first random layer)
    prefix, rest = split
    return Defended(make_filter(filter, size, bits, sigma), prefix, MCDropoutModel(rest, passes))
