"""What an imported int8 file becomes: its integer :class:`Program`, how images reach its
input (:class:`InputSpec`), where it came from, and its own runtime.

Images are float (N, C, H, W) in [0, 1] everywhere in qrobust. A file's input is a float
tensor normalised as ``(x - mean) / std`` (mean and std given by the user: they are not in
the file) in the file's layout, quantized by the file's first quantizer. Both the integer
program and the runtime read images on the 1/255 pixel grid, ``p = round(255 x)``, so they
see the same input codes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qrobust.errors import CheckpointError, ConfigError
from qrobust.integer.base import IntegerModel, pixel_codes
from qrobust.integer.program import OutputOp, Program

LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class InputSpec:
    """How float images in [0, 1] become the file's input tensor, and its quantizer.

    ``mean``, ``std``: per channel (or one value for all), applied in float32 as the runtime
    applies them; ``layout``: the file's input layout; ``name``: the file's input name;
    ``scale``, ``zero_point``, ``dtype``: the file's input quantization (uint8 or int8)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str
    name: str
    scale: float
    zero_point: int
    dtype: str

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"input layout '{self.layout}' unknown; valid: {', '.join(LAYOUTS)}")
        if not self.std or any(s == 0 for s in self.std):
            raise ConfigError(f"--std must be non-zero, got {self.std}")

    def feed(self, pixels: np.ndarray) -> np.ndarray:
        """Pixel codes (N, C, H, W) in [0, 255] -> the file's float32 input: ``x = p / 255``
        (as the data loaders compute it), then ``(x - mean) / std``, in the file's layout."""
        x = pixels.astype(np.float32) / np.float32(255.0)
        channels = x.shape[1]
        mean = np.broadcast_to(np.asarray(self.mean, np.float32), (channels,)).reshape(1, -1, 1, 1)
        std = np.broadcast_to(np.asarray(self.std, np.float32), (channels,)).reshape(1, -1, 1, 1)
        x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1) if self.layout == "NHWC" else x)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "layout": self.layout,
                "name": self.name, "scale": self.scale, "zero_point": self.zero_point,
                "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(tuple(d["mean"]), tuple(d["std"]), d["layout"], d["name"], float(d["scale"]),
                   int(d["zero_point"]), d["dtype"])


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_unchanged(path: str | Path, digest: str) -> None:
    """Refuse a source file that is gone or differs from the one imported."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"the imported file {path} is gone; its runtime cannot be run "
                              "(import it again, or restore the file)")
    if sha256(path) != digest:
        raise CheckpointError(f"{path} changed since it was imported (sha256 differs); import it "
                              "again with `qrobust import`")


@dataclass(frozen=True)
class Imported:
    """An imported file: ``program`` (exact integer program), ``input`` (its input spec),
    ``source`` (absolute path) and ``sha256``, ``format`` ('onnx', 'tflite') and
    ``runtime(x)``: float images (N, C, H, W) in [0, 1] -> the file's own runtime's float
    outputs (np.ndarray (N, K)), images read on the 1/255 grid. ``runtime_softmax``: the file
    ends with a softmax the program leaves out (the same argmax; output codes do not compare)."""

    program: Program
    input: InputSpec
    source: str
    sha256: str
    format: str
    runtime: Callable[[torch.Tensor], np.ndarray]
    runtime_softmax: bool = False


class ProgramIntegerModel(IntegerModel):
    """The reference executor over a given program (an imported file has no twin to lower)."""

    backend = "reference"

    def __init__(self, program: Program, chunk: int = 64) -> None:
        super().__init__(None)
        from qrobust.integer.reference import _Executor

        self.program = program
        self.chunk = chunk
        self._executor = _Executor(program)

    @torch.no_grad()
    def forward_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        outs = [self._executor.run(codes[i:i + self.chunk])["logits"]
                for i in range(0, len(codes), self.chunk)]
        return torch.cat(outs) if outs else torch.empty(0)

    @torch.no_grad()
    def intermediate_codes(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = [self._executor.run(codes[i:i + self.chunk], keep=True)
                 for i in range(0, len(codes), self.chunk)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def output_codes(program: Program, logits: torch.Tensor | np.ndarray) -> torch.Tensor | None:
    """The output codes behind dequantized logits ``(q - z) * s`` (exact: |q - z| <= 255 and s
    float32), or None when the output is an accumulator (float output of the file)."""
    out = next(op for op in program.ops if isinstance(op, OutputOp))
    if out.inp not in program.codes:
        return None
    scale = out.scale.float() if out.scale.ndim == 0 else out.scale.float().view(1, -1)
    return torch.round(torch.as_tensor(logits).float() / scale).long() + out.zero_point


@dataclass(frozen=True)
class Agreement:
    """Our integer program vs the file's runtime on ``n`` images."""

    n: int
    same_prediction: float  # share of images with the same argmax
    max_code_diff: int | None  # largest |output code difference| (None: float output)
    code_mismatch: float | None  # share of output codes that differ
    accuracy_runtime: float | None = None
    accuracy_program: float | None = None


@torch.no_grad()
def agreement(imported: Imported, integer: IntegerModel, x: torch.Tensor,
              y: torch.Tensor | None = None, batch_size: int = 256) -> Agreement:
    """Compare ``integer`` (the program's executor) with the file's runtime on images ``x``."""
    ours, theirs = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        ours.append(integer.forward_pixels(pixel_codes(xb)))
        theirs.append(torch.from_numpy(np.asarray(imported.runtime(xb), np.float32)))
    a, b = torch.cat(ours), torch.cat(theirs).reshape(len(x), -1)
    same = float((a.argmax(1) == b.argmax(1)).float().mean())
    qa, qb = output_codes(imported.program, a), output_codes(imported.program, b)
    diff = None if qa is None or imported.runtime_softmax else (qa - qb).abs()
    acc = (lambda z: float((z.argmax(1) == y).float().mean())) if y is not None else None
    return Agreement(len(x), same, None if diff is None else int(diff.max()),
                     None if diff is None else float((diff > 0).float().mean()),
                     acc(b) if acc else None, acc(a) if acc else None)
