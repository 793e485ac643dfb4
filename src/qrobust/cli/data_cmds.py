"""`qrobust datasets` (which datasets are found where, and how to get the missing ones) and
`qrobust doctor` (that, plus the versions, optional backends and the CPU's int8 kernels)."""

from __future__ import annotations

import typer

from qrobust.cli.app import app
from qrobust.cli.common import DataDir
from qrobust.data import LOADERS, dataset_names, search_roots

# optional parts: (import name, what it adds, how to install)
OPTIONAL = (("ray", "study executor 'ray'", "pip install 'qrobust[ray]'"),
            ("torchattacks", "benchmark and oracle baselines", "pip install --no-deps torchattacks"))


def _kernels(kernels) -> str:
    verdict = "exact" if kernels.exact_u8s8 else "saturate int16 pair sums here (reduce-range auto)"
    return f"{kernels.runtime}, u8 x s8 kernels {verdict}"


@app.command()
def doctor(data_dir: str = DataDir) -> None:
    """What this installation can do: versions, integer backends, optional parts, datasets."""
    from importlib.util import find_spec

    from qrobust.hardware import cpu_info
    from qrobust.integer import onnx
    from qrobust.provenance import versions

    found = versions()
    typer.echo("qrobust " + found.get("qrobust", "?") + ": " + ", ".join(
        f"{k} {v}" for k, v in found.items() if k not in ("qrobust", "cpu")))
    typer.echo(f"cpu: {cpu_info().describe()}")
    typer.echo("integer backends:")
    typer.echo(f"  {'reference':<13} exact integer executor (any bit width <= 8)")
    typer.echo(f"  {'onnx':<13} {_kernels(onnx.int8_kernels())}")
    if find_spec("openvino"):
        from qrobust.integer import openvino

        typer.echo(f"  {'openvino':<13} {_kernels(openvino.int8_kernels())}")
    else:
        typer.echo(f"  {'openvino':<13} missing  -> pip install 'qrobust[openvino]'")
    typer.echo("optional:")
    for module, adds, how in OPTIONAL:
        state = "installed" if find_spec(module) else f"missing  -> {how}"
        typer.echo(f"  {module:<13} {state}  ({adds})")
    datasets(data_dir)


@app.command()
def datasets(data_dir: str = DataDir) -> None:
    """List datasets: found (and where) or missing (and how to get them)."""
    typer.echo("search order: " + " > ".join(str(r) for r in search_roots(data_dir)))
    for name in dataset_names():
        loader = LOADERS.get(name)
        where = loader.locate(data_dir)
        if where is None:
            typer.echo(f"  {name:<14} missing  -> {loader.how_to_get}")
        else:
            typer.echo(f"  {name:<14} found    {where if name != 'digits' else 'scikit-learn (embedded)'}")
