"""Interval bound propagation through a fake-quant twin (QA-IBP, Lechner et al., AAAI 2023,
arXiv 2211.16187), differentiable, for certified training.

:func:`interval_forward` runs the twin's graph on pairs (lower, upper) of tensors. Quantized
layers bound their integer accumulator with the positive and negative parts of the integer
weight codes, ``acc_lo = conv(q_lo, w+) + conv(q_hi, w-)``, on the same input codes and the
same exact accumulator as the forward pass (so the bounds follow the integer model, rounding
included); every other op of the zoo's and users' image models (input and activation
quantizers, a float model's Normalize, ReLU / clamps, pooling, flatten, add, concat, lookup
functions such as sigmoid) is non-decreasing in each input and is applied to both ends.
Gradients flow through the STE of every rounding, as in QAT. Ops that are not monotone (a
product of two activations, ...) are refused by name.

These are training bounds (float, STE); proofs come from :mod:`qrobust.verify`, which bounds
the lowered integer program exactly.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError
from qrobust.models import Normalize
from qrobust.quant.modules import QuantAct, QuantConv2d, QuantInput, QuantLinear

# modules and functions that are non-decreasing in every input: bounds map to bounds
MONOTONE_MODULES = (QuantInput, QuantAct, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool2d,
                    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout,
                    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh)
MONOTONE_FUNCTIONS = (operator.add, torch.add, operator.iadd, torch.flatten, torch.relu, F.relu,
                      F.relu6, F.hardtanh, torch.clamp, F.max_pool2d, F.avg_pool2d,
                      F.adaptive_avg_pool2d, torch.cat, torch.concat, torch.sigmoid, F.hardswish,
                      F.hardsigmoid, torch.tanh, operator.getitem)
MONOTONE_METHODS = ("view", "reshape", "flatten", "float", "double", "relu", "clamp",
                    "contiguous", "sigmoid", "tanh")
SHAPE_METHODS = ("size", "dim")


class Bounds:
    """A pair of tensors (lower, upper) travelling through the graph."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.lo, self.hi = lo, hi


def _ends(args: Any, end: str) -> Any:
    """args with every Bounds replaced by its lower or upper end (lists and tuples too)."""
    if isinstance(args, Bounds):
        return getattr(args, end)
    if isinstance(args, (list, tuple)):
        return type(args)(_ends(a, end) for a in args)
    if isinstance(args, dict):
        return {k: _ends(v, end) for k, v in args.items()}
    return args


def _both(fn, args, kwargs) -> Bounds:
    return Bounds(fn(*_ends(args, "lo"), **_ends(kwargs, "lo")),
                  fn(*_ends(args, "hi"), **_ends(kwargs, "hi")))


def _layer(module: QuantConv2d | QuantLinear | nn.Conv2d | nn.Linear, x: Bounds) -> Bounds:
    """Bounds of a (quantized) linear layer: positive weights take the lower input to the
    lower output, negative weights the upper one."""
    if isinstance(module, (QuantConv2d, QuantLinear)) and module._exact():
        lo, w, s_acc = module._operands(x.lo)
        hi, _, _ = module._operands(x.hi)
        op = (F.linear if isinstance(module, QuantLinear) else
              lambda a, b: F.conv2d(a, b, None, module.stride, module.padding, 1, module.groups))
        pos, neg = w.clamp(min=0), w.clamp(max=0)
        return Bounds(module._finish(op(lo, pos) + op(hi, neg), s_acc),
                      module._finish(op(hi, pos) + op(lo, neg), s_acc))
    w = module.quant_weight() if isinstance(module, (QuantConv2d, QuantLinear)) else module.weight
    b = module.quant_bias() if isinstance(module, (QuantConv2d, QuantLinear)) else module.bias
    if isinstance(module, nn.Linear):
        op = F.linear
    else:
        op = lambda a, wt, bias=None: F.conv2d(a, wt, bias, module.stride, module.padding,  # noqa: E731
                                               1, module.groups)
    mid, rad = (x.hi + x.lo) / 2, (x.hi - x.lo) / 2
    centre, spread = op(mid, w, b), op(rad, w.abs())
    return Bounds(centre - spread, centre + spread)


class _IntervalInterpreter(fx.Interpreter):
    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return _layer(module, args[0])
        if isinstance(module, MONOTONE_MODULES) or (
                isinstance(module, Normalize) and bool((module.std > 0).all())):
            return _both(module, args, kwargs)
        raise ConfigError(f"interval bounds: module {target} ({type(module).__name__}) is not "
                          f"supported; supported: conv, linear, {_names(MONOTONE_MODULES)}")

    def call_function(self, target, args, kwargs):
        if target in MONOTONE_FUNCTIONS:
            return _both(target, args, kwargs)
        raise ConfigError(f"interval bounds: function {getattr(target, '__name__', target)} is "
                          "not monotone in every input (a product of activations?); QA-IBP "
                          "supports conv, linear, add, concat, pooling and activations")

    def call_method(self, target, args, kwargs):
        if target in SHAPE_METHODS:
            return getattr(_ends(args[0], "lo"), target)(*_ends(args[1:], "lo"))
        if target in MONOTONE_METHODS:
            return _both(lambda t, *a, **k: getattr(t, target)(*a, **k), args, kwargs)
        raise ConfigError(f"interval bounds: method .{target}() is not supported")


