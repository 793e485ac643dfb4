"""``quantize(model, recipe, calib)`` -> the fake-quant twin; ``to_integer(twin)`` -> IntegerModel.

The float model is traced with torch.fx (``Normalize`` and the quantized modules are leaves),
then rewritten, in this order:

1. BatchNorm2d is folded into the preceding conv (eval statistics) before quantization.
2. If activations are quantized, ``Normalize`` becomes :class:`QuantInput` (8-bit pixel codes
   with integer zero point round(255 mean)) and ``1/std`` is folded into the first conv/linear.
   A model without qrobust's ``Normalize`` (the user's own torch model) gets one in front,
   built from ``input_mean`` / ``input_std``: the normalization its inputs were trained with.
   Weight-only recipes (``w3``, ``gorsline4``) keep ``Normalize`` and float activations.
3. Conv2d / Linear become QuantConv2d / QuantLinear (weights fake-quantized on the fly).
4. An activation quantizer :class:`QuantAct` is inserted wherever the integer model
   materialises a tensor: after every clamp (ReLU, ReLU6, Hardtanh: unsigned when the lower
   bound is >= 0), after every conv/linear whose output is not consumed by a clamp and is not
   the model output (e.g. the residual branch before an add; signed), after additions and
   elementwise products (``x * gate``) not followed by a clamp, after average pooling, after a
   channel concatenation (one shared scale; a conv/add/clamp whose only users are
   concatenations gets no quantizer of its own) and after an elementwise function (Hardswish,
   Hardsigmoid, Sigmoid, SiLU, Tanh; its input is quantized too, and the integer model looks
   its output codes up in a table over the input codes). Max-pooling, flatten and dropout act
   on codes directly. The logits are never requantized. Functional clamps (``F.relu``,
   ``torch.relu``, ``F.relu6``, ``F.hardtanh``, ``torch.clamp`` with constant bounds),
   ``torch.flatten`` / ``x.view(x.size(0), -1)`` and functional hard-swish / sigmoid / tanh
   are first rewritten into the equivalent modules.

PTQ: ``calib`` images run once through the twin with the activation quantizers observing
(float activations); each quantizer's observer then sets its scale and zero point.
QAT: train the returned twin with ``qrobust.train.train`` (STE gradients; activation scales
stay frozen at their calibrated values, weight scales follow the weights).
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn.functional as F
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
MUL_TARGETS = (operator.mul, torch.mul, operator.imul)
CAT_TARGETS = (torch.cat, torch.concat, torch.concatenate)
CLAMPS = (nn.ReLU, nn.Hardtanh)  # nn.ReLU6 is a Hardtanh(0, 6)
# elementwise functions of one quantized tensor: lowered to a lookup table over its codes
LOOKUP = (nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.Tanh)
NONNEG_LOOKUP = (nn.Hardsigmoid, nn.Sigmoid)
_LOOKUP_FUNCTIONS = {F.hardswish: nn.Hardswish, F.hardsigmoid: nn.Hardsigmoid,
                     torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid, F.silu: nn.SiLU,
                     torch.tanh: nn.Tanh, F.tanh: nn.Tanh}
_LOOKUP_METHODS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
INPUT_NORM = "input_norm"  # module name of the Normalize built from input_mean / input_std


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


def is_mul(node: fx.Node) -> bool:
    """An elementwise product of two tensors (broadcasting), e.g. a squeeze-excite gate."""
    return (node.op == "call_function" and node.target in MUL_TARGETS and len(node.args) == 2
            and all(isinstance(a, fx.Node) for a in node.args))


def cat_inputs(node: fx.Node) -> tuple[list[fx.Node], int] | None:
    """(inputs, dim) of a ``torch.cat`` node, None for any other node."""
    if node.op != "call_function" or node.target not in CAT_TARGETS:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return list(tensors), int(dim)  # type: ignore[arg-type]


def _clamp_bounds(node: fx.Node) -> tuple[float, float] | None:
    """Constant (min, max) of a functional clamp (relu, relu6, hardtanh, clamp), else None."""
    kw = node.kwargs
    if node.op == "call_function" and node.target in (F.relu, torch.relu):
        return 0.0, math.inf
    if node.op == "call_method" and node.target == "relu":
        return 0.0, math.inf
    if node.op == "call_function" and node.target is F.relu6:
        return 0.0, 6.0
    if node.op == "call_function" and node.target is F.hardtanh:
        return (float(node.args[1] if len(node.args) > 1 else kw.get("min_val", -1.0)),
                float(node.args[2] if len(node.args) > 2 else kw.get("max_val", 1.0)))
    if (node.op == "call_function" and node.target in (torch.clamp, torch.clip)) or (
            node.op == "call_method" and node.target in ("clamp", "clip")):
        lo = node.args[1] if len(node.args) > 1 else kw.get("min")
        hi = node.args[2] if len(node.args) > 2 else kw.get("max")
        if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
            return None
        return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))
    return None


def _batch_size_of(node: object, x: object) -> bool:
    """True for ``x.size(0)`` or ``x.shape[0]`` nodes."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size":
        return node.args[0] is x and (node.args[1:] or (node.kwargs.get("dim"),))[0] == 0
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        return (isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr
                and src.args == (x, "shape"))
    return False


