"""`qrobust certify`: randomized-smoothing certificates of a checkpoint, one image at a time.

Every image's certificate is one row of ``<out>/results.sqlite`` (table ``certify``), keyed by
the resolved config (weights hash, data, index, sigma, n0, n, alpha, noise, seed), so an
interrupted run resumes where it stopped and gives the same numbers: each image's noise comes
from its own generator seeded with (seed, index). ``<out>/summary.json`` holds the certified
accuracy at radii 0, 0.25, 0.5, 0.75, 1.0 over the images of this run.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import typer

from qrobust.cli import app
from qrobust.cli.common import DataDir, NoVerify, Out, ReduceRange, ckpt_option, cli_progress
from qrobust.errors import ConfigError
from qrobust.progress import bar as progress_bar

TABLE = "certify"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def select_indices(n_test: int, limit: int | None) -> np.ndarray:
    """The test points ``qrobust.data.take(split, limit)`` selects (seeded permutation, sorted)."""
    if limit is None or limit >= n_test:
        return np.arange(n_test)
    if limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    return np.sort(np.random.default_rng(0).permutation(n_test)[:limit])


def summarize(rows: list[dict], radii=(0.0, 0.25, 0.5, 0.75, 1.0)) -> dict:
    """Certified accuracy at ``radii``, abstention rate, mean seconds per image."""
    if not rows:
        return {"n_images": 0}
    n = len(rows)
    m = [r["metrics"] for r in rows]
    acc = {f"{r:g}": sum(x["correct"] and x["radius"] >= r for x in m) / n for r in radii}
    return {"n_images": n, "certified_accuracy": acc,
            "abstain_rate": sum(x["label"] is None for x in m) / n,
            "mean_radius_correct": float(np.mean([x["radius"] if x["correct"] else 0.0
                                                  for x in m])),
            "seconds_per_image": float(np.mean([x["seconds"] for x in m]))}


@app.command("certify")
def certify_cmd(
    ckpt: str = ckpt_option(),
    sigma: float = typer.Option(0.25, "--sigma", help="Noise std in [0, 1] pixel units."),
    n0: int = typer.Option(100, "--n0", help="Samples to select the class."),
    n: int = typer.Option(10_000, "--n", help="Samples to bound its probability."),
    alpha: float = typer.Option(0.001, "--alpha", help="Failure probability per image."),
    out: str = Out,
    integer: bool = typer.Option(False, "--integer", help="Integer-only smoothing (IntRS) of "
                                 "the checkpoint's IntegerModel."),
    noise: str = typer.Option("gaussian", "--noise", help="gaussian (float), or with --integer: "
                              "rounded-gaussian (default) or discrete-gaussian (IntRS)."),
    recipe: str = typer.Option("w8a8", "--recipe", help="Quantization recipe for --integer "
                               "with a float checkpoint."),
    reduce_range: str = ReduceRange,
    backend: str = typer.Option("onnx", "--backend", help="Integer backend: onnx, reference or openvino."),
    integer_input: str = typer.Option("wide", "--integer-input", help="With --integer: 'wide' "
                                      "(the model sees the unclipped noisy image, as float "
                                      "smoothing does) or 'clipped' (codes clipped to [0, 255])."),
    limit: int = typer.Option(None, "--limit", help="First N test points (seeded choice)."),
    batch_size: int = typer.Option(1000, "--batch-size", help="Noisy images per forward pass."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="Float smoothing only: cpu or cuda "
                               "(the integer model runs on ONNX Runtime's CPU kernels)."),
    data_dir: str = DataDir, no_verify: bool = NoVerify,
) -> None:
    """Certify test images with randomized smoothing (Cohen et al.; IntRS with --integer)."""
    from qrobust.certify import Smoothed
    from qrobust.certify.build import holds_for, image_generator, noisy_classifier
    from qrobust.certify.stats import clopper_pearson_lower
    from qrobust.checkpoint import load_checkpoint, weights_path
    from qrobust.data import load_dataset, take
    from qrobust.eval.store import ResultStore, cell_key

    if not sigma > 0 or n0 < 1 or n < 1 or batch_size < 1:
        raise ConfigError("need --sigma > 0 and --n0, --n, --batch-size >= 1")
    clopper_pearson_lower(0, 1, alpha)  # validates alpha with a user-facing message
    if device != "cpu" and integer:
        raise ConfigError("--device applies to float smoothing; integer-only smoothing runs on "
                          "the CPU (drop --device or --integer)")
    try:
        torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available; use --device cpu")
    model, meta = load_checkpoint(ckpt)
    model = model.to(device)
    ds = load_dataset(meta["dataset"], data_dir, verify=not no_verify)
    calib = take(ds.train, 512, seed=1).tensors()[0] if integer else None
    quantized = meta.get("kind") == "quantized"
    noisy = noisy_classifier(model, sigma=sigma, integer=integer, noise=noise,
                             quantized=quantized, recipe=recipe, reduce_range=reduce_range,
                             calib=calib, backend=backend, integer_input=integer_input,
                             input_shape=ds.input_shape)
    smoothed = Smoothed(noisy, ds.num_classes, batch_size=batch_size)
    context = holds_for(noisy)
    base_cfg = {"weights_sha256": file_sha256(weights_path(ckpt)), "dataset": ds.name,
                "split": "test", "sigma": sigma, "n0": n0, "n": n, "alpha": alpha,
                "integer": integer, "noise": context["noise"],
                # the resolved recipe (reduce-range may depend on the CPU), not the option
                "recipe": context.get("recipe") if integer and not quantized else None,
                "backend": backend if integer else None, "seed": seed,
                "device": torch.device(device).type,
                **({"integer_input": integer_input} if integer else {})}
    x_all, y_all = ds.test.tensors()
    indices = select_indices(len(y_all), limit)
    out_dir = Path(out)
    rows = []
    with ResultStore(out_dir / "results.sqlite") as store:
        for index in progress_bar(indices.tolist(), desc="certify", unit="image",
                                  progress=cli_progress(), leave=True):
            cfg = {**base_cfg, "index": index}
            key = cell_key(cfg)
            row = store.get(key)
            if row is None:
                start = time.perf_counter()
                cert = smoothed.certify(x_all[index:index + 1].to(device), n0, n, alpha,
                                        image_generator(seed, index, device))[0]
                label = int(y_all[index])
                metrics = {**cert.to_dict(), "true_label": label,
                           "correct": cert.label == label,
                           "seconds": time.perf_counter() - start}
                store.put(key, TABLE, cfg, metrics, seed=seed)
                row = store.get(key)
            rows.append(row)
    summary = {"config": base_cfg, "ckpt": str(ckpt), "holds_for": context,
               **summarize(rows)}
    from qrobust.checkpoint import atomic_write_bytes

    text = json.dumps(summary, indent=2, sort_keys=True)
    atomic_write_bytes(out_dir / "summary.json", lambda tmp: Path(tmp).write_text(text))
    acc = " ".join(f"r={r}: {v:.3f}" for r, v in summary["certified_accuracy"].items())
    kind = f"integer ({summary['config']['noise']})" if integer else "float"
    typer.echo(f"{kind} smoothing, sigma={sigma}, n={n}, {len(rows)} images: certified "
               f"accuracy {acc}; abstained {summary['abstain_rate']:.3f} -> {out_dir}")
