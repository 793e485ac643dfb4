"""Twin vs integer model: the contract measurements (code differences, prediction agreement)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qrobust.integer.base import IntegerModel, pixel_codes
from qrobust.quant.functional import round_half_up
from qrobust.quant.modules import QuantAct


@dataclass(frozen=True)
class CodeDiff:
    """Per materialised tensor: largest |twin code - integer code| and the share that differ."""

    max_abs: int
    mismatch_rate: float
    numel: int


@torch.no_grad()
def twin_codes(twin: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The integer codes every activation quantizer of ``twin`` produces on ``x`` (int64),
    keyed by the quantizers' fx node names (``aq_<module>``, as in the integer program), and
    the twin's ``logits``."""
    out: dict[str, torch.Tensor] = {}

    def recorder(key: str):
        def hook(mod, _inp, y):
            out[key] = (round_half_up(y / mod.scale.detach()) + mod.zero_point).long()
        return hook

    hooks = [m.register_forward_hook(recorder(name.replace(".", "_")))
             for name, m in twin.named_modules() if isinstance(m, QuantAct)]
    try:
        out["logits"] = twin.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return out


@dataclass(frozen=True)
class Contract:
    """Twin vs reference integer model on a set of images."""

    codes: dict[str, CodeDiff]
    prediction_agreement: float
    n: int

    @property
    def max_abs(self) -> int:
        return max((d.max_abs for d in self.codes.values()), default=0)

    @property
    def max_mismatch_rate(self) -> float:
        return max((d.mismatch_rate for d in self.codes.values()), default=0.0)


@torch.no_grad()
def contract(twin: nn.Module, integer: IntegerModel, x: torch.Tensor,
             batch_size: int = 512) -> Contract:
    """Compare every activation code and the predictions of ``twin`` and a reference integer
    model on images ``x`` (one pass of each model, in batches)."""
    diffs: dict[str, list[torch.Tensor]] = {}
    same = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        # lowers first (runs the twin once); unclipped codes: a widened twin sees beyond [0, 1]
        ints = integer.intermediate_codes(pixel_codes(xb, clip=False))
        mine = twin_codes(twin, xb)
        same += int((mine.pop("logits").argmax(1) == ints["logits"].argmax(1)).sum())
        for key, codes in mine.items():
            diffs.setdefault(key, []).append((codes - ints[key]).abs().flatten())
    result = {}
    for key, parts in diffs.items():
        d = torch.cat(parts)
        result[key] = CodeDiff(int(d.max()), float((d > 0).float().mean()), d.numel())
    return Contract(result, same / max(1, len(x)), len(x))


def code_agreement(twin: nn.Module, integer: IntegerModel, x: torch.Tensor) -> dict[str, CodeDiff]:
    """Per-quantizer code differences between ``twin`` and a reference integer model."""
    return contract(twin, integer, x).codes


@torch.no_grad()
def prediction_agreement(a: nn.Module, b: nn.Module, x: torch.Tensor,
                         batch_size: int = 512) -> float:
    """Share of images in ``x`` on which models ``a`` and ``b`` predict the same class."""
    same = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        same += int((a(xb).argmax(1) == b(xb).argmax(1)).sum())
    return same / max(1, len(x))
