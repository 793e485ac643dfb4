"""Checkpoints: one safetensors file whose header carries the JSON metadata.

A checkpoint is a directory ``<out>/model.safetensors`` (tensors + metadata) with a readable
copy of the metadata in ``<out>/meta.json``. Files are written to a temporary name and
renamed, so an interrupted save never leaves a half-written checkpoint. Loading parses only
the safetensors format: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qrobust.errors import CheckpointError
from qrobust.models import ModelSpec, build_model
from qrobust.provenance import provenance
from qrobust.registry import Registry

FORMAT = "qrobust-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "meta.json"

# kind -> builds the (untrained) module skeleton whose state_dict the file holds
BUILDERS: Registry[Callable[[dict], nn.Module]] = Registry("checkpoint kind")
BUILDERS.register("float")(lambda meta: build_model(ModelSpec.from_dict(meta["model"])))


def weights_path(path: str | Path) -> Path:
    path = Path(path)
    return path / WEIGHTS if path.is_dir() else path


def atomic_write_bytes(target: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename over ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(out: str | Path, model: nn.Module, meta: dict, kind: str = "float") -> Path:
    """Save ``model``'s state dict and ``meta`` (JSON-serialisable) under directory ``out``."""
    BUILDERS.get(kind)  # fail before writing anything
    out = Path(out)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, **meta,
            **provenance()}
    text = json.dumps(full, sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"qrobust": text}))
    atomic_write_bytes(out / META, lambda tmp: Path(tmp).write_text(json.dumps(full, indent=2, sort_keys=True)))
    return out / WEIGHTS


def read_meta(path: str | Path) -> dict:
    """The metadata of a checkpoint, validated, without loading tensors."""
    file = weights_path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {file} not found")
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is not a safetensors checkpoint ({err}); qrobust never "
                              "unpickles files, re-save it with `qrobust train` or save_checkpoint") from None
    try:
        meta = json.loads(header["qrobust"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{file} is a safetensors file without qrobust metadata") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: unsupported checkpoint format {meta.get('format')!r} "
                              f"v{meta.get('format_version')}")
    return meta


def load_checkpoint(path: str | Path, expect_arch: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model described by the metadata and load its tensors (eval mode)."""
    meta = read_meta(path)
    arch = meta.get("model", {}).get("arch")
    if expect_arch is not None and arch != expect_arch:
        raise CheckpointError(f"{weights_path(path)} holds a '{arch}' model, expected '{expect_arch}'")
    with torch.random.fork_rng(devices=[]):  # the skeleton's random init is overwritten below:
        model = BUILDERS.get(meta.get("kind", "float"))(meta)  # loading draws nothing
    tensors = load_file(str(weights_path(path)))
    expected = model.state_dict()
    optional = {f"{name}.{key}" if name else key for name, m in model.named_modules()
                for key in getattr(m, "OPTIONAL_STATE", ())}  # absent from older files
    missing = set(expected) - set(tensors) - optional
    unexpected = set(tensors) - set(expected)
    wrong = [k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {sorted(missing)[:3]}" if missing else
                  f"unexpected {sorted(unexpected)[:3]}" if unexpected else f"shape of {wrong[:3]}")
        raise CheckpointError(f"{weights_path(path)}: tensors do not match a '{arch}' model ({detail}); "
                              "the file was saved from another architecture or is corrupt")
    model.load_state_dict(tensors)
    return model.eval(), meta


def set_seed(seed: int) -> torch.Generator:
    """Seed torch's global RNG (for weight init) and return a generator for data order."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
