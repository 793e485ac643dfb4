"""Thin quantized modules: they hold buffers and specs and call the functional core.

* :class:`QuantInput` replaces ``Normalize``: images x in [0, 1] -> pixel codes
  ``q = clamp(round(255 x), 0, 255)`` -> ``(q - z_c) / 255`` with the integer zero point
  ``z_c = round(255 mean_c)``. The ``1 / std_c`` factor is folded into the first conv/linear,
  so zero padding of ``q - z_c`` is padding with the (rounded) mean in pixel space, exactly
  what zero padding in normalized space was (up to the rounding of the mean to 1/255).
* :class:`QuantAct`: activation fake-quant with a calibrated scale / zero point (buffers).
* :class:`QuantConv2d`, :class:`QuantLinear`: weights fake-quantized on the fly from the
  current float weights (observer run under no_grad), so QAT trains the float weights.
* ``learned`` specs (LSQ, Esser et al. 2020, arXiv 1902.08153): the scale is an
  ``nn.Parameter`` initialised by the observer; in training mode it gets LSQ's gradient
  (through the rounding by STE, through the clamp exactly) scaled by ``1 / sqrt(n qmax)``,
  and layers take the plain fake-quant path (the exact accumulator path treats scales as
  constants). In eval mode a learned scale is a constant like any other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError
from qrobust.quant.functional import (
    codes_ste,
    fake_quantize,
    grad_scale,
    quantize_codes,
    round_ste,
    scale_accumulator,
)
from qrobust.quant.observers import observe
from qrobust.quant.spec import QuantSpec

PIXEL_LEVELS = 255
CALIB_SAMPLE = 2**18  # values kept per calibration batch (strided subsample + exact extremes)
MIN_SCALE = 1e-8  # a learned scale is kept positive


def lsq_scale(scale: torch.Tensor, per_scale: int, spec: QuantSpec) -> torch.Tensor:
    """A learned scale as used in training: positive, with LSQ's gradient scale
    ``1 / sqrt(per_scale qmax)`` (``per_scale``: values quantized with each scale)."""
    return grad_scale(scale.clamp(min=MIN_SCALE), 1.0 / math.sqrt(per_scale * spec.qmax))


class QuantInput(nn.Module):
    """x float (N, C, H, W) in [0, 1] -> (round(255 x) - z_c) / 255, in [-1, 1]; STE gradient.

    :meth:`widen` makes it accept pixel values far outside [0, 1] (noisy images for
    smoothing): the 256 input codes then step by ``step`` pixel codes,
    ``u = clamp(round((p + o_c) / step), 0, 255)`` for pixel codes p = round(255 x), and the
    output is ``(u - Z_c) step / 255`` with ``Z_c = (z_c + o_c) / step`` an integer.
    """

    def __init__(self, zero_point: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("zero_point", zero_point.float().view(1, -1, 1, 1))
        # saved with the twin, so that a widened twin loads widened; checkpoints written before
        # they were saved load as plain pixel codes (step 1, offset 0)
        self.register_buffer("input_step", torch.tensor(1, dtype=torch.int64))
        self.register_buffer("offset", torch.zeros_like(self.zero_point))

    OPTIONAL_STATE = ("input_step", "offset")  # may be absent from older checkpoints

    @property
    def step(self) -> int:
        """Pixel codes per input code (a power of two; 1 unless widened)."""
        return int(self.input_step)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        for name in self.OPTIONAL_STATE:  # older checkpoints: the plain window
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def scale(self) -> torch.Tensor:
        return torch.tensor(self.step / PIXEL_LEVELS)

    @property
    def code_zero_point(self) -> torch.Tensor:
        """Z_c, the zero point of the input codes u (per channel, integer valued)."""
        return (self.zero_point + self.offset) / self.step

    def widen(self, low: float, high: float) -> QuantInput:
        """Cover pixel values in about [low, high] (a superset of [0, 1]) with the 256 input
        codes: ``step`` is the smallest power of two >= high - low (in pixel units), and
        ``o_c`` puts code 0 near ``low``. ``widen(0, 1)`` is the default, plain pixel codes."""
        if not low <= 0 < 1 <= high or not math.isfinite(high - low):
            raise ConfigError(f"the input window [{low}, {high}] must contain [0, 1]")
        step = 2 ** max(0, math.ceil(math.log2(high - low) - 1e-12))
        self.input_step.fill_(step)
        code_zero = torch.round((self.zero_point - PIXEL_LEVELS * low) / step)
        self.offset.copy_(step * code_zero - self.zero_point)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = round_ste(x * PIXEL_LEVELS)
        q = torch.clamp(round_ste((pixels + self.offset) / self.step), 0, PIXEL_LEVELS)
        return (q - self.code_zero_point) * self.step / PIXEL_LEVELS


class QuantAct(nn.Module):
    """Per-tensor activation fake-quant. Calibrate with ``observing=True`` forward passes
    followed by :meth:`finish_calibration`; deterministic in eval mode (stochastic rounding,
    if the spec asks for it, only in training mode, driven by ``self.generator``)."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.learned:  # same state-dict key as the buffer: checkpoints load either way
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("calibrated", torch.tensor(False))
        self.observing = False
        self.generator: torch.Generator | None = None
        self._seen: list[torch.Tensor] = []
        if spec.clip is not None:
            self._set(*observe(torch.zeros(1), spec))

    @torch.no_grad()
    def _set(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(()))
        self.zero_point.copy_(zero_point.reshape(()))
        self.calibrated.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            flat = x.detach().reshape(-1).float()
            step = max(1, flat.numel() // CALIB_SAMPLE)
            self._seen.append(torch.cat([flat[::step], flat.min()[None], flat.max()[None]]))
            return x
        if not bool(self.calibrated):
            raise ConfigError("activation quantizers are not calibrated: pass calibration images "
                              "to quantize(model, recipe, calib=x) or load a quantized checkpoint")
        gen = self.generator if self.training else None
        scale = (lsq_scale(self.scale, x[0].numel(), self.spec) if self.learning
                 else self.scale.detach())
        return fake_quantize(x, self.spec, scale, self.zero_point, gen)

    @property
    def learning(self) -> bool:
        """Whether the scale is being trained (a learned spec, in training mode)."""
        return self.spec.learned and self.training

    def finish_calibration(self) -> None:
        if self.spec.clip is None and self._seen:
            self._set(*observe(torch.cat(self._seen), self.spec))
        self._seen, self.observing = [], False


class _WeightQuant:
    """Mixin: fake-quantized weights from the current float weights.

    When the layer's input comes from a quantizer (``input_quant``, set by ``quantize``), the
    forward pass computes the integer accumulator exactly: ``acc = conv(x / s_x, w_q - z_w)``
    on integer-valued float32 tensors (exact while |acc| < 2^24), adds the int32 bias
    ``round(b / (s_x s_w))`` and returns ``acc * s_x s_w`` in float64 (activations between
    a layer and its output quantizer are float64; the twin's logits are cast to float32).
    This is the fake-quant output computed at the integer model's rounding points; its STE
    gradient is the usual one.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    wspec: QuantSpec | None
    bspec: QuantSpec | None
    generator: torch.Generator | None
    input_quant: list[nn.Module]
    weight_scale: nn.Parameter  # learned specs only (LSQ)
    weight_zero: torch.Tensor

    def _exact(self) -> bool:
        return self.wspec is not None and bool(self.input_quant) and not self._learning()

    def _learning(self) -> bool:
        """LSQ training: this layer's or its input's scale is trained."""
        if not getattr(self, "training", False):
            return False
        return (self.wspec is not None and self.wspec.learned) or any(
            getattr(q, "learning", False) for q in self.input_quant)

    def _operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Centred input codes and centred weight codes (float32 integers, STE) and the
        accumulator scale s_x s_w (O,) in float64."""
        s_x = self.input_quant[0].scale.detach()
        scale, zero = self.weight_qparams()
        gen = self.generator if getattr(self, "training", False) else None
        w_codes = quantize_codes(self.weight, self.wspec, scale, zero, gen)
        w_codes = w_codes - zero.view(-1, *([1] * (w_codes.ndim - 1))) if zero.ndim else w_codes - zero
        s_acc = (scale.double() * s_x.double()).expand(self.weight.shape[0])
        x_codes = codes_ste(x, s_x, self.weight.dtype)
        return x_codes, w_codes, s_acc

    def _finish(self, acc: torch.Tensor, s_acc: torch.Tensor) -> torch.Tensor:
        """(acc + round(b / s_acc)) * s_acc in float64, so that the next quantizer divides the
        exact accumulator value (the integer model's fixed-point multiplier is accurate to
        2^-30; float32 here would flip roundings about 1e-5 of the time)."""
        shape = (1, -1, *([1] * (acc.ndim - 2)))
        b = None if self.bias is None else round_ste(self.bias.double() / s_acc).view(shape)
        return scale_accumulator(acc, b, s_acc.view(shape))

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the weights: (O,) per channel or scalars."""
        assert self.wspec is not None
        if self.wspec.learned:
            if not getattr(self, "training", False):
                return self.weight_scale.detach(), self.weight_zero
            per_scale = self.weight[0].numel() if self.weight_scale.ndim else self.weight.numel()
            return lsq_scale(self.weight_scale, per_scale, self.wspec), self.weight_zero
        key = (self.weight._version, self.weight.data_ptr())
        cache = getattr(self, "_qcache", None)
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            params = observe(self.weight.detach(), self.wspec)
        self._qcache = (key, params)
        return params

    def weight_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer weight codes (float tensor of integers), scale, zero point (no gradient)."""
        scale, zero = self.weight_qparams()
        with torch.no_grad():
            scale = scale.detach()
            return quantize_codes(self.weight, self.wspec, scale, zero), scale, zero

    def quant_weight(self) -> torch.Tensor:
        if self.wspec is None:
            return self.weight
        scale, zero = self.weight_qparams()
        gen = self.generator if getattr(self, "training", False) else None
        return fake_quantize(self.weight, self.wspec, scale, zero, gen)

    def quant_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.bspec is None:
            return self.bias
        scale, zero = observe(self.bias.detach(), self.bspec)
        return fake_quantize(self.bias, self.bspec, scale, zero)


def _init_learned_scale(layer: _WeightQuant) -> None:
    """LSQ: the weight scale becomes a parameter, initialised by the spec's observer."""
    if layer.wspec is not None and layer.wspec.learned:
        with torch.no_grad():
            scale, zero = observe(layer.weight.detach(), layer.wspec)
        layer.weight_scale = nn.Parameter(scale.clone().float())
        layer.register_buffer("weight_zero", zero.clone().float())  # type: ignore[attr-defined]


def _bias_spec(wspec: QuantSpec | None, quantize_bias: bool) -> QuantSpec | None:
    if not quantize_bias or wspec is None:
        return None
    from dataclasses import replace

    return replace(wspec, granularity="tensor")


class QuantConv2d(_WeightQuant, nn.Conv2d):
    """nn.Conv2d whose forward uses fake-quantized weights (same state-dict keys); grouped and
    depthwise convolutions (``groups``) included, weights (O, I / groups, kh, kw)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, wspec: QuantSpec | None,
                   quantize_bias: bool = False) -> QuantConv2d:
        if conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ConfigError("quantized convolutions support dilation=1 and zero "
                              f"padding only, got {conv}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  conv.padding, groups=conv.groups, bias=conv.bias is not None)
        new.load_state_dict(conv.state_dict())
        new.wspec, new.bspec, new.generator = wspec, _bias_spec(wspec, quantize_bias), None
        new.input_quant = []
        _init_learned_scale(new)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._exact():
            x_codes, w_codes, s_acc = self._operands(x)
            acc = F.conv2d(x_codes, w_codes, None, self.stride, self.padding, 1, self.groups)
            return self._finish(acc, s_acc)
        return F.conv2d(x, self.quant_weight(), self.quant_bias(), self.stride, self.padding, 1,
                        self.groups)


class QuantLinear(_WeightQuant, nn.Linear):
    """nn.Linear whose forward uses fake-quantized weights (same state-dict keys)."""

    @classmethod
    def from_float(cls, linear: nn.Linear, wspec: QuantSpec | None,
                   quantize_bias: bool = False) -> QuantLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.load_state_dict(linear.state_dict())
        new.wspec, new.bspec, new.generator = wspec, _bias_spec(wspec, quantize_bias), None
        new.input_quant = []
        _init_learned_scale(new)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._exact():
            x_codes, w_codes, s_acc = self._operands(x)
            return self._finish(F.linear(x_codes, w_codes), s_acc)
        return F.linear(x, self.quant_weight(), self.quant_bias())
