"""`qrobust verify`: complete L-infinity verification of a quantized (or imported) checkpoint's
integer program on the first N test images (docs/verification.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from qrobust.cli.app import app
from qrobust.cli.common import DataDir, NoVerify, ckpt_option, cli_progress
from qrobust.errors import ConfigError
from qrobust.verify.run import EPS_HELP


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value:g}")


def table(summaries: dict[int, dict]) -> str:
    """The per-eps summary as aligned text columns."""
    head = ("eps codes", "verified", "vulnerable", "timeout", "clean", "median s", "max s")

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [head] + [(str(e), f"{s['verified_acc']:.4f} ({s['robust']}/{s['n']})",
                      str(s["vulnerable"]), str(s["timeout"]), f"{s['clean_acc']:.4f}",
                      num(s["median_seconds"], ".3f"), num(s["max_seconds"], ".3f"))
                     for e, s in summaries.items()]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True))
                     for r in rows)


@app.command("verify")
def verify_cmd(
    ckpt: str = ckpt_option(),
    eps: list[str] = typer.Option(..., "--eps", help="L-infinity radius (repeatable): "  # noqa: B008
                                  + EPS_HELP + "."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds per query (> 0)."),
    limit: int = typer.Option(100, "--limit", help="The first N test images (>= 1)."),
    data: str = typer.Option(None, "--data", help="Dataset (default: the checkpoint's)."),
    out: str = typer.Option(None, "--out", help="Per-query JSON file (written atomically)."),
    workers: int = typer.Option(1, "--workers", help="Queries verified at once, each in its "
                                "own process on one core."),
    ties: str = typer.Option("first", "--ties", help="first (the executor's argmax: ties to "
                             "the lowest index) or label (the label wins ties)."),
    data_dir: str = DataDir, no_verify: bool = NoVerify,
) -> None:
    """Prove or refute robustness of the deployed integer model: for each correctly classified
    test image, is every input within eps pixel codes (L-infinity) classified the same?
    Each answer is robust (a proof), vulnerable (a checked counterexample) or timeout."""
    from qrobust.checkpoint import atomic_write_bytes, load_checkpoint, read_meta
    from qrobust.data import load_dataset
    from qrobust.integer.base import pixel_codes
    from qrobust.verify.run import eps_codes, integer_program, verify_points
    from qrobust.verify.search import TIES

    radii = list(dict.fromkeys(eps_codes(e) for e in eps))  # bad input fails before any work
    _positive("--timeout", timeout)
    _positive("--limit", limit)
    _positive("--workers", workers)
    if ties not in TIES:
        raise ConfigError(f"unknown tie rule '{ties}'; valid: {', '.join(TIES)}")
    if out is not None and Path(out).is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as results.json")
    if read_meta(ckpt).get("kind") not in ("quantized", "imported"):
        raise ConfigError("verify needs a quantized or imported checkpoint (an integer "
                          "program); quantize it with `qrobust quantize` first")
    import qrobust.integer.imports  # noqa: F401  (registers the "imported" checkpoint kind)
    import qrobust.quant  # noqa: F401  (registers the "quantized" checkpoint kind)

    twin, meta = load_checkpoint(ckpt)
    ds = load_dataset(data or meta["dataset"], data_dir, verify=not no_verify)
    expected = tuple(meta["model"]["input_shape"])
    if ds.input_shape != expected:
        raise ConfigError(f"--data {ds.name} has images of shape {ds.input_shape}; the "
                          f"checkpoint takes {expected} ({meta['dataset']})")
    program = integer_program(twin.eval(), ds.input_shape)
    x, y = ds.test.subset(slice(0, limit)).tensors()
    run = verify_points(program, pixel_codes(x), y, radii, timeout, workers, ties,
                        progress=cli_progress())
    if out is not None:
        result = {"ckpt": ckpt, "dataset": ds.name, "limit": len(y), "timeout": timeout,
                  "ties": ties, "misclassified": run.misclassified,
                  "summary": {str(e): s for e, s in run.summaries.items()},
                  "queries": run.records}
        text = json.dumps(result)
        atomic_write_bytes(Path(out), lambda tmp: Path(tmp).write_text(text))
    typer.echo(f"{meta['model']['arch']} on the first {len(y)} {ds.name} test images, "
               f"{timeout:g} s per query (verified accuracy = robust / all images):")
    typer.echo(table(run.summaries))
    if out is not None:
        typer.echo(f"per-query results -> {out}")
