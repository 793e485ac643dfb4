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


@torch.no_grad()
def replay(twin: nn.Module, file_model: nn.Module, x: torch.Tensor, y: torch.Tensor,
           x_adv: torch.Tensor, batch_size: int = 256) -> dict:
    """Adversarial examples found on the twin, replayed on the original file's runtime.

    ``clean_acc_runtime`` / ``robust_acc_runtime``: the runtime on x / on x_adv;
    ``n_fool_twin``: points the twin got right whose x_adv fools it; ``n_fool_runtime``: of
    those, how many still fool the runtime; ``transfer_rate_runtime`` (of those the runtime
    got right, the share fooled: :func:`qrobust.attacks.transfer.transfer_metrics`)."""
    from qrobust.attacks.evaluate import predict
    from qrobust.attacks.transfer import transfer_metrics

    twin_clean, twin_adv = predict(twin, x, batch_size), predict(twin, x_adv, batch_size)
    rt_clean, rt_adv = predict(file_model, x, batch_size), predict(file_model, x_adv, batch_size)
    attacked = twin_clean == y
    t = transfer_metrics(y, twin_clean, twin_adv, rt_clean, rt_adv, attacked)
    fooled = attacked & (twin_adv != y)
    return {"clean_acc_runtime": t["integer_clean_acc"],
            "robust_acc_runtime": t["integer_robust_acc"],
            "transfer_rate_runtime": t["transfer_rate"],
            "n_fool_twin": int(fooled.sum()), "n_fool_runtime": int((fooled & (rt_adv != y)).sum())}
