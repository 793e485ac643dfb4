"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path

import typer

DataDir = typer.Option(None, "--data-dir", help="Directory searched first for dataset files.")
Download = typer.Option(False, "--download", help="Download missing files (needs a network).")
NoVerify = typer.Option(False, "--no-verify", help="Skip checksum checks (your own copies).")
Out = typer.Option(..., "--out", help="Output directory.")

_PROGRESS: list[bool | None] = [None]  # set per invocation by `qrobust -q`


def set_quiet(quiet: bool) -> None:
    _PROGRESS[0] = False if quiet else None


def cli_progress(disabled: bool = False) -> bool | None:
    """The ``progress`` argument for library calls: False under -q (or ``disabled``), else
    None (bars shown when stderr is a terminal)."""
    return False if disabled else _PROGRESS[0]


def ckpt_option(required: bool = True):
    return typer.Option(... if required else None, "--ckpt", help="Checkpoint directory or .safetensors file.")


def as_path(p: str | None) -> Path | None:
    return Path(p) if p else None


ReduceRange = typer.Option(
    "auto", "--reduce-range",
    help="Keep 8-bit weights to 7-bit codes so the int8 runtimes' u8 x s8 kernels stay exact on "
         "CPUs without VNNI: auto (only on such a CPU), on, off.")
