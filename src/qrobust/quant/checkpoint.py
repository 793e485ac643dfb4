"""Quantized checkpoints: kind "quantized" in ``qrobust.checkpoint.BUILDERS``.

The metadata holds the float model spec (``model``) and the recipe (``quant.recipe``, a
``Recipe.to_dict()``); the tensors are the twin's state dict (folded float weights and the
calibrated activation scales / zero points). Loading rebuilds the float skeleton, quantizes it
with the recipe (no calibration) and loads the tensors.

A user's own model (:mod:`qrobust.quant.user`) has ``model.factory`` ("pkg.module:factory")
and ``model.kwargs`` instead of a zoo architecture, and the normalization it was quantized
with in ``quant.input_normalization``: the skeleton is ``factory(**kwargs)`` quantized with it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qrobust.checkpoint import BUILDERS, save_checkpoint
from qrobust.errors import CheckpointError
from qrobust.models import ModelSpec, build_model, load_user_model
from qrobust.quant.convert import quantize
from qrobust.quant.spec import Recipe

KIND = "quantized"


@BUILDERS.register(KIND)
def build_quantized(meta: dict) -> nn.Module:
    """The twin skeleton described by ``meta`` (its tensors are loaded afterwards)."""
    try:
        recipe = Recipe.from_dict(meta["quant"]["recipe"])
        if "factory" in meta["model"]:
            return _user_skeleton(meta, recipe)
        spec = ModelSpec.from_dict(meta["model"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"quantized checkpoint metadata lacks {err}; re-save it with "
                              "`qrobust quantize` or save_quantized") from None
    return quantize(build_model(spec), recipe, input_shape=tuple(spec.input_shape))


def _user_skeleton(meta: dict, recipe: Recipe) -> nn.Module:
    model = load_user_model(meta["model"]["factory"], **meta["model"]["kwargs"])
    norm = meta["quant"].get("input_normalization") or {}
    return quantize(model, recipe, input_shape=tuple(meta["model"]["input_shape"]),
                    input_mean=norm.get("mean"), input_std=norm.get("std"))


def save_quantized(out: str | Path, twin: nn.Module, float_meta: dict, **extra) -> Path:
    """Save ``twin`` with the float checkpoint's metadata plus its recipe (and ``extra``)."""
    recipe: Recipe = twin.recipe  # type: ignore[assignment]
    meta = {k: v for k, v in float_meta.items()
            if k in ("model", "dataset", "train_config", "seed")}
    meta["float_metrics"] = float_meta.get("metrics", {})
    meta["quant"] = {"recipe": recipe.to_dict(), **extra}
    if "input_normalization" in twin.meta:  # built from input_mean / input_std: rebuilt on load
        meta["quant"]["input_normalization"] = twin.meta["input_normalization"]
    return save_checkpoint(out, twin, meta, kind=KIND)
