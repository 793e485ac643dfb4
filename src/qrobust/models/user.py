"""The user's own PyTorch classifier: ``load_user_model("pkg.module:factory", weights=path)``.

``factory`` is any callable in an importable module (a class or a function) that returns an
``nn.Module`` mapping images (N, C, H, W) to logits (N, K). Weights are read without
unpickling code: a ``.safetensors`` file, or a state dict saved with ``torch.save`` and read
with ``torch.load(weights_only=True)`` (a dict nested under ``state_dict`` or ``model``, as
training frameworks write it, is accepted). Such a model has no qrobust ``Normalize`` layer:
quantize it with ``quantize(model, recipe, calib, input_mean=..., input_std=...)``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrobust.errors import CheckpointError, ConfigError

_SPEC = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
NESTED_KEYS = ("state_dict", "model")


def resolve_factory(spec: str) -> Any:
    """The object named by ``"pkg.module:attr"`` (``attr`` may be dotted: ``Class.build``)."""
    match = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ConfigError(f"model spec {spec!r} must look like 'package.module:factory' (a "
                          "callable returning an nn.Module)")
    module_name, attr = match["module"], match["attr"]
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"model spec {spec!r}: cannot import module '{module_name}' ({err}); "
                          "is it installed or on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model spec {spec!r}: '{module_name}' has no attribute "
                              f"'{attr}'") from None
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model spec {spec!r}: '{attr}' is a {type(obj).__name__}, not a "
                          "callable returning an nn.Module")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a ``torch.save``'d state dict (never unpickles
    code: ``torch.load(weights_only=True)``)."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"weights file '{file}' not found")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"'{file}' is not a readable safetensors file ({err})") from None
    try:
        state: Any = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle refusals and corrupt files come in many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read weights '{file}' with torch.load(weights_only=True) "
                              f"({first}); save model.state_dict() or a .safetensors file, not "
                              "the pickled model") from None
    for key in NESTED_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"'{file}' does not hold a state dict (parameter name -> tensor); "
                              "save model.state_dict()")
    return dict(state)


def _names(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_user_model(spec: str, weights: str | Path | None = None, strict: bool = True,
                    **kwargs: Any) -> nn.Module:
    """Build the user's model ``factory(**kwargs)`` named by ``spec`` ("pkg.module:factory"),
    load ``weights`` (.safetensors or a state dict file; None keeps the factory's own
    initialisation) and return it in eval mode (N, C, H, W) -> logits (N, K).

    Errors are one line: ConfigError for a bad spec, an import failure or a factory that does
    not return an nn.Module; CheckpointError for a missing or unreadable weights file and for
    weights whose names or shapes do not match the model (``strict=False`` tolerates missing
    and unexpected names, not shape mismatches)."""
    factory = resolve_factory(spec)
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise ConfigError(f"model spec {spec!r}: calling the factory failed ({err})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model spec {spec!r}: the factory returned a {type(model).__name__}, "
                          "not an nn.Module")
    if weights is not None:
        state = read_state_dict(weights)
        own = model.state_dict()
        shapes = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
        if shapes:
            raise CheckpointError(f"weights '{weights}' do not fit {spec!r}: shape mismatch for "
                                  f"{_names(shapes)}")
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            parts = ([f"missing {_names(missing)}"] if missing else []) + (
                [f"unexpected {_names(unexpected)}"] if unexpected else [])
            raise CheckpointError(f"weights '{weights}' do not fit {spec!r}: {'; '.join(parts)} "
                                  "(strict=False ignores names)")
        model.load_state_dict(state, strict=False)
    return model.eval()
