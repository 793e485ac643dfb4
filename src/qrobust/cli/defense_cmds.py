"""`qrobust train-dq`, `qrobust train-ensemble` and `qrobust amplification` (issue 7)."""

from __future__ import annotations

import json

import typer

from qrobust.cli.app import app
from qrobust.cli.common import DataDir, Download, NoVerify, Out, cli_progress


def _fraction(text: str) -> float:
    """'8/255' or '0.03' -> float."""
    from qrobust.errors import ConfigError

    try:
        num, _, den = text.partition("/")
        return float(num) / float(den) if den else float(num)
    except ValueError:
        raise ConfigError(f"cannot read eps '{text}'; write e.g. 8/255 or 0.031") from None


@app.command("train-dq")
def train_dq_cmd(
    model: str = typer.Option("small-cnn", "--model", help="Architecture: mlp, small-cnn, resnet20."),
    data: str = typer.Option(..., "--data", help="Dataset name."),
    out: str = Out,
    wbits: int = typer.Option(4, "--wbits", help="Weight bits."),
    abits: int = typer.Option(4, "--abits", help="Activation bits (ReLU6-clipped), 1-5 in the paper."),
    beta: float = typer.Option(3e-4, "--beta", help="Lipschitz regularizer strength (0: vanilla QAT)."),
    init: str = typer.Option(None, "--init", help="Float checkpoint to fine-tune from."),
    epochs: int = typer.Option(None, "--epochs"),
    lr: float = typer.Option(None, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    data_dir: str = DataDir, download: bool = Download, no_verify: bool = NoVerify,
) -> None:
    """Defensive Quantization (arXiv 1904.08444): QAT with the Lipschitz regularizer."""
    from qrobust.checkpoint import load_checkpoint, save_checkpoint
    from qrobust.data import load_dataset
    from qrobust.defenses.dq import dq_recipe, fit_dq
    from qrobust.models import MODELS
    from qrobust.train import default_config

    MODELS.get(model)
    dq_recipe(wbits, abits)  # validate before reading data
    ds = load_dataset(data, data_dir, download=download, verify=not no_verify)
    float_model, init_meta = load_checkpoint(init, expect_arch=model) if init else (None, None)
    cfg = default_config(model, ds.name, epochs=epochs, lr=lr, seed=seed)
    fitted = fit_dq(model, ds, cfg, wbits, abits, beta, init=float_model, progress=cli_progress())
    if init_meta is not None:  # the fine-tuned model keeps the spec it was trained with
        fitted.meta["model"] = init_meta["model"]
    save_checkpoint(out, fitted.model, fitted.meta, kind="quantized")
    m = fitted.meta["metrics"]
    typer.echo(f"DQ {model} w{wbits}a{abits} beta={beta:g} on {ds.name}: test accuracy "
               f"{m['test_acc']:.4f} (n={m['n_test']}) -> {out}")


@app.command("train-ensemble")
def train_ensemble_cmd(
    model: str = typer.Option("small-cnn", "--model"),
    data: str = typer.Option(..., "--data", help="Dataset name."),
    out: str = Out,
    k: int = typer.Option(3, "--k", help="Ensemble members."),
    bits: int = typer.Option(4, "--bits", help="Stochastic quantizer bits."),
    weight: float = typer.Option(0.1, "--mi-weight", help="Weight of the RBF-CKA diversity term."),
    reduce: str = typer.Option("mean", "--reduce", help="mean or vote."),
    epochs: int = typer.Option(None, "--epochs"),
    lr: float = typer.Option(None, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    data_dir: str = DataDir, download: bool = Download, no_verify: bool = NoVerify,
) -> None:
    """Train an ensemble of stochastic-quantizer networks with a diversity term (arXiv 2312.00105)."""
    from qrobust.checkpoint import save_checkpoint
    from qrobust.data import load_dataset
    from qrobust.defenses.ensemble import fit_sq_ensemble
    from qrobust.errors import ConfigError
    from qrobust.models import MODELS
    from qrobust.train import default_config

    MODELS.get(model)
    if reduce not in ("mean", "vote"):
        raise ConfigError(f"--reduce must be mean or vote, got '{reduce}'")
    ds = load_dataset(data, data_dir, download=download, verify=not no_verify)
    cfg = default_config(model, ds.name, epochs=epochs, lr=lr, seed=seed)
    fitted = fit_sq_ensemble(model, ds, cfg, k=k, bits=bits, weight=weight, reduce=reduce,
                             progress=cli_progress())
    save_checkpoint(out, fitted.model, fitted.meta, kind="sq-ensemble")
    m = fitted.meta["metrics"]
    typer.echo(f"SQ ensemble k={k} {bits}-bit {model} on {ds.name}: test accuracy "
               f"{m['test_acc']:.4f} (n={m['n_test']}) -> {out}")


CKPTS = typer.Option(..., "--ckpt", help="Checkpoints to compare (repeat); the perturbation is "
                     "PGD on the first one.")


@app.command("amplification")
def amplification_cmd(
    ckpt: list[str] = CKPTS,
    eps: str = typer.Option("8/255", "--eps", help="Linf budget of the PGD perturbation."),
    limit: int = typer.Option(256, "--limit", help="Test images used."),
    plot: str = typer.Option(None, "--plot", help="Write a PNG of the ratios here."),
    seed: int = typer.Option(0, "--seed"),
    data_dir: str = DataDir, no_verify: bool = NoVerify,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Layer-wise error amplification ||f_l(x+d)-f_l(x)|| / ||f_l(x)|| (DQ, arXiv 1904.08444)."""
    import torch

    import qrobust.defenses  # noqa: F401  (registers the dq / sq-ensemble checkpoint kinds)
    from qrobust.attacks import ATTACKS, Autograd, ThreatModel
    from qrobust.checkpoint import load_checkpoint
    from qrobust.data import load_dataset, take
    from qrobust.defenses.amplification import compare_amplification
    from qrobust.report.plots import plot_amplification

    loaded = [load_checkpoint(c) for c in ckpt]
    ds = load_dataset(loaded[0][1]["dataset"], data_dir, verify=not no_verify)
    x, y = take(ds.test, limit, seed=seed).tensors()
    first = loaded[0][0]
    attack = ATTACKS.get("pgd")(first, ThreatModel("linf", _fraction(eps)), steps=10,
                                estimator=Autograd(), early_stop=False)
    delta = attack(x, y, generator=torch.Generator().manual_seed(seed)) - x
    results = compare_amplification({c: m for c, (m, _) in zip(ckpt, loaded, strict=True)}, x, delta)
    if plot:
        plot_amplification(results, plot)
    if as_json:
        typer.echo(json.dumps(results))
        return
    for name, rows in results.items():
        typer.echo(name + ": " + "  ".join(f"{r['index']}:{r['mean']:.3f}" for r in rows))
