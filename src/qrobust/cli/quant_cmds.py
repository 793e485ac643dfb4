"""`qrobust quantize` (PTQ, optional QAT) and `qrobust export` (ONNX int8 / fp32)."""

from __future__ import annotations

from pathlib import Path

import typer

from qrobust.checkpoint import atomic_write_bytes, load_checkpoint, read_meta
from qrobust.cli import app
from qrobust.cli.common import DataDir, NoVerify, Out, ckpt_option
from qrobust.errors import CheckpointError, ConfigError


@app.command("quantize")
def quantize_cmd(
    ckpt: str = ckpt_option(),
    recipe: str = typer.Option(..., "--recipe", help="e.g. w8a8, w4a4, 'w4a4,first=8,last=8', w3."),
    calib: int = typer.Option(512, "--calib", help="Calibration images from the training set."),
    qat_epochs: int = typer.Option(0, "--qat-epochs", help="QAT fine-tuning epochs (0: PTQ only)."),
    qat_lr: float = typer.Option(None, "--qat-lr", help="QAT learning rate (default 1e-4, Adam)."),
    seed: int = typer.Option(0, "--seed"),
    out: str = Out, data_dir: str = DataDir, no_verify: bool = NoVerify,
) -> None:
    """Quantize a float checkpoint (PTQ, then optional QAT) and save the quantized twin."""
    from qrobust.data import load_dataset, take
    from qrobust.quant import parse_recipe, quantize, save_quantized, to_integer
    from qrobust.quant.qat import finetune, qat_config
    from qrobust.train import accuracy

    parsed = parse_recipe(recipe)  # bad recipes fail before any data is read
    if calib < 1 or qat_epochs < 0:
        raise ConfigError("--calib must be >= 1 and --qat-epochs >= 0")
    if read_meta(ckpt).get("kind", "float") != "float":
        raise CheckpointError(f"{ckpt} is already quantized; pass a float checkpoint")
    model, meta = load_checkpoint(ckpt)
    ds = load_dataset(meta["dataset"], data_dir, verify=not no_verify)
    x_calib, _ = take(ds.train, calib, seed).tensors()
    twin = quantize(model, parsed, x_calib)
    metrics = {"ptq_twin_acc": accuracy(twin, ds.test)}
    if qat_epochs:
        result = finetune(twin, ds, qat_config(qat_epochs, qat_lr, seed))
        metrics["qat_best_val_acc"] = result.best_val_acc
    metrics["twin_acc"] = accuracy(twin, ds.test)
    if parsed.act is not None and parsed.act.bits <= 8:
        metrics["integer_acc"] = accuracy(to_integer(twin), ds.test)
    save_quantized(out, twin, meta, calib=calib, qat_epochs=qat_epochs, seed=seed, metrics=metrics)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
    typer.echo(f"{meta['model']['arch']} {parsed.text}: {shown} -> {out}")


@app.command("export")
def export_cmd(
    ckpt: str = ckpt_option(),
    fmt: str = typer.Option("onnx-int8", "--format",
                            help="onnx-int8 (QDQ), onnx-int8-qoperator (QLinear ops), "
                                 "onnx-int8-rounded-add (QDQ for OpenVINO) or onnx-fp32."),
    out: str = Out,
) -> None:
    """Export a quantized checkpoint as an ONNX model (int8 integer ops, or the fp32 graph)."""
    from qrobust.integer.onnx import export_int8, float_model_proto
    from qrobust.integer.program import lower

    formats = {"onnx-int8": export_int8, "onnx-fp32": float_model_proto,
               "onnx-int8-qoperator": lambda program: export_int8(program, "qoperator"),
               "onnx-int8-rounded-add": lambda program: export_int8(program, "qdq-rounded-add")}
    if fmt not in formats:
        raise ConfigError(f"unknown export format '{fmt}'; valid: {', '.join(sorted(formats))}")
    if read_meta(ckpt).get("kind") != "quantized":
        raise CheckpointError(f"{ckpt} is not a quantized checkpoint; run `qrobust quantize` first")
    twin, meta = load_checkpoint(ckpt)
    proto = formats[fmt](lower(twin, tuple(meta["model"]["input_shape"])))
    target = Path(out)
    atomic_write_bytes(target, lambda tmp: Path(tmp).write_bytes(proto.SerializeToString()))
    typer.echo(f"{fmt}: {len(proto.graph.node)} nodes -> {target}")
