"""Imported checkpoints: kind "imported" in ``qrobust.checkpoint.BUILDERS``.

The tensors are the program's (weights, biases, multipliers, tables), the metadata its
structure (``program``) and where it came from (``import``: source path, sha256, format, input
spec). ``load_checkpoint`` returns the :class:`ProgramTwin`; :func:`integer_model` gives the
exact executor over the same program and :func:`runtime` the original file under its own
runtime, refused when the file is gone or changed since the import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qrobust.checkpoint import BUILDERS, save_checkpoint
from qrobust.errors import CheckpointError
from qrobust.integer.imports.base import Imported, InputSpec, ProgramIntegerModel
from qrobust.integer.imports.twin import ProgramTwin, program_state

KIND = "imported"
# format -> (module, runtime class taking (path, sha256, InputSpec)); modules load on use
RUNTIMES = {"onnx": ("qrobust.integer.imports.onnx_file", "OnnxRuntime"),
            "tflite": ("qrobust.integer.imports.tflite", "TfliteRuntime")}


def build_imported(meta: dict) -> nn.Module:
    """The twin skeleton described by ``meta`` (its tensors are loaded afterwards)."""
    try:
        return ProgramTwin.skeleton(meta["program"], meta["import"])
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"imported checkpoint metadata lacks {err}; re-import the file "
                              "with `qrobust import`") from None


if KIND not in BUILDERS:
    BUILDERS.register(KIND)(build_imported)


def import_info(imported: Imported) -> dict:
    return {"source": imported.source, "sha256": imported.sha256, "format": imported.format,
            "input": imported.input.to_dict()}


def save_imported(out: str | Path, imported: Imported, dataset: str | None = None,
                  metrics: dict | None = None) -> Path:
    """Save ``imported`` as a checkpoint under directory ``out`` (written to temporary files,
    then renamed: a failure leaves nothing half-written)."""
    meta, tensors = program_state(imported.program)
    twin = ProgramTwin(meta, tensors, import_info(imported))
    full = {"program": meta, "import": import_info(imported), "dataset": dataset,
            "model": {"arch": f"imported-{imported.format}",
                      "input_shape": list(imported.program.input_shape)},
            "metrics": metrics or {}}
    return save_checkpoint(out, twin, full, kind=KIND)


def integer_model(twin: ProgramTwin) -> ProgramIntegerModel:
    """The exact integer executor over the twin's program."""
    return ProgramIntegerModel(twin.program)


def runtime(twin: ProgramTwin) -> Callable[[torch.Tensor], np.ndarray]:
    """The original file under its own runtime (refused if it changed since the import)."""
    info = twin.info
    fmt = info.get("format")
    if fmt not in RUNTIMES:
        raise CheckpointError(f"no runtime for imported format '{fmt}'; valid: "
                              f"{', '.join(RUNTIMES)}")
    module, name = RUNTIMES[fmt]
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ModuleNotFoundError, AttributeError) as err:
        raise CheckpointError(f"the {fmt} runtime is not available here: {err}") from None
    return cls(info["source"], info["sha256"], InputSpec.from_dict(info["input"]))


class RuntimeModel(nn.Module):
    """A file's runtime as a module: float images (N, C, H, W) in [0, 1] -> float logits (no
    gradient), so that evaluation helpers (predict, transfer metrics) take it."""

    def __init__(self, run: Callable[[torch.Tensor], np.ndarray]) -> None:
        super().__init__()
        self.run = run

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.run(x), dtype=np.float32)).reshape(len(x), -1)
