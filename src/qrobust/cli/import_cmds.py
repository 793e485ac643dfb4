"""`qrobust import`: an int8 file made by another tool (ONNX) -> a qrobust checkpoint (the
integer program and its twin), with its agreement with the file's own runtime."""

from __future__ import annotations

import json

import typer

from qrobust.cli.app import app
from qrobust.cli.common import DataDir, NoVerify, Out
from qrobust.errors import ConfigError

SAME_PREDICTION = 0.999  # the contract: identical predictions on >= 99.9% of the test set


def parse_floats(text: str, name: str) -> tuple[float, ...]:
    """'0.485,0.456,0.406' -> (0.485, 0.456, 0.406)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{name} must be numbers separated by commas, e.g. "
                          f"--{name} 0.5 or --{name} 0.485,0.456,0.406; got '{text}'") from None
    if not values:
        raise ConfigError(f"--{name} is empty")
    return values


@app.command("import")
def import_cmd(
    file: str = typer.Argument(..., help="An int8 .onnx file (QDQ or QOperator)."),
    data: str = typer.Option(..., "--data", help="Dataset whose test split measures agreement "
                             "(and which `qrobust attack` uses later)."),
    mean: str = typer.Option("0", "--mean", help="The file's input normalisation: mean per "
                             "channel (or one value), images in [0, 1]: x' = (x - mean) / std."),
    std: str = typer.Option("1", "--std", help="Standard deviation per channel (or one value)."),
    layout: str = typer.Option("NCHW", "--layout", help="The file's input layout: NCHW or NHWC."),
    limit: int = typer.Option(None, "--limit", help="First N test images (seeded subset)."),
    as_json: bool = typer.Option(False, "--json"),
    out: str = Out, data_dir: str = DataDir, no_verify: bool = NoVerify,
) -> None:
    """Import an int8 ONNX file as a qrobust checkpoint and print how it agrees with the file's
    own runtime on the dataset's test split. Nothing is written unless the import succeeds."""
    from qrobust.data import load_dataset, take
    from qrobust.integer.imports import ProgramIntegerModel, agreement, import_file
    from qrobust.integer.imports.checkpoint import save_imported

    means, stds = parse_floats(mean, "mean"), parse_floats(std, "std")
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be >= 1")
    ds = load_dataset(data, data_dir, verify=not no_verify)
    shape = tuple(int(d) for d in ds.test.x.shape[1:])
    for name, values in (("mean", means), ("std", stds)):
        if len(values) not in (1, shape[0]):
            raise ConfigError(f"--{name} has {len(values)} values; the dataset's images have "
                              f"{shape[0]} channels (give 1 or {shape[0]})")
    imported = import_file(file, mean=means, std=stds, layout=layout.upper(), input_shape=shape)
    x, y = take(ds.test, limit).tensors()
    got = agreement(imported, ProgramIntegerModel(imported.program), x, y)
    metrics = {"n": got.n, "same_prediction": got.same_prediction,
               "max_code_diff": got.max_code_diff, "code_mismatch": got.code_mismatch,
               "clean_acc_runtime": got.accuracy_runtime,
               "clean_acc_integer": got.accuracy_program}
    path = save_imported(out, imported, ds.name, metrics)
    if as_json:
        typer.echo(json.dumps({"file": imported.source, "sha256": imported.sha256,
                               "format": imported.format, "dataset": ds.name, "out": str(path),
                               **metrics}))
        return
    codes = ("float output (no output codes)" if got.max_code_diff is None else
             f"max output code difference {got.max_code_diff} "
             f"({got.code_mismatch:.2%} of codes differ)")
    typer.echo(f"imported {imported.source} ({imported.format}, "
               f"{len(imported.program.ops)} integer ops) -> {path}")
    typer.echo(f"agreement with onnxruntime on {ds.name} test (n={got.n}): predictions "
               f"identical {got.same_prediction:.2%}, {codes}")
    typer.echo(f"clean accuracy: runtime {got.accuracy_runtime:.4f}, integer program "
               f"{got.accuracy_program:.4f}")
    if got.same_prediction < SAME_PREDICTION:
        typer.echo(f"warning: predictions differ on {1 - got.same_prediction:.2%} of the test "
                   "images (contract: < 0.1%); attacks on the twin may not carry over to the file")
