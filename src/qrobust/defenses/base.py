"""The Defense protocol, the ``DEFENSES`` registry and helpers that read defense attributes.

A defense is either an input-space transform ``x -> x'`` (images in [0, 1], shape (N, C, H, W))
placed in front of a model, ``Sequential(defense, model)``, or a module wrapper. Every defense
module declares two attributes that evaluators read to pick an adaptive attack by themselves
(Athalye, Carlini, Wagner 2018, arXiv 1802.00420):

- ``randomized``: the output is random even in eval mode -> attack with EOT over the randomness;
- ``differentiable``: autograd gives useful gradients -> if False, attack with BPDA through
  ``surrogate()``, a differentiable module approximating the defense's forward pass.

Modules without the attributes count as deterministic and differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import fx, nn

from qrobust.registry import Registry


@runtime_checkable
class Defense(Protocol):
    """An input-space (or module-wrapping) defense; see the module docstring."""

    randomized: bool
    differentiable: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def surrogate(self) -> nn.Module: ...


# name -> factory(model, **params) -> defended nn.Module with .randomized / .differentiable
DEFENSES: Registry[Callable[..., nn.Module]] = Registry("defense")


def is_randomized(model: object) -> bool:
    """True when ``model`` or any of its sub-modules declares ``randomized = True``."""
    modules = model.modules() if isinstance(model, nn.Module) else [model]
    return any(bool(getattr(m, "randomized", False)) for m in modules)


def generators(model: object) -> list[torch.Generator]:
    """The distinct ``generator`` attributes of ``model``'s modules, in module order."""
    modules = model.modules() if isinstance(model, nn.Module) else [model]
    found: dict[int, torch.Generator] = {}
    for m in modules:
        gen = getattr(m, "generator", None)
        if isinstance(gen, torch.Generator):
            found.setdefault(id(gen), gen)
    return list(found.values())


def reseed(model: object, seed: int) -> int:
    """Seed every generator of ``model``'s randomized modules from ``seed`` (the k-th distinct
    one with ``seed + k``), so its draws depend on ``seed`` alone, not on what ran before; the
    global RNG is not touched. Returns how many were seeded."""
    gens = generators(model)
    for k, gen in enumerate(gens):
        gen.manual_seed((seed + k) % (2**63 - 1))
    return len(gens)


def is_differentiable(model: object) -> bool:
    """False when ``model`` or any sub-module declares ``differentiable = False``."""
    modules = model.modules() if isinstance(model, nn.Module) else [model]
    return all(getattr(m, "differentiable", True) is not False for m in modules)


def bpda_targets(model: nn.Module) -> list[nn.Module]:
    """The outermost sub-modules that declare ``differentiable = False`` and offer a
    ``surrogate()``: the layers BPDA replaces on the backward pass."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        if getattr(m, "differentiable", True) is False and callable(getattr(m, "surrogate", None)):
            found.append(m)
            return
        for child in m.children():
            visit(child)

    visit(model)
    return found


class Defended(nn.Sequential):
    """``Sequential(*defenses, model)`` whose ``randomized`` / ``differentiable`` attributes are
    read from its parts, so evaluators pick EOT and/or BPDA for the whole pipeline."""

    @property
    def randomized(self) -> bool:
        return any(is_randomized(m) for m in self)

    @property
    def differentiable(self) -> bool:
        return all(is_differentiable(m) for m in self)


def apply_defense(model: object, name: str, params: dict) -> object:
    """``DEFENSES.get(name)(model, **params)`` (a defense by config name); ``none``: ``model``."""
    return model if name == "none" else DEFENSES.get(name)(model, **params)


def defend(model: nn.Module, *defenses: nn.Module) -> Defended:
    """Input defenses applied in order, then ``model``: ``defend(model, median, bits)``."""
    return Defended(*defenses, model)


def split_at_randomness(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(prefix, rest)`` with ``model(x) == rest(prefix(x))`` and ``prefix`` deterministic,
    when ``model`` is an ``nn.Sequential`` whose randomness starts at child ``i >= 1``; else
    None. Batched EOT runs ``prefix`` once and only ``rest`` on the n replicated copies.
    A torch.fx ``GraphModule`` (a quantized twin) is split by :func:`_split_graph`."""
    if isinstance(model, fx.GraphModule):
        return _split_graph(model)
    if not isinstance(model, nn.Sequential):
        return None
    children = _flatten(model)
    first = next((i for i, m in enumerate(children) if is_randomized(m)), None)
    if not first:  # None (not random) or 0 (random from the first layer)
        return None
    return nn.Sequential(*children[:first]), nn.Sequential(*children[first:])


def _flatten(seq: nn.Sequential) -> list[nn.Module]:
    """Children of nested Sequentials in execution order (a randomized Sequential is opened up
    too, so that the split lands on its first random leaf)."""
    out: list[nn.Module] = []
    for m in seq:
        out.extend(_flatten(m) if isinstance(m, nn.Sequential) else [m])
    return out


def _split_graph(model: fx.GraphModule) -> tuple[nn.Module, nn.Module] | None:
    """Split a GraphModule at the input ``h`` of its first randomized sub-module call, when
    every later node reads only ``h`` or later values (a residual network with dropout before
    its classifier: the whole body is the prefix); else None."""
    nodes = list(model.graph.nodes)
    first = next((i for i, n in enumerate(nodes) if n.op == "call_module"
                  and is_randomized(model.get_submodule(str(n.target)))), None)
    if first is None or len(nodes[first].all_input_nodes) != 1:
        return None
    h = nodes[first].all_input_nodes[0]
    cut = nodes.index(h)
    later = set(nodes[cut:])
    if h.op == "placeholder" or any(a not in later for n in nodes[cut + 1:]
                                    for a in n.all_input_nodes):
        return None
    prefix, rest = fx.Graph(), fx.Graph()
    env: dict = {}
    for n in nodes[:cut + 1]:
        env[n] = prefix.node_copy(n, env.__getitem__)
    prefix.output(env[h])
    env = {h: rest.placeholder("h")}
    for n in nodes[cut + 1:]:
        env[n] = rest.node_copy(n, env.__getitem__)
    return (fx.GraphModule(model, prefix).train(model.training),
            fx.GraphModule(model, rest).train(model.training))