def _names(types) -> str:
    return ", ".join(t.__name__ for t in types)


def interval_forward(twin: fx.GraphModule, lo: torch.Tensor, hi: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds of ``twin``'s outputs over the box ``[lo, hi]`` of images
    (N, C, H, W) in [0, 1]; differentiable with respect to the twin's weights."""
    out, _ = _interpret(twin, lo, hi)
    return out.lo, out.hi


def _interpret(twin: fx.GraphModule, lo: torch.Tensor, hi: torch.Tensor, keep: bool = False
               ) -> tuple[Bounds, _IntervalInterpreter]:
    """The output bounds and the interpreter that made them (``keep``: with every node's
    bounds still in its ``env``)."""
    if not isinstance(twin, fx.GraphModule):
        raise ConfigError("interval bounds need a quantized twin (qrobust.quant.quantize)")
    if bool((lo > hi).any()):
        raise ConfigError("interval bounds: a lower bound exceeds its upper bound")
    run = _IntervalInterpreter(twin, garbage_collect_values=not keep)
    return run.run(Bounds(lo, hi)), run


# ops between the last linear layer and the output that leave the values unchanged
PASS_THROUGH_METHODS = ("float", "double", "contiguous")


def _final_linear(twin: fx.GraphModule) -> fx.Node | None:
    """The node of the last (quantized) linear layer when the logits are its output, unchanged
    but for dtype casts; None otherwise."""
    node = next(n for n in twin.graph.nodes if n.op == "output").args[0]
    while isinstance(node, fx.Node) and (
            node.op == "call_method" and node.target in PASS_THROUGH_METHODS
            or node.op == "call_module" and isinstance(twin.get_submodule(node.target), nn.Identity)):
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "call_module" and isinstance(
            twin.get_submodule(node.target), nn.Linear) and len(node.args) == 1:
        return node
    return None


def _affine(module: nn.Linear, x: Bounds) -> tuple[Bounds, torch.Tensor, torch.Tensor]:
    """The layer as ``x @ W.T + b`` on the operands it really multiplies: input codes and
    code-unit weights (accumulator scale folded in, float64) when exact, float otherwise."""
    if isinstance(module, QuantLinear) and module._exact():
        lo, w, s_acc = module._operands(x.lo)
        hi, _, _ = module._operands(x.hi)
        weight = w.double() * s_acc[:, None]
        bias = (torch.zeros_like(s_acc) if module.bias is None
                else module._finish(torch.zeros(1, len(s_acc), dtype=torch.float64), s_acc)[0])
        return Bounds(lo.double(), hi.double()), weight, bias
    w = module.quant_weight() if isinstance(module, QuantLinear) else module.weight
    b = module.quant_bias() if isinstance(module, QuantLinear) else module.bias
    return x, w, torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b


def margin_lower_bounds(twin: fx.GraphModule, lo: torch.Tensor, hi: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
    """Lower bounds (N, classes) of ``logit[y] - logit[k]`` over the box (0 at k = y), with
    the last linear layer elided (Gowal et al., arXiv 1810.12715, sec. 3): the interval of its
    input is pushed through the difference of the two weight rows, so what the two logits
    share cancels. Tighter than ``lo[y] - hi[k]``; falls back to that when the logits are not
    a linear layer's output."""
    out, run = _interpret(twin, lo, hi, keep=True)
    final = _final_linear(twin)
    if final is None:
        return out.lo.gather(1, y[:, None]) - out.hi
    x, weight, bias = _affine(twin.get_submodule(final.target), run.env[final.args[0]])
    diff = weight[y][:, None, :] - weight[None]  # (N, classes, features)
    margin = (torch.einsum("nkf,nf->nk", diff.clamp(min=0), x.lo.flatten(1).to(diff.dtype))
              + torch.einsum("nkf,nf->nk", diff.clamp(max=0), x.hi.flatten(1).to(diff.dtype)))
    return margin + bias[y][:, None] - bias[None]


def worst_case_logits(lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The IBP worst case (Gowal et al., arXiv 1810.12715): every other class at its upper
    bound, the label at its lower bound."""
    return torch.where(F.one_hot(y, hi.shape[1]).bool(), lo, hi)
