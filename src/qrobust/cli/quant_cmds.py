"""`qrobust quantize` (PTQ, optional QAT) and `qrobust export` (ONNX int8 / fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer

from qrobust.checkpoint import atomic_write_bytes, load_checkpoint, read_meta
from qrobust.cli.app import app
from qrobust.cli.common import DataDir, NoVerify, Out, ReduceRange, ckpt_option, cli_progress
from qrobust.errors import CheckpointError, ConfigError

# default test images evaluated (twin and integer model): all of MNIST's, Fashion-MNIST's or
# CIFAR-10's 10,000 (MNIST small-cnn: 28 s on 2 cores), a seeded subset of a larger test set
EVAL_LIMIT = 10_000


@app.command("quantize")
def quantize_cmd(
    ckpt: str = ckpt_option(required=False),
    model_spec: str = typer.Option(None, "--model", help="Your own PyTorch classifier instead of "
                                   "--ckpt: 'package.module:factory', a callable returning an "
                                   "nn.Module (N, C, H, W) -> logits; the module must be "
                                   "importable here and wherever the checkpoint is loaded."),
    model_kwargs: str = typer.Option(None, "--model-kwargs", help="With --model: the factory's "
                                     "keyword arguments as JSON, e.g. '{\"width\": 16}'."),
    weights: str = typer.Option(None, "--weights", help="With --model: its weights, a "
                                ".safetensors file or a state dict saved with torch.save (read "
                                "with torch.load(weights_only=True))."),
    data: str = typer.Option(None, "--data", help="With --model: the dataset it classifies "
                             "(calibration, evaluation, and what attack / certify use later)."),
    input_mean: str = typer.Option(None, "--input-mean", help="With --model: the per-channel "
                                   "mean its inputs were normalized with, in [0, 1] pixel units "
                                   "(one value or one per channel); default: the model's own (a "
                                   "qrobust Normalize layer, input_mean / input_std attributes, "
                                   "timm's pretrained_cfg). 0 with --input-std 1: raw [0, 1] images."),
    input_std: str = typer.Option(None, "--input-std", help="With --model: the per-channel std "
                                  "(see --input-mean)."),
    recipe: str = typer.Option(..., "--recipe", help="e.g. w8a8, w4a4, 'w4a4,first=8,last=8', w3."),
    calib: int = typer.Option(512, "--calib", help="Calibration images from the training set."),
    reduce_range: str = ReduceRange,
    qat_epochs: int = typer.Option(0, "--qat-epochs", help="QAT fine-tuning epochs (0: PTQ only)."),
    qat_lr: float = typer.Option(None, "--qat-lr", help="QAT learning rate (default 1e-4, Adam)."),
    eval_limit: int = typer.Option(EVAL_LIMIT, "--eval-limit", help="Test images to evaluate "
                                   "twin and integer model on (a seeded subset of a larger test "
                                   "set); 0: all."),
    seed: int = typer.Option(0, "--seed"),
    out: str = Out, data_dir: str = DataDir, no_verify: bool = NoVerify,
) -> None:
    """Quantize a float checkpoint, or your own PyTorch classifier (--model), with PTQ and
    optional QAT, and save the quantized twin as a checkpoint for attack, certify and verify."""
    from qrobust.data import load_dataset, take
    from qrobust.hardware import cpu_info
    from qrobust.integer import to_integer
    from qrobust.quant import quantize, resolve_reduce_range, save_quantized
    from qrobust.quant.qat import finetune, qat_config
    from qrobust.train import predict

    parsed = resolve_reduce_range(recipe, reduce_range)  # bad recipes fail before data is read
    if calib < 1 or qat_epochs < 0 or eval_limit < 0:
        raise ConfigError("--calib must be >= 1, --qat-epochs and --eval-limit >= 0")
    user = user_options(ckpt, model_spec, model_kwargs, weights, data, input_mean, input_std)
    if user is None:
        if read_meta(ckpt).get("kind", "float") != "float":
            raise CheckpointError(f"{ckpt} is already quantized; pass a float checkpoint")
        model, meta = load_checkpoint(ckpt)
        data = meta["dataset"]
    ds = load_dataset(data, data_dir, verify=not no_verify)
    x_calib, _ = take(ds.train, calib, seed).tensors()
    progress = cli_progress()
    if user is None:
        twin = quantize(model, parsed, x_calib, progress=progress)
    else:
        from qrobust.quant import quantize_user, user_model_meta

        twin = quantize_user(model_spec, parsed, x_calib, progress=progress, **user)
        meta = {"model": user_model_meta(model_spec, twin, ds.num_classes, user["kwargs"],
                                         weights), "dataset": ds.name}
    test = take(ds.test, eval_limit or None)  # seeded subset, as `qrobust eval --limit`
    labels = torch.from_numpy(test.y).long()

    def acc(net, desc: str) -> tuple[float, torch.Tensor]:
        pred = predict(net, test, progress=progress, desc=desc)
        return float((pred == labels).float().mean()), pred

    metrics: dict = {}
    metrics["ptq_twin_acc"], twin_pred = acc(twin, "evaluate twin")
    if qat_epochs:
        result = finetune(twin, ds, qat_config(qat_epochs, qat_lr, seed, dataset=ds.name),
                          progress=progress)
        metrics["qat_best_val_acc"] = result.best_val_acc
        metrics["twin_acc"], twin_pred = acc(twin, "evaluate twin")
    else:
        metrics["twin_acc"] = metrics["ptq_twin_acc"]  # PTQ only: the same twin
    if parsed.act is not None and parsed.act.bits <= 8:  # the exact reference executor
        metrics["integer_acc"], int_pred = acc(to_integer(twin), "evaluate integer model")
        metrics["twin_integer_agreement"] = float((int_pred == twin_pred).float().mean())
    metrics["n_eval"], metrics["n_test"] = len(test), len(ds.test)
    save_quantized(out, twin, meta, calib=calib, qat_epochs=qat_epochs, seed=seed, metrics=metrics,
                   reduce_range={"mode": reduce_range, "cpu": cpu_info().to_dict()})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                      if isinstance(v, float) and not k.startswith("n_"))
    which = ("all" if len(test) == len(ds.test) else
             f"a seeded subset of {len(test)} of the {len(ds.test)}")
    typer.echo(f"{meta['model']['arch']} {parsed.text}: {shown} on {which} test images "
               f"-> {out}")


def user_options(ckpt: str | None, spec: str | None, kwargs: str | None, weights: str | None,
                 data: str | None, mean: str | None, std: str | None) -> dict | None:
    """The keyword arguments of ``quantize_user`` from the --model options (None with --ckpt);
    one-line ConfigErrors for options that do not go together."""
    from qrobust.cli.import_cmds import parse_floats

    if (ckpt is None) == (spec is None):
        raise ConfigError("give exactly one of --ckpt (a float checkpoint) or --model (your own "
                          "PyTorch classifier, 'package.module:factory')")
    if spec is None:
        if any(v is not None for v in (kwargs, weights, data, mean, std)):
            raise ConfigError("--model-kwargs, --weights, --data, --input-mean and --input-std "
                              "go with --model; a checkpoint stores its own")
        return None
    if data is None:
        raise ConfigError("--model needs --data: the dataset the model classifies")
    try:
        parsed = json.loads(kwargs) if kwargs else {}
    except json.JSONDecodeError as err:
        raise ConfigError(f"--model-kwargs is not JSON ({err}); e.g. '{{\"width\": 16}}'") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object, got {kwargs}")
    return {"weights": weights, "kwargs": parsed,
            "input_mean": parse_floats(mean, "input-mean") if mean is not None else None,
            "input_std": parse_floats(std, "input-std") if std is not None else None}


@app.command("export")
def export_cmd(
    ckpt: str = ckpt_option(),
    fmt: str = typer.Option("onnx-int8", "--format",
                            help="onnx-int8 (QDQ), onnx-int8-qoperator (QLinear ops), "
                                 "onnx-int8-rounded-add (QDQ for OpenVINO) or onnx-fp32."),
    out: str = Out,
) -> None:
    """Export a quantized checkpoint as an ONNX model (int8 integer ops, or the fp32 graph)."""
    from qrobust.integer.int8 import u8s8_safe
    from qrobust.integer.onnx import export_int8, float_model_proto, int8_kernels, weight_types
    from qrobust.integer.program import ConvOp, LinearOp, lower

    int8_formats = {"onnx-int8": "qdq", "onnx-int8-qoperator": "qoperator",
                    "onnx-int8-rounded-add": "qdq-rounded-add"}
    valid = sorted([*int8_formats, "onnx-fp32"])
    if fmt not in valid:
        raise ConfigError(f"unknown export format '{fmt}'; valid: {', '.join(valid)}")
    if read_meta(ckpt).get("kind") != "quantized":
        raise CheckpointError(f"{ckpt} is not a quantized checkpoint; run `qrobust quantize` first")
    twin, meta = load_checkpoint(ckpt)
    program = lower(twin, tuple(meta["model"]["input_shape"]))
    note = ""
    if fmt == "onnx-fp32":
        proto = float_model_proto(program)
    else:  # int8 weights where this CPU runs them exactly (or they cannot saturate anywhere)
        proto = export_int8(program, int8_formats[fmt], int8_kernels().exact_u8s8)
        layers = [op for op in program.ops if isinstance(op, (ConvOp, LinearOp))]
        risky = sum(t == "int8" and not u8s8_safe(op.weight)
                    for t, op in zip(weight_types(proto), layers, strict=True))
        note = (f"; weights {', '.join(f'{weight_types(proto).count(t)} {t}' for t in ('int8', 'uint8'))}"
                + (f" ({risky} int8 layers are exact only on CPUs with VNNI; quantize with "
                   "--reduce-range on for a file exact on every x86 CPU)" if risky else ""))
    target = Path(out)
    atomic_write_bytes(target, lambda tmp: Path(tmp).write_bytes(proto.SerializeToString()))
    typer.echo(f"{fmt}: {len(proto.graph.node)} nodes{note} -> {target}")
