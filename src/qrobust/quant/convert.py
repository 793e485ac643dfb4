"""``quantize(model, recipe, calib)`` -> the fake-quant twin; ``to_integer(twin)`` -> IntegerModel.

The float model is traced with torch.fx (``Normalize`` and the quantized modules are leaves),
then rewritten, in this order:

1. BatchNorm2d is folded into the preceding conv (eval statistics) before quantization.
2. If activations are quantized, ``Normalize`` becomes :class:`QuantInput` (8-bit pixel codes
   with integer zero point round(255 mean)) and ``1/std`` is folded into the first conv/linear.
   Weight-only recipes (``w3``, ``gorsline4``) keep ``Normalize`` and float activations.
3. Conv2d / Linear become QuantConv2d / QuantLinear (weights fake-quantized on the fly).
4. An activation quantizer :class:`QuantAct` is inserted wherever the integer model
   materialises a tensor: after every ReLU (unsigned), after every conv/linear whose output is
   not consumed by a ReLU and is not the model output (e.g. the residual branch before an add;
   signed), after additions not followed by a ReLU and after average pooling. Max-pooling,
   flatten and dropout act on codes directly. The logits are never requantized.

PTQ: ``calib`` images run once through the twin with the activation quantizers observing
(float activations); each quantizer's observer then sets its scale and zero point.
QAT: train the returned twin with ``qrobust.train.train`` (STE gradients; activation scales
stay frozen at their calibrated values, weight scales follow the weights).
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Iterable
from dataclasses import replace

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from qrobust.errors import ConfigError
from qrobust.models import Normalize
from qrobust.progress import bar as progress_bar
from qrobust.quant.modules import PIXEL_LEVELS, QuantAct, QuantConv2d, QuantInput, QuantLinear
from qrobust.quant.spec import QuantSpec, Recipe, parse_recipe

log = logging.getLogger(__name__)

LAYERS = (nn.Conv2d, nn.Linear)
PASS_THROUGH = (nn.Dropout, nn.Identity)
SHAPE_OPS = (nn.MaxPool2d, nn.Flatten, *PASS_THROUGH)
ADD_TARGETS = (operator.add, torch.add, operator.iadd)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Normalize, QuantInput, QuantAct)) or super().is_leaf_module(m, qualname)


class QuantTwin(fx.GraphModule):
    """The fake-quant twin: a GraphModule with ``recipe`` and ``input_shape`` (C, H, W)."""

    @property
    def recipe(self) -> Recipe:
        return self.meta["recipe"]

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        return self.meta.get("input_shape")


def trace(model: nn.Module) -> fx.GraphModule:
    """A GraphModule of ``model`` with Normalize and quantized modules kept as leaves."""
    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except Exception as err:  # noqa: BLE001 - fx raises many kinds of errors
        raise ConfigError(f"cannot trace {type(model).__name__} with torch.fx ({err}); quantize "
                          "supports models built from modules without data-dependent control "
                          "flow") from err


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is(gm: fx.GraphModule, node: fx.Node, kinds: type | tuple[type, ...]) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), kinds)


def _is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in ADD_TARGETS


def _set_module(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def fold_batchnorm(gm: fx.GraphModule) -> None:
    """Fold every BatchNorm2d that directly follows a conv (used only there) into the conv."""
    for node in list(gm.graph.nodes):
        if not _is(gm, node, nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and _is(gm, src, nn.Conv2d) and len(src.users) == 1):
            raise ConfigError(f"BatchNorm '{node.target}' does not follow a conv; only conv+BN "
                              "pairs can be folded for quantization")
        conv, bn = gm.get_submodule(src.target), gm.get_submodule(node.target)
        _set_module(gm, src.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        _set_module(gm, node.target, nn.Identity())
    gm.graph.lint()
    gm.recompile()


def _layer_consumers(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """Conv/linear nodes fed by ``node`` through shape-only ops (pool, flatten, dropout)."""
    out: list[fx.Node] = []
    for user in node.users:
        if _is(gm, user, LAYERS):
            out.append(user)
        elif _is(gm, user, SHAPE_OPS):
            out.extend(_layer_consumers(gm, user))
    return out


def _fold_input(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace Normalize by QuantInput and fold 1/std into the layers it feeds."""
    norm = gm.get_submodule(node.target)
    mean, std = norm.mean.reshape(-1), norm.std.reshape(-1)
    zero = torch.round(mean * PIXEL_LEVELS)
    consumers = _layer_consumers(gm, node)
    if not consumers or any(len(c.args) != 1 for c in consumers):
        raise ConfigError("Normalize must feed conv/linear layers (through flatten/pooling) to be "
                          "folded into them")
    with torch.no_grad():
        for c in consumers:
            layer = gm.get_submodule(c.target)
            if isinstance(layer, nn.Conv2d):
                layer.weight.div_(std.view(1, -1, 1, 1))
            else:
                per_feature = std.repeat_interleave(layer.in_features // std.numel())
                layer.weight.div_(per_feature.view(1, -1))
    _set_module(gm, node.target, QuantInput(zero))


def _insert_after(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module) -> fx.Node:
    gm.get_submodule("aq").add_module(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(f"aq.{name}", (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return new


def _nonneg(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when ``node``'s output is >= 0 by construction (ReLU, or pooling/reshaping of it)."""
    if _is(gm, node, (nn.ReLU, nn.ReLU6)):
        return True
    if _is(gm, node, QuantAct):
        return not gm.get_submodule(node.target).spec.signed
    if _is(gm, node, (*SHAPE_OPS, nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        return isinstance(node.args[0], fx.Node) and _nonneg(gm, node.args[0])
    return False


def _needs_act_quant(gm: fx.GraphModule, node: fx.Node) -> bool:
    if _is(gm, node, (nn.ReLU, nn.ReLU6, nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        return True
    if _is(gm, node, LAYERS) or _is_add(node):
        users = list(node.users)
        to_output = any(u.op == "output" for u in users)
        only_relu = all(_is(gm, u, (nn.ReLU, nn.ReLU6)) for u in users)
        return not to_output and not only_relu
    return False


def _act_name(node: fx.Node) -> str:
    return str(node.target if node.op == "call_module" else node.name).replace(".", "_")


def layer_names(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """Conv/linear module names of a traced model -> aliases ('first', 'last')."""
    layers = [n for n in gm.graph.nodes if _is(gm, n, LAYERS)]
    aliases: dict[str, tuple[str, ...]] = {str(n.target): () for n in layers}
    if layers:
        first, last = str(layers[0].target), str(layers[-1].target)
        aliases[first] = (*aliases[first], "first")
        aliases[last] = (*aliases[last], "last")
    return aliases


def _check_overrides(recipe: Recipe, names: Iterable[str]) -> None:
    valid = {"first", "last", *names}
    for o in recipe.overrides:
        if o.layer not in valid:
            raise ConfigError(f"recipe {recipe.text!r}: no conv/linear layer named '{o.layer}'; "
                              f"valid: {', '.join(sorted(valid))}")


def _act_spec_for(gm: fx.GraphModule, node: fx.Node, recipe: Recipe,
                  aliases: dict[str, tuple[str, ...]]) -> QuantSpec:
    specs = [recipe.act_spec(str(c.target), aliases.get(str(c.target), ()))
             for c in _layer_consumers(gm, node)]
    specs = [s for s in specs if s is not None] or [recipe.act]
    spec = max(specs, key=lambda s: s.bits)
    return replace(spec, signed=not _nonneg(gm, node))


def _input_quantizer(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The quantizer whose codes reach ``node`` through shape-only ops, if any."""
    while isinstance(node, fx.Node) and _is(gm, node, SHAPE_OPS):
        node = node.args[0]
    if isinstance(node, fx.Node) and _is(gm, node, (QuantAct, QuantInput)):
        return gm.get_submodule(node.target)
    return None


def _float32_output(gm: fx.GraphModule) -> None:
    """Cast the logits to float32 (inside the twin, layers hand float64 to their quantizers)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        cast = gm.graph.call_method("float", (out.args[0],))
    out.args = (cast,)


def _link_inputs(gm: fx.GraphModule) -> None:
    """Give each quantized layer a (non-owning) reference to its input quantizer."""
    for node in gm.graph.nodes:
        if _is(gm, node, (QuantConv2d, QuantLinear)):
            q = _input_quantizer(gm, node.args[0])
            gm.get_submodule(node.target).input_quant = [q] if q is not None else []


def quantize(model: nn.Module, recipe: str | Recipe, calib: torch.Tensor | None = None,
             batch_size: int = 256, input_shape: tuple[int, int, int] | None = None,
             progress: bool | None = None) -> QuantTwin:
    """The fake-quant twin of ``model`` (a new module; ``model`` is not changed).

    ``model``: a float model taking images in [0, 1], shape (N, C, H, W), whose first layer is
    ``Normalize`` (for quantized activations). ``recipe``: a string such as ``"w4a8"`` or a
    :class:`Recipe`. ``calib``: float images in [0, 1] (a few hundred) to calibrate activation
    quantizers (PTQ); may be None for weight-only recipes or to build a skeleton whose
    buffers are then loaded from a checkpoint. ``twin.meta`` records the recipe and the
    input shape (C, H, W) (taken from ``calib`` when given) for the ONNX backend. Returns a GraphModule in eval mode:
    images -> logits, STE gradients, deterministic in eval mode.
    """
    recipe = parse_recipe(recipe)
    float_model = copy.deepcopy(model).eval()
    gm = trace(float_model)
    fold_batchnorm(gm)
    aliases = layer_names(gm)
    _check_overrides(recipe, aliases)
    if recipe.act is not None:
        norms = [n for n in gm.graph.nodes if _is(gm, n, Normalize)]
        if len(norms) != 1:
            raise ConfigError("quantized activations need exactly one Normalize layer (the "
                              f"model's first layer), found {len(norms)}")
        _fold_input(gm, norms[0])
    for node in gm.graph.nodes:
        if _is(gm, node, nn.Conv2d):
            name = str(node.target)
            spec = recipe.weight_spec(name, aliases[name])
            _set_module(gm, name, QuantConv2d.from_float(gm.get_submodule(name), spec,
                                                         recipe.quantize_bias))
        elif _is(gm, node, nn.Linear):
            name = str(node.target)
            spec = recipe.weight_spec(name, aliases[name])
            _set_module(gm, name, QuantLinear.from_float(gm.get_submodule(name), spec,
                                                         recipe.quantize_bias))
    if recipe.act is not None:
        gm.add_module("aq", nn.Module())
        for node in list(gm.graph.nodes):
            if _needs_act_quant(gm, node):
                spec = _act_spec_for(gm, node, recipe, aliases)
                _insert_after(gm, node, _act_name(node), QuantAct(spec))
    if recipe.act is not None:
        _float32_output(gm)
    gm.graph.lint()
    twin = QuantTwin(gm, gm.graph)
    if recipe.act is not None:
        _link_inputs(twin)
    twin.meta["recipe"] = recipe  # GraphModule.meta survives deepcopy
    twin.meta["input_shape"] = None if input_shape is None else tuple(input_shape)
    twin.eval()
    if calib is not None:
        twin.meta["input_shape"] = tuple(calib.shape[1:])
        calibrate(twin, calib, batch_size, progress)
    return twin


def set_generator(twin: nn.Module, generator: torch.Generator | None) -> nn.Module:
    """Drive the stochastic rounding of ``twin``'s quantizers (training mode only) with
    ``generator``; without one, 'stochastic' recipes round to nearest."""
    for m in twin.modules():
        if isinstance(m, (QuantAct, QuantConv2d, QuantLinear)):
            m.generator = generator
    return twin


@torch.no_grad()
def calibrate(twin: nn.Module, images: torch.Tensor, batch_size: int = 256,
              progress: bool | None = None) -> nn.Module:
    """Set every activation quantizer's scale/zero point from ``images`` (float [0, 1] NCHW)."""
    quantizers = [m for m in twin.modules() if isinstance(m, QuantAct)]
    was_training = twin.training
    twin.eval()
    for q in quantizers:
        q.observing, q._seen = True, []
    try:
        for start in progress_bar(range(0, len(images), batch_size), desc="calibrate",
                                  unit="batch", progress=progress):
            twin(images[start:start + batch_size])
    finally:
        for q in quantizers:
            q.finish_calibration()
    twin.train(was_training)
    log.info("calibrated %d activation quantizers on %d images", len(quantizers), len(images))
    return twin


def widen_input(twin: nn.Module, low: float, high: float) -> nn.Module:
    """A copy of ``twin`` whose input quantizer covers pixel values in about [low, high]
    instead of [0, 1] (:meth:`QuantInput.widen`), e.g. noisy images for smoothing: its integer
    model then takes pixel codes from about 255 low to 255 high, at a coarser step."""
    inputs = [m for m in twin.modules() if isinstance(m, QuantInput)]
    if len(inputs) != 1:
        raise ConfigError("widen_input needs a quantized twin with its one input quantizer")
    wide = copy.deepcopy(twin)
    next(m for m in wide.modules() if isinstance(m, QuantInput)).widen(low, high)
    return wide
