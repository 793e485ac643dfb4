"""`qrobust train` and `qrobust eval`."""

from __future__ import annotations

import json

import typer

from qrobust.checkpoint import load_checkpoint, read_meta, save_checkpoint
from qrobust.cli.app import app
from qrobust.cli.common import DataDir, Download, NoVerify, Out, ckpt_option, cli_progress
from qrobust.data import load_dataset, take
from qrobust.train import accuracy, default_config, fit


@app.command("train")
def train_cmd(
    model: str = typer.Option(..., "--model", help="Architecture: mlp, small-cnn, resnet20."),
    data: str = typer.Option(..., "--data", help="Dataset name or an .npz arrays file."),
    out: str = Out,
    epochs: int = typer.Option(None, "--epochs"),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    batch_size: int = typer.Option(None, "--batch-size"),
    optimizer: str = typer.Option(None, "--optimizer", help="sgd or adam."),
    schedule: str = typer.Option(None, "--schedule", help="onecycle, cosine or constant."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout rate after hidden layers."),
    noise_sigma: float = typer.Option(None, "--noise-sigma", help="Gaussian augmentation sigma."),
    patience: int = typer.Option(None, "--patience", help="Early-stopping patience (epochs)."),
    seed: int = typer.Option(0, "--seed"),
    init: str = typer.Option(None, "--init", help="Start from this checkpoint's weights (fine-tune)."),
    data_dir: str = DataDir, download: bool = Download, no_verify: bool = NoVerify,
) -> None:
    """Train a model and save it (safetensors + metadata) with its test accuracy."""
    from qrobust.errors import ConfigError
    from qrobust.models import MODELS

    MODELS.get(model)  # unknown names fail before any data is read
    if optimizer not in (None, "sgd", "adam") or schedule not in (None, "onecycle", "cosine", "constant"):
        raise ConfigError("--optimizer must be sgd or adam; --schedule onecycle, cosine or constant")
    ds = load_dataset(data, data_dir, download=download, verify=not no_verify)
    cfg = default_config(model, ds.name, epochs=epochs, lr=lr, batch_size=batch_size,
                         optimizer=optimizer, schedule=schedule, noise_sigma=noise_sigma,
                         patience=patience, seed=seed)
    start = load_checkpoint(init, expect_arch=model)[0].train() if init else None
    fitted = fit(model, ds, cfg, dropout=dropout, model=start, progress=cli_progress())
    if init:
        fitted.meta["init_from"] = init
    save_checkpoint(out, fitted.model, fitted.meta)
    m = fitted.meta["metrics"]
    typer.echo(f"{model} on {ds.name}: test accuracy {m['test_acc']:.4f} (n={m['n_test']}), "
               f"{m['epochs_run']} epochs in {m['train_seconds']:.0f}s -> {out}")


@app.command("eval")
def eval_cmd(ckpt: str = ckpt_option(), limit: int = typer.Option(None, "--limit", help="First N test points."),
             data_dir: str = DataDir, no_verify: bool = NoVerify,
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Clean test accuracy of a checkpoint on the dataset it was trained on."""
    meta = read_meta(ckpt)
    model, meta = load_checkpoint(ckpt)
    ds = load_dataset(meta["dataset"], data_dir, verify=not no_verify)
    test = take(ds.test, limit)
    acc = accuracy(model, test, progress=cli_progress())
    if as_json:
        typer.echo(json.dumps({"ckpt": ckpt, "dataset": ds.name, "n": len(test), "accuracy": acc}))
    else:
        typer.echo(f"{meta['model']['arch']} on {ds.name}: clean accuracy {acc:.4f} (n={len(test)})")
