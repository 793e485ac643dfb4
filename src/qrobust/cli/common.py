"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path

import typer

DataDir = typer.Option(None, "--data-dir", help="Directory searched first for dataset files.")
Download = typer.Option(False, "--download", help="Download missing files (needs a network).")
NoVerify = typer.Option(False, "--no-verify", help="Skip checksum checks (your own copies).")
Out = typer.Option(..., "--out", help="Output directory.")


def ckpt_option(required: bool = True):
    return typer.Option(... if required else None, "--ckpt", help="Checkpoint directory or .safetensors file.")


def as_path(p: str | None) -> Path | None:
    return Path(p) if p else None
