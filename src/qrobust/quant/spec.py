"""Quantizer specifications and recipes (frozen dataclasses; variants via ``dataclasses.replace``).

A :class:`QuantSpec` describes one uniform affine quantizer; a :class:`Recipe` says which spec
the weights and the activations of a model get, with per-layer overrides. Recipes are written
as short strings, parsed by :func:`parse_recipe`::

    w4a8                      4-bit weights (per-channel, symmetric), 8-bit activations
    w3                        weight-only: 3-bit weights, float activations
    w4a4,first=8,last=8       first and last layer at 8 bits (weights and their input)
    w4a4,4.conv1=w8a8         any conv/linear by module name (checked when quantizing)
    w8a8,pt                   per-tensor weights (``pc``: per-channel, the default)
    w2a2,obs=mse              observer for weights and activations (``wobs=``, ``aobs=``)
    w4a4,relu6                ReLU6-style clipped activations in [0, 6] (Defensive Quantization)
    w4a8,asym / stochastic / clip=1.0 / bias
    w2a2,lsq                  learned step sizes (LSQ, Esser et al. 2020, arXiv 1902.08153):
                              every scale is a trained parameter, initialised by the observer
    w8a8,reduce-range         8-bit weights kept to 7-bit codes [-63, 63] (ONNX Runtime's
                              reduce_range): exact on u8 x s8 int8 kernels of every x86 CPU,
                              also those without VNNI (qrobust.hardware)
    gorsline4                 Gorsline et al. (arXiv 2105.00227): weights and biases clipped to
                              [-1, 1] and rounded to 4 bits, per-tensor, activations in float
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from qrobust.errors import ConfigError
from qrobust.hardware import cpu_info

Granularity = Literal["tensor", "channel"]
Rounding = Literal["nearest", "stochastic"]
ObserverName = Literal["minmax", "percentile", "mse"]

MAX_BITS = 16


@dataclass(frozen=True)
class QuantSpec:
    """One uniform affine quantizer.

    ``bits`` in 1..16. Signed symmetric uses the restricted range [-(2^(b-1)-1), 2^(b-1)-1]
    (so that 2 bits is ternary); signed asymmetric [-2^(b-1), 2^(b-1)-1]; unsigned [0, 2^b-1].
    One signed bit is the sign quantizer {-s, +s} (binary). ``clip`` fixes the real range to
    [-clip, clip] (signed) or [0, clip] (unsigned) instead of observing it (ReLU6: clip=6).
    ``granularity='channel'`` means one scale per output channel (axis 0; weights only).
    ``learned``: the scale is a trained parameter (LSQ), initialised by the observer (or clip)
    and then updated by QAT with LSQ's gradient scaling; the zero point stays as initialised.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = "channel"
    rounding: Rounding = "nearest"
    observer: ObserverName = "minmax"
    clip: float | None = None
    percentile: float = 99.99
    learned: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= MAX_BITS:
            raise ConfigError(f"quantizer bits must be an integer in 1..{MAX_BITS}, got "
                              f"{self.bits!r}; e.g. w4a8 means 4-bit weights, 8-bit activations")
        if self.granularity not in ("tensor", "channel"):
            raise ConfigError(f"granularity must be 'tensor' or 'channel', got {self.granularity!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ConfigError(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
        if self.observer not in ("minmax", "percentile", "mse"):
            raise ConfigError(f"observer must be minmax, percentile or mse, got {self.observer!r}")
        if self.clip is not None and not self.clip > 0:
            raise ConfigError(f"clip must be positive, got {self.clip}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        if self.bits == 1:
            return -1
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        if not self.signed:
            return 2**self.bits - 1
        return 1 if self.bits == 1 else 2 ** (self.bits - 1) - 1

    @property
    def is_sign(self) -> bool:
        """True for the 1-bit signed (binary) quantizer: codes {-1, +1}."""
        return self.bits == 1 and self.signed

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.learned:  # absent unless set: recipes hashed before LSQ keep their keys
            del d["learned"]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> QuantSpec | None:
        return None if d is None else cls(**d)


@dataclass(frozen=True)
class Override:
    """Per-layer override: ``layer`` is a conv/linear module name, or ``first`` / ``last``.

    ``weight`` replaces the layer's weight spec; ``act`` the spec of the activation quantizer
    that feeds the layer's input (the pixel input of the first layer is always 8-bit codes).
    """

    layer: str
    weight: QuantSpec | None
    act: QuantSpec | None


@dataclass(frozen=True)
class Recipe:
    """Weight and activation specs of a whole model. ``act=None``: activations stay float."""

    weight: QuantSpec | None
    act: QuantSpec | None
    overrides: tuple[Override, ...] = ()
    quantize_bias: bool = False
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.weight is None and self.act is None:
            raise ConfigError("a recipe must quantize weights or activations (e.g. w8a8)")
        if self.quantize_bias and self.act is not None:
            raise ConfigError("quantized biases ('bias', gorsline) are a weight-only setting; with "
                              "quantized activations the bias is an int32 accumulator term")
        if self.act is not None and self.act.granularity != "tensor":
            raise ConfigError("activation quantizers are per-tensor; use granularity='tensor'")

    def to_dict(self) -> dict:
        return {"weight": None if self.weight is None else self.weight.to_dict(),
                "act": None if self.act is None else self.act.to_dict(),
                "overrides": [{"layer": o.layer,
                               "weight": None if o.weight is None else o.weight.to_dict(),
                               "act": None if o.act is None else o.act.to_dict()}
                              for o in self.overrides],
                "quantize_bias": self.quantize_bias, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        return cls(QuantSpec.from_dict(d["weight"]), QuantSpec.from_dict(d["act"]),
                   tuple(Override(o["layer"], QuantSpec.from_dict(o["weight"]),
                                  QuantSpec.from_dict(o["act"])) for o in d["overrides"]),
                   d["quantize_bias"], d.get("text", ""))

    def weight_spec(self, layer: str, aliases: tuple[str, ...] = ()) -> QuantSpec | None:
        """The weight spec of ``layer`` (also known as ``aliases``, e.g. 'first')."""
        spec = self.weight
        for o in self.overrides:
            if o.layer == layer or o.layer in aliases:
                spec = o.weight if o.weight is not None else spec
        return spec

    def act_spec(self, layer: str, aliases: tuple[str, ...] = ()) -> QuantSpec | None:
        """The spec of the activation quantizer feeding ``layer``."""
        spec = self.act
        for o in self.overrides:
            if o.layer == layer or o.layer in aliases:
                spec = o.act if o.act is not None else spec
        return spec


_BASE = re.compile(r"^(?:w(\d+))?(?:a(\d+))?$")
_PAIR = re.compile(r"^(?:w(\d+))?(?:a(\d+))?$|^(\d+)$")


def _default_observer(bits: int) -> ObserverName:
    return "mse" if bits <= 4 else "minmax"


def _weight(bits: int) -> QuantSpec:
    return QuantSpec(bits, signed=True, symmetric=True, granularity="channel",
                     observer=_default_observer(bits))


def _act(bits: int) -> QuantSpec:
    return QuantSpec(bits, signed=False, symmetric=True, granularity="tensor",
                     observer=_default_observer(bits))


def _bits(text: str, recipe: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_BITS:
        raise ConfigError(f"recipe {recipe!r}: bit width {value} is outside 1..{MAX_BITS} "
                          "(write e.g. w4a8, w8a8, w3)")
    return value


def _parse_pair(token: str, recipe: str) -> tuple[int | None, int | None]:
    m = _PAIR.match(token)
    if not m or not any(m.groups()):
        raise ConfigError(f"recipe {recipe!r}: cannot read {token!r}; expected wNaM, wN, aM "
                          "or a bit count, e.g. 'w4a8' or 'first=8'")
    if m.group(3):
        b = _bits(m.group(3), recipe)
        return b, b
    return (_bits(m.group(1), recipe) if m.group(1) else None,
            _bits(m.group(2), recipe) if m.group(2) else None)


def parse_recipe(text: str | Recipe) -> Recipe:
    """Parse a recipe string (see the module docstring). Raises ConfigError on any mistake."""
    if isinstance(text, Recipe):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"a recipe must be a non-empty string like 'w4a8', got {text!r}")
    tokens = [t.strip() for t in text.strip().lower().split(",")]
    head, options = tokens[0], tokens[1:]
    gorsline = re.fullmatch(r"gorsline(\d+)", head)
    if gorsline:
        weight: QuantSpec | None = QuantSpec(_bits(gorsline.group(1), text), granularity="tensor",
                                             clip=1.0)
        act: QuantSpec | None = None
        options = ["bias", *options]
    else:
        m = _BASE.match(head)
        if not m or not any(m.groups()):
            raise ConfigError(f"recipe {text!r}: the first part must look like w4a8, w8a8, w3 "
                              "or gorsline4")
        weight = _weight(_bits(m.group(1), text)) if m.group(1) else None
        act = _act(_bits(m.group(2), text)) if m.group(2) else None
    overrides: list[tuple[str, int | None, int | None]] = []
    bias = reduce = False
    for opt in options:
        key, _, value = opt.partition("=")
        if opt in ("pt", "per-tensor", "pc", "per-channel"):
            gran = "tensor" if opt in ("pt", "per-tensor") else "channel"
            weight = weight and replace(weight, granularity=gran)
        elif opt == "asym":
            weight = weight and replace(weight, symmetric=False)
            act = act and replace(act, symmetric=False)
        elif opt == "stochastic":
            weight = weight and replace(weight, rounding="stochastic")
            act = act and replace(act, rounding="stochastic")
        elif opt == "relu6":
            act = act and replace(act, clip=6.0)
        elif opt == "lsq":
            weight = weight and replace(weight, learned=True)
            act = act and replace(act, learned=True)
        elif opt == "bias":
            bias = True
        elif opt == REDUCE_RANGE:
            reduce = True
        elif key in ("obs", "wobs", "aobs") and value:
            if value not in ("minmax", "percentile", "mse"):
                raise ConfigError(f"recipe {text!r}: unknown observer {value!r}; valid: "
                                  "minmax, mse, percentile")
            if key in ("obs", "wobs") and weight is not None:
                weight = replace(weight, observer=value)  # type: ignore[arg-type]
            if key in ("obs", "aobs") and act is not None:
                act = replace(act, observer=value)  # type: ignore[arg-type]
        elif key in ("clip", "aclip") and value:
            try:
                clip = float(value)
            except ValueError:
                raise ConfigError(f"recipe {text!r}: {key}= needs a number, got {value!r}") from None
            if key == "clip":
                weight = weight and replace(weight, clip=clip)
            else:
                act = act and replace(act, clip=clip)
        elif value:
            wb, ab = _parse_pair(value, text)
            overrides.append((key, wb, ab))
        else:
            raise ConfigError(f"recipe {text!r}: unknown option {opt!r}; valid: pt, pc, asym, "
                              "stochastic, relu6, lsq, bias, reduce-range, obs=, wobs=, aobs=, "
                              "clip=, aclip=, "
                              "<layer>=wNaM (layer: first, last or a module name)")
    resolved = tuple(
        Override(layer,
                 None if wb is None or weight is None else
                 replace(weight, bits=wb, observer=_default_observer(wb)
                         if weight.observer == _default_observer(weight.bits) else weight.observer),
                 None if ab is None or act is None else
                 replace(act, bits=ab, observer=_default_observer(ab)
                         if act.observer == _default_observer(act.bits) else act.observer))
        for layer, wb, ab in overrides)
    if reduce:
        weight = _reduced(weight)
        resolved = tuple(replace(o, weight=_reduced(o.weight)) for o in resolved)
    return Recipe(weight, act, resolved, bias, text)


REDUCE_RANGE = "reduce-range"
REDUCE_RANGE_MODES = ("auto", "on", "off")


def _reduced(spec: QuantSpec | None) -> QuantSpec | None:
    """8-bit weights -> 7-bit codes (|w| <= 63: no two u8 x s8 products exceed int16)."""
    return replace(spec, bits=7) if spec is not None and spec.bits == 8 else spec


def resolve_reduce_range(recipe: str | Recipe, mode: str = "auto",
                         saturating_cpu: bool | None = None) -> Recipe:
    """``recipe`` with ``reduce-range`` added when ``mode`` is 'on', or 'auto' and this CPU's
    u8 x s8 kernels saturate (x86 without VNNI; ``saturating_cpu`` overrides the check) and the
    recipe has 8-bit weights to reduce. 'off' returns it unchanged."""
    parsed = parse_recipe(recipe)
    if mode not in REDUCE_RANGE_MODES:
        raise ConfigError(f"unknown reduce-range mode {mode!r}; valid: {', '.join(REDUCE_RANGE_MODES)}")
    if saturating_cpu is None:
        saturating_cpu = cpu_info().u8s8_pairs_saturate
    eight_bit = [w for w in (parsed.weight, *(o.weight for o in parsed.overrides))
                 if w is not None and w.bits == 8]
    wanted = mode == "on" or (mode == "auto" and saturating_cpu)
    if not wanted or not eight_bit or parsed.act is None:
        return parsed
    return parse_recipe(f"{parsed.text},{REDUCE_RANGE}")


FLOAT_RECIPES = ("fp32", "float")  # study recipe names for the unquantized model


def recipe_bits(recipe: str) -> tuple[int | None, int | None]:
    """(weight bits, activation bits) of a recipe; None = float. Raises ConfigError when
    :func:`parse_recipe` rejects it (bits outside 1..16, unknown options...)."""
    if recipe in FLOAT_RECIPES:
        return None, None
    r = parse_recipe(recipe)
    return (None if r.weight is None else r.weight.bits, None if r.act is None else r.act.bits)
