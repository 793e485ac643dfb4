"""`qrobust datasets`: which datasets are found where, and how to get the missing ones."""

from __future__ import annotations

import typer

from qrobust.cli import app
from qrobust.cli.common import DataDir
from qrobust.data import LOADERS, dataset_names, search_roots


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
