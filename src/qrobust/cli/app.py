"""The Typer application and its global options; command modules add their commands to it."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adversarial robustness of quantized neural networks.")


def _version(show: bool) -> None:
    if show:
        from qrobust.provenance import versions

        typer.echo(f"qrobust {versions().get('qrobust', '?')}")
        raise typer.Exit()


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings only; no progress bars."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit (`qrobust doctor`: "
                                            "backends, datasets, CPU).")) -> None:
    from qrobust.cli.common import set_quiet

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    set_quiet(quiet)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