def _shape_query(node: fx.Node) -> bool:
    """``x.size(...)``, ``x.shape`` or ``x.shape[i]``: nodes without side effects."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:] == ("shape",)
    return (node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node) and _shape_query(node.args[0]))


def _flatten_dims(node: fx.Node) -> tuple[int, int] | None:
    """(start_dim, end_dim) of ``torch.flatten(x, ...)`` / ``x.flatten(...)`` and of
    ``x.view(x.size(0), -1)`` / ``x.reshape(x.shape[0], -1)``, else None."""
    if node.op == "call_method" and node.target in ("view", "reshape") and len(node.args) == 3:
        x, batch, rest = node.args
        return (1, -1) if rest == -1 and _batch_size_of(batch, x) else None
    if not ((node.op == "call_function" and node.target is torch.flatten)
            or (node.op == "call_method" and node.target == "flatten")):
        return None
    args, kw = node.args, node.kwargs
    start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
    return (start, end) if isinstance(start, int) and isinstance(end, int) else None


def canonical_modules(gm: fx.GraphModule) -> None:
    """Rewrite functional clamps with constant bounds into ``nn.ReLU`` / ``nn.Hardtanh``
    modules, ``torch.flatten`` calls into ``nn.Flatten`` and ``F.hardswish``, ``torch.sigmoid``
    and the like into their modules (named ``fn_<node>``), which the quantizer insertion and
    the lowering read."""
    for node in list(gm.graph.nodes):
        bounds, dims = _clamp_bounds(node), _flatten_dims(node)
        lookup = (_LOOKUP_FUNCTIONS.get(node.target) if node.op == "call_function" else
                  _LOOKUP_METHODS.get(node.target) if node.op == "call_method" else None)
        if dims is not None:
            module: nn.Module = nn.Flatten(*dims)
        elif lookup is not None and len(node.args) == 1:
            module = lookup()
        elif bounds is not None:
            lo, hi = bounds
            module = nn.ReLU() if (lo, hi) == (0.0, math.inf) else nn.Hardtanh(lo, hi)
        else:
            continue
        name = f"fn_{node.name}"
        gm.add_module(name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    for node in reversed(list(gm.graph.nodes)):  # x.size(0) / x.shape[0] left without users
        if not node.users and _shape_query(node):
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


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
                layer.weight.div_(_conv_input_std(layer, std))
            else:
                per_feature = std.repeat_interleave(layer.in_features // std.numel())
                layer.weight.div_(per_feature.view(1, -1))
    _set_module(gm, node.target, QuantInput(zero))


def _conv_input_std(conv: nn.Conv2d, std: torch.Tensor) -> torch.Tensor:
    """std of the input channel each weight of ``conv`` (O, I/groups, kh, kw) multiplies,
    shaped to broadcast against the weight (grouped convolutions included)."""
    if std.numel() == 1:
        return std.view(1, 1, 1, 1)
    out_ch, per_group = conv.weight.shape[:2]
    group = torch.arange(out_ch) // (out_ch // conv.groups)
    channel = group[:, None] * per_group + torch.arange(per_group)[None, :]
    return std[channel].view(out_ch, per_group, 1, 1)


def _input_channels(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """Input channels seen by the conv layers ``node`` feeds (None: only linear layers)."""
    convs = [gm.get_submodule(c.target) for c in _layer_consumers(gm, node)
             if _is(gm, c, nn.Conv2d)]
    return convs[0].in_channels if convs else None


def _as_channels(values: float | Sequence[float] | torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if not t.numel() or not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{what} must be one finite number or one per input channel, "
                          f"got {values!r}")
    return t


def add_input_normalization(gm: fx.GraphModule, mean: float | Sequence[float] | torch.Tensor,
                            std: float | Sequence[float] | torch.Tensor,
                            channels: int | None = None) -> Normalize:
    """Put ``Normalize(mean, std)`` (pixel units: images in [0, 1]) in front of a traced model
    that has none, as module ``input_norm``: the twin then takes images in [0, 1] and folds the
    normalization into its first layer as for the zoo's models. ``mean``/``std``: one value or
    one per input channel (``channels``, when known, must match; a single value is repeated).
    Returns the new module (its ``mean``, ``std``: (1, C, 1, 1))."""
    mean_t, std_t = _as_channels(mean, "input_mean"), _as_channels(std, "input_std")
    if not bool((std_t > 0).all()):
        raise ConfigError(f"input_std must be positive, got {std!r}")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConfigError(f"quantize needs a model with one input (images), found "
                          f"{len(placeholders)}")
    channels = channels or _input_channels(gm, placeholders[0])
    if channels is not None:
        for name, t in (("input_mean", mean_t), ("input_std", std_t)):
            if t.numel() not in (1, channels):
                raise ConfigError(f"{name} has {t.numel()} values; the model's input has "
                                  f"{channels} channels (give one value or {channels})")
        mean_t, std_t = mean_t.expand(channels), std_t.expand(channels)
    elif mean_t.numel() != std_t.numel() and 1 not in (mean_t.numel(), std_t.numel()):
        raise ConfigError(f"input_mean and input_std differ in length ({mean_t.numel()} vs "
                          f"{std_t.numel()})")
    module = Normalize(mean_t.tolist(), std_t.tolist())
    gm.add_module(INPUT_NORM, module)
    with gm.graph.inserting_after(placeholders[0]):
        norm = gm.graph.call_module(INPUT_NORM, (placeholders[0],))
    placeholders[0].replace_all_uses_with(norm, delete_user_cb=lambda u: u is not norm)
    gm.graph.lint()
    gm.recompile()
    return module


def _insert_after(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module) -> fx.Node:
    gm.get_submodule("aq").add_module(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(f"aq.{name}", (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return new


def _nonneg(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when ``node``'s output is >= 0 by construction (a clamp at >= 0, pooling/reshaping
    of it, a concatenation of such tensors)."""
    if _is(gm, node, nn.ReLU):
        return True
    if _is(gm, node, nn.Hardtanh):
        return gm.get_submodule(node.target).min_val >= 0
    if _is(gm, node, NONNEG_LOOKUP):
        return True
    if _is(gm, node, QuantAct):
        return not gm.get_submodule(node.target).spec.signed
    if _is(gm, node, (*SHAPE_OPS, nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        return isinstance(node.args[0], fx.Node) and _nonneg(gm, node.args[0])
    cat = cat_inputs(node)
    if cat is not None:
        return all(isinstance(a, fx.Node) and _nonneg(gm, a) for a in cat[0])
    if is_mul(node):
        return all(_nonneg(gm, a) for a in node.args)  # type: ignore[arg-type]
    return False


def _needs_act_quant(gm: fx.GraphModule, node: fx.Node) -> bool:
    users = list(node.users)
    only_cat = bool(users) and all(cat_inputs(u) is not None for u in users)
    if _is(gm, node, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, *LOOKUP)) or cat_inputs(node) is not None:
        return True
    if _is(gm, node, CLAMPS):
        return not only_cat  # a concatenation requantizes its inputs to its own scale
    if _is(gm, node, LAYERS) or _is_add(node) or is_mul(node):
        to_output = any(u.op == "output" for u in users)
        only_clamp = all(_is(gm, u, CLAMPS) for u in users)
        return not to_output and not only_clamp and not only_cat
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
    """Give each quantized layer a (non-owning) reference to its input quantizer; a layer
    without one (fed through an op the twin cannot see through) is a ConfigError."""
    for node in gm.graph.nodes:
        if _is(gm, node, (QuantConv2d, QuantLinear)):
            q = _input_quantizer(gm, node.args[0])
            if q is None:
                src = node.args[0]
                while isinstance(src, fx.Node) and _is(gm, src, SHAPE_OPS):
                    src = src.args[0]
                what = f"{src.op} '{src.target}'" if isinstance(src, fx.Node) else repr(src)
                raise ConfigError(f"layer '{node.target}' reads {what}, which has no activation "
                                  "quantizer; supported between layers: clamps, add, torch.cat, "
                                  "pooling, nn.Flatten / torch.flatten / x.view(x.size(0), -1)")
            gm.get_submodule(node.target).input_quant = [q]


def quantize(model: nn.Module, recipe: str | Recipe, calib: torch.Tensor | None = None,
             batch_size: int = 256, input_shape: tuple[int, int, int] | None = None,
             progress: bool | None = None,
             input_mean: float | Sequence[float] | torch.Tensor | None = None,
             input_std: float | Sequence[float] | torch.Tensor | None = None) -> QuantTwin:
    """The fake-quant twin of ``model`` (a new module; ``model`` is not changed).

    ``model``: a float model (N, C, H, W) -> logits (N, K). Either a qrobust model, whose first
    layer is ``Normalize`` and which takes images in [0, 1], or any torch model traceable by
    torch.fx together with ``input_mean`` / ``input_std``: the per-channel normalization its
    inputs were trained with, in [0, 1] pixel units (one value or C values; torchvision-style
    ``transforms.Normalize(mean, std)`` outside the model; ``input_mean=0, input_std=1`` for a
    model that takes raw [0, 1] images). The twin then takes images in [0, 1] and equals the
    quantized ``Sequential(Normalize(input_mean, input_std), model)``. Quantized activations
    need one of the two (ConfigError otherwise); giving both is an error. ``recipe``: a string
    such as ``"w4a8"`` or a :class:`Recipe`. ``calib``: float images in [0, 1] (a few hundred) to calibrate activation
    quantizers (PTQ); may be None for weight-only recipes or to build a skeleton whose
    buffers are then loaded from a checkpoint. ``twin.meta`` records the recipe, the
    normalization built from ``input_mean`` / ``input_std`` (``input_normalization``) and the
    input shape (C, H, W) (taken from ``calib`` when given) for the ONNX backend. Returns a
    GraphModule in eval mode: images -> logits, STE gradients, deterministic in eval mode.
    """
    recipe = parse_recipe(recipe)
    float_model = copy.deepcopy(model).eval()
    gm = trace(float_model)
    canonical_modules(gm)
    fold_batchnorm(gm)
    aliases = layer_names(gm)
    _check_overrides(recipe, aliases)
    norms = [n for n in gm.graph.nodes if _is(gm, n, Normalize)]
    normalization = None  # the one built from input_mean / input_std, recorded in twin.meta
    if input_mean is not None or input_std is not None:
        if input_mean is None or input_std is None:
            raise ConfigError("give both input_mean and input_std (per-channel, in [0, 1] pixel "
                              "units), or neither")
        if norms:
            raise ConfigError("the model already has a Normalize layer; drop input_mean / "
                              "input_std (its mean and std are used)")
        shape = calib.shape[1:] if calib is not None else input_shape
        built = add_input_normalization(gm, input_mean, input_std,
                                        None if shape is None else shape[0])
        normalization = {"mean": built.mean.reshape(-1).tolist(),
                         "std": built.std.reshape(-1).tolist()}
        norms = [n for n in gm.graph.nodes if _is(gm, n, Normalize)]
    if recipe.act is not None:
        if len(norms) != 1:
            raise ConfigError(
                "quantized activations need the input normalization: a qrobust Normalize "
                f"first layer (found {len(norms)}) or quantize(..., input_mean=..., "
                "input_std=...) with the per-channel mean and std in [0, 1] pixel units the "
                "model's inputs were normalized with (input_mean=0, input_std=1 for a model "
                "on raw [0, 1] images)")
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
    if normalization is not None:  # built in front from input_mean / input_std
        twin.meta["input_normalization"] = normalization
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
