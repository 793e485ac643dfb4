"""`qrobust run`, `qrobust results`, `qrobust report` and `qrobust demo`."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import typer

from qrobust.cli.app import app
from qrobust.cli.common import cli_progress
from qrobust.errors import ConfigError

Executor = typer.Option("local", "--executor", help="local (default) or ray.")
Address = typer.Option(None, "--address", help="Ray cluster address (ray executor only).")


def _store_path(run_dir: str) -> Path:
    path = Path(run_dir)
    file = path / "results.sqlite" if path.is_dir() or not path.suffix else path
    if not file.is_file():
        raise ConfigError(f"no results store at {file}; run `qrobust run study.yaml --out {run_dir}`")
    return file


@app.command("run")
def run_cmd(config: str = typer.Argument(..., help="Study YAML file."),
            out: str = typer.Option(None, "--out", help="Run directory (default runs/<name>)."),
            executor: str = Executor, address: str = Address,
            no_progress: bool = typer.Option(False, "--no-progress")) -> None:
    """Evaluate every cell of a study not yet in <out>/results.sqlite (resumable)."""
    from qrobust.config import load_study
    from qrobust.eval.executors import EXECUTORS, run_study

    EXECUTORS.get(executor)
    if address and executor != "ray":
        raise ConfigError("--address is for --executor ray")
    study = load_study(config)
    out = out or f"runs/{study.name}"
    options = {"address": address} if address else {}
    s = run_study(study, out, executor, progress=cli_progress(no_progress), **options)
    certified = (f"; certification: {s.images} images, {s.images - s.images_computed} already "
                 f"stored, {s.images_computed} computed" if study.certify else "")
    verified = (f"; verify: {s.verify_cells} cells, {s.verify_cells - s.verify_computed} already "
                f"stored, {s.verify_computed} computed" if study.verify else "")
    typer.echo(f"{study.name}: {s.total} cells, {s.skipped} already stored, {s.computed} computed"
               f"{certified}{verified} in {s.seconds:.1f}s -> {s.store}")


def flat_rows(store_file: Path) -> list[dict]:
    from qrobust.eval.grid import row_label
    from qrobust.eval.store import ResultStore

    with ResultStore(store_file) as store:
        rows = store.rows("robustness")
    out = []
    for r in rows:
        m = {k: v for k, v in r["metrics"].items() if not isinstance(v, dict)}
        out.append({**row_label(r["config"]), **m, "warnings": " | ".join(r["warnings"]),
                    "git_sha": r["git_sha"], "key": r["key"]})
    return out


@app.command("results")
def results_cmd(run_dir: str = typer.Argument(..., help="Run directory or results.sqlite."),
                fmt: str = typer.Option("csv", "--format", help="csv or json.")) -> None:
    """Print the stored cells as CSV or JSON (one row per cell)."""
    if fmt not in ("csv", "json"):
        raise ConfigError(f"--format must be csv or json, got '{fmt}'")
    file = _store_path(run_dir)
    if fmt == "json":
        from qrobust.eval.store import ResultStore

        with ResultStore(file) as store:
            typer.echo(json.dumps(store.rows(), indent=1))
        return
    rows = flat_rows(file)
    buf = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    typer.echo(buf.getvalue(), nl=False)


@app.command("report")
def report_cmd(run_dir: str = typer.Argument(..., help="Run directory."),
               out: str = typer.Option(None, "--out", help="Report directory (default <run>/report).")
               ) -> None:
    """Write report.html (self-contained) and report.md for a run."""
    from qrobust.report import write_report

    file = _store_path(run_dir)
    paths = write_report(file, Path(out) if out else file.parent / "report")
    typer.echo(f"report: {paths['html']} and {paths['md']}")


@app.command("demo")
def demo_cmd(out: str = typer.Option("runs/demo", "--out"),
             executor: str = Executor,
             no_progress: bool = typer.Option(False, "--no-progress")) -> None:
    """digits -> small-cnn -> fp32/w8a8/w4a4/w2a2 -> FGSM and standard-suite sweeps + a
    defense -> report."""
    from qrobust.config import dump_study, parse_study
    from qrobust.eval.executors import run_study
    from qrobust.report import write_report

    start = time.perf_counter()
    study = parse_study(demo_config(), "demo")
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    (outp / "study.yaml").write_text(dump_study(study))
    s = run_study(study, outp, executor, progress=cli_progress(no_progress))
    paths = write_report(s.store, outp / "report")
    typer.echo(f"demo: {s.total} cells ({s.computed} computed) in "
               f"{time.perf_counter() - start:.1f}s; report: {paths['html']}")


def demo_config() -> dict:
    """The demo study (also written to <out>/study.yaml): about a minute of CPU on 2 cores."""
    eps = [0, "4/255", "8/255", "16/255", "32/255", "64/255"]
    return {
        "name": "demo",
        "data": {"dataset": "digits", "n_test": 100},
        "models": [{"name": "small-cnn", "arch": "small-cnn", "train": {"epochs": 12}}],
        "recipes": ["fp32", "w8a8", "w4a4", "w2a2"],
        "defenses": ["none", {"name": "mc-dropout", "params": {"rate": 0.2, "passes": 2}}],
        # the headline is the standard suite (APGD-CE, APGD-T, Square) at one radius and a
        # twentieth of its published budget, to fit a minute (the report says so); FGSM for
        # the full sweep
        "attacks": [{"name": "fgsm", "eps": eps, "params": {"eot_samples": 2}},
                    {"name": "standard", "eps": ["16/255"],
                     "params": {"budget_scale": 0.05, "eot_samples": 2}}],
        "seeds": [0],
    }
