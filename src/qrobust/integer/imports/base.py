"""What an import returns: the integer program of a file, how images reach its input, and the
file's own runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qrobust.integer.program import Program


@dataclass(frozen=True)
class InputSpec:
    """How an image in [0, 1] (pixel codes p = 0..255, x = p / 255, N C H W for qrobust) reaches
    the file's input tensor.

    ``layout``: the file's input layout ("NHWC" for TFLite); ``shape``: the file's input shape
    without the batch; ``dtype``: its element type ("int8", "uint8", or "float32" for a file
    that quantizes inside); ``scale`` and ``zero_point``: the quantization of the input codes;
    ``pixel_codes``: (256,) int64, the input code of each pixel code, exact (the program's first
    lookup)."""

    layout: str
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int
    pixel_codes: np.ndarray


@dataclass(frozen=True)
class Imported:
    """An imported int8 file: ``program`` (run by :func:`qrobust.integer.reference.execute` on
    pixel codes N C H W), ``input_spec``, the file's ``source`` path and ``sha256``, the ``format``
    name and ``runtime``: float images (N, C, H, W) in [0, 1] -> the file's own outputs
    (np.ndarray (N, classes), dequantized), computed by the file's runtime."""

    program: Program
    input_spec: InputSpec
    source: str
    sha256: str
    format: str
    runtime: Callable[[np.ndarray], np.ndarray]
