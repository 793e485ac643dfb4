"""The layer-wise error-amplification diagnostic of Defensive Quantization (arXiv 1904.08444).

Lin, Gan, Han explain why vanilla quantized networks are *less* robust than float ones by
"error amplification": a small input perturbation grows layer by layer and pushes
activations across quantization buckets. The diagnostic, per layer l:

    ratio_l = ||f_l(x + delta) - f_l(x)||_2 / ||f_l(x)||_2

with f_l the output of layer l (flattened per image), averaged over images. We hook the
outputs of every conv and linear layer (``nn.Conv2d`` / ``nn.Linear`` and their quantized
subclasses), in execution order; the inputs of those layers are the (quantized) activations
of the layer before, so quantization effects show up from the second layer on. Row 0 is the
input itself, ||delta|| / ||x||. Models are compared by layer *index*, so a float model and
its quantized twin line up even though their module types differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qrobust.errors import ConfigError


def default_layers(model: nn.Module) -> list[str]:
    """Names of the conv and linear layers of ``model`` (module order)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@torch.no_grad()
def layer_outputs(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Outputs of the named sub-modules on ``x`` (N, ...), each flattened to (N, -1), keyed by
    name in execution order (a layer called twice per forward keeps its last output)."""
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ConfigError(f"layers {missing} not found; valid: {default_layers(model)[:20]}")
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_m, _inp, out):
            seen[name] = out.detach().flatten(1)
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _ratio(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    return (noisy - clean).norm(dim=1) / clean.norm(dim=1).clamp_min(1e-12)


def amplification_ratios(model: nn.Module, x: torch.Tensor, delta: torch.Tensor,
                         layers: Sequence[str] | None = None) -> list[dict]:
    """Per-layer amplification rows ``{index, layer, mean, median}`` (row 0: the input).

    ``x`` (N, C, H, W) in [0, 1]; ``delta`` the same shape (e.g. x_adv - x). The model is put
    in eval mode; for randomized models the two passes draw different noise, so seed them or
    use deterministic models (float, quantized twin, DQ).
    """
    if x.shape != delta.shape:
        raise ConfigError(f"delta must have the shape of x {tuple(x.shape)}, got {tuple(delta.shape)}")
    model.eval()
    names = list(layers) if layers is not None else default_layers(model)
    if not names:
        raise ConfigError("no conv or linear layers to hook; pass layer names explicitly")
    clean = layer_outputs(model, x, names)
    noisy = layer_outputs(model, x + delta, names)
    rows = [_row(0, "input", _ratio(x.flatten(1), (x + delta).flatten(1)))]
    for i, name in enumerate(clean, start=1):
        rows.append(_row(i, name, _ratio(clean[name], noisy[name])))
    return rows


def _row(index: int, name: str, r: torch.Tensor) -> dict:
    return {"index": index, "layer": name, "mean": r.mean().item(), "median": r.median().item()}


def compare_amplification(models: dict[str, nn.Module], x: torch.Tensor,
                          delta: torch.Tensor) -> dict[str, list[dict]]:
    """``amplification_ratios`` for several models on the same (x, delta)."""
    return {name: amplification_ratios(m, x, delta) for name, m in models.items()}
