"""The user's own PyTorch classifier, quantized and saved as a qrobust quantized checkpoint.

``quantize_user("pkg.module:factory", recipe, calib, weights=..., input_mean=..., input_std=...)``
builds the model with :func:`qrobust.models.load_user_model` and quantizes it
(:func:`qrobust.quant.quantize`); :func:`user_model_meta` is the ``model`` entry of its
checkpoint: the factory spec and kwargs, the input shape and the weights file's sha256, so that
``load_checkpoint`` rebuilds the skeleton (factory -> quantize with calib=None -> load tensors;
see :mod:`qrobust.quant.checkpoint`). The module must be importable wherever the checkpoint
is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from qrobust.data.sources import file_digest
from qrobust.errors import ConfigError
from qrobust.models import Normalize, load_user_model
from qrobust.quant.convert import QuantTwin, quantize
from qrobust.quant.spec import Recipe, parse_recipe

Floats = float | Sequence[float]


def carried_normalization(model: nn.Module) -> tuple[list[float], list[float]] | None:
    """The input normalization a model states itself, in [0, 1] pixel units: attributes
    ``input_mean`` / ``input_std``, or timm's ``pretrained_cfg`` (``default_cfg``) mean and
    std; None when it states none."""
    if getattr(model, "input_mean", None) is not None and getattr(model, "input_std", None) is not None:
        return _floats(model.input_mean), _floats(model.input_std)
    for name in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, name, None)
        if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
            return _floats(cfg["mean"]), _floats(cfg["std"])
    return None


def _floats(values) -> list[float]:
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist()


def resolve_normalization(model: nn.Module, recipe: Recipe, input_mean: Floats | None,
                          input_std: Floats | None) -> tuple[Floats | None, Floats | None]:
    """(mean, std) for :func:`quantize`: the ones given, else the model's own (a qrobust
    ``Normalize`` layer needs none; see :func:`carried_normalization`). A ConfigError when
    quantized activations need one and the model states none."""
    if (input_mean is None) != (input_std is None):
        raise ConfigError("give both --input-mean and --input-std (per channel, in [0, 1] pixel "
                          "units), or neither")
    if input_mean is not None or any(isinstance(m, Normalize) for m in model.modules()):
        return input_mean, input_std
    carried = carried_normalization(model)
    if carried is not None:
        return carried
    if recipe.act is not None:
        raise ConfigError(f"{type(model).__name__} states no input normalization; give "
                          "--input-mean and --input-std (input_mean= / input_std=): the "
                          "per-channel mean and std in [0, 1] pixel units its inputs were "
                          "normalized with (0 and 1 for a model on raw [0, 1] images)")
    return None, None


def quantize_user(spec: str, recipe: str | Recipe, calib: torch.Tensor | None,
                  weights: str | Path | None = None, kwargs: dict | None = None,
                  input_mean: Floats | None = None, input_std: Floats | None = None,
                  progress: bool | None = None) -> QuantTwin:
    """The fake-quant twin of the user's model ``spec`` ("pkg.module:factory", built with
    ``kwargs``, ``weights`` loaded) for ``recipe``, calibrated on ``calib`` (float images
    (N, C, H, W) in [0, 1]). Normalization: see :func:`resolve_normalization`. One-line
    ConfigError / CheckpointError for a bad spec, weights that do not fit, a missing
    normalization or a model torch.fx cannot trace."""
    parsed = parse_recipe(recipe)
    model = load_user_model(spec, weights, **(kwargs or {}))
    mean, std = resolve_normalization(model, parsed, input_mean, input_std)
    try:
        return quantize(model, parsed, calib, progress=progress, input_mean=mean, input_std=std)
    except ConfigError as err:  # fx's messages span lines: keep the first
        raise ConfigError(f"model spec {spec!r}: {_first_line(err)}") from None
    except RuntimeError as err:  # calibration: the model does not take these images
        shape = None if calib is None else tuple(calib.shape[1:])
        raise ConfigError(f"model spec {spec!r} fails on images of shape {shape} "
                          f"({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def user_model_meta(spec: str, twin: QuantTwin, num_classes: int, kwargs: dict | None = None,
                    weights: str | Path | None = None) -> dict:
    """The ``model`` entry of a quantized user checkpoint (what the builder rebuilds from)."""
    shape = twin.meta.get("input_shape")
    if shape is None:
        raise ConfigError("the twin has no input shape: quantize it with calibration images")
    with torch.no_grad():
        classes = int(twin(torch.zeros(1, *shape)).shape[-1])
    if classes != num_classes:
        raise ConfigError(f"model spec {spec!r} returns {classes} logits; the dataset has "
                          f"{num_classes} classes")
    return {"arch": spec, "factory": spec, "kwargs": dict(kwargs or {}),
            "input_shape": list(shape), "num_classes": int(num_classes),
            "weights": None if weights is None else {"path": str(Path(weights).resolve()),
                                                     "sha256": file_digest(Path(weights),
                                                                           "sha256")}}
