"""Import int8 files made by other tools (ONNX here; TFLite in :mod:`.tflite` where present)
as a qrobust integer program, its differentiable twin and the file's own runtime.

``import_file(path, **options) -> Imported`` dispatches on the suffix; ``program_twin``
(:mod:`.twin`) gives the twin; ``ProgramIntegerModel`` runs the program exactly;
``save_imported`` writes a checkpoint (kind "imported") that ``load_checkpoint`` returns as
the twin, with ``integer_model(twin)`` and ``runtime(twin)`` (:mod:`.checkpoint`). See
docs/import.md.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from qrobust.errors import ConfigError
from qrobust.integer.imports.base import (
    Agreement,
    Imported,
    InputSpec,
    ProgramIntegerModel,
    agreement,
)
from qrobust.integer.imports.checkpoint import integer_model, runtime, save_imported
from qrobust.integer.imports.twin import ProgramTwin, program_twin

# suffix -> (module, reader); modules are imported on use (tflite needs its own packages)
READERS = {".onnx": ("qrobust.integer.imports.onnx_file", "read_onnx"),
           ".tflite": ("qrobust.integer.imports.tflite", "read_tflite")}


def import_file(path: str | Path, **options) -> Imported:
    """Import the int8 file at ``path`` (by suffix: .onnx, .tflite). ``options``: the reader's
    (mean, std, layout, input_shape)."""
    suffix = Path(path).suffix.lower()
    if suffix not in READERS:
        raise ConfigError(f"cannot import '{path}': unknown suffix '{suffix}'; valid: "
                          f"{', '.join(READERS)}")
    module, reader = READERS[suffix]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ConfigError(f"cannot import {suffix} files here: {err}") from None
    return getattr(mod, reader)(path, **options)


__all__ = ["Agreement", "Imported", "InputSpec", "ProgramIntegerModel", "ProgramTwin",
           "agreement", "import_file", "integer_model", "program_twin", "runtime",
           "save_imported"]
