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
    certified_eps: float = typer.Option(
        None, "--certified-eps", help="Certified training (QA-IBP) of the quantized twin for "
        "this L-inf radius in [0, 1] pixel units (26/255 ~ 0.1): saves a quantized checkpoint "
        "for `qrobust verify`."),
    recipe: str = typer.Option(None, "--recipe", help="Quantization recipe of --certified-eps "
                               "(default w8a8,pt,relu6: one output scale, exact margins)."),
    ibp_weight: float = typer.Option(1.0, "--ibp-weight", help="Final weight of the worst-case "
                                     "loss beside the clean loss (--certified-eps)."),
    certified_box: float = typer.Option(
        1.0, "--certified-box", help="SABR: bound a box of this fraction of the ball around a "
        "PGD point instead of the whole ball (1: QA-IBP; 0.2-0.4 trades a looser training "
        "bound for clean accuracy, proofs then need the complete verifier)."),
    data_dir: str = DataDir, download: bool = Download, no_verify: bool = NoVerify,
) -> None:
    """Train a model and save it (safetensors + metadata) with its test accuracy; with
    --certified-eps, a quantized model trained to be verifiably robust."""
    from qrobust.errors import ConfigError
    from qrobust.models import MODELS

    MODELS.get(model)  # unknown names fail before any data is read
    if certified_eps is None and (recipe is not None or ibp_weight != 1.0 or certified_box != 1.0):
        raise ConfigError("--recipe, --ibp-weight and --certified-box go with --certified-eps")
    if certified_eps is not None:
        from qrobust.defenses.certified import DEFAULT_RECIPE, IntervalLoss
        from qrobust.quant import parse_recipe

        recipe = recipe or DEFAULT_RECIPE
        parse_recipe(recipe)  # validate before reading data
        IntervalLoss(certified_eps, 0, 0, ibp_weight, certified_box)
    if optimizer not in (None, "sgd", "adam") or schedule not in (None, "onecycle", "cosine", "constant"):
        raise ConfigError("--optimizer must be sgd or adam; --schedule onecycle, cosine or constant")
    ds = load_dataset(data, data_dir, download=download, verify=not no_verify)
    cfg = default_config(model, ds.name, epochs=epochs, lr=lr, batch_size=batch_size,
                         optimizer=optimizer, schedule=schedule, noise_sigma=noise_sigma,
                         patience=patience, seed=seed)
    start = load_checkpoint(init, expect_arch=model)[0].train() if init else None
    if certified_eps is not None:
        from qrobust.defenses.certified import fit_certified

        fitted = fit_certified(model, ds, cfg, certified_eps, recipe, init=start,
                               weight=ibp_weight, progress=cli_progress(), box=certified_box)
    else:
        fitted = fit(model, ds, cfg, dropout=dropout, model=start, progress=cli_progress())
    if init:
        fitted.meta["init_from"] = init
    save_checkpoint(out, fitted.model, fitted.meta,
                    kind="float" if certified_eps is None else "quantized")
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
