"""`qrobust certify`: randomized-smoothing certificates of a checkpoint, one image at a time.

Every image's certificate is one row of ``<out>/results.sqlite`` (table ``certify``), keyed by
the resolved config, so an interrupted run resumes where it stopped and gives the same numbers;
``<out>/summary.json`` holds the certified accuracy at radii 0, 0.25, 0.5, 0.75, 1.0 over the
images of this run. The work is :func:`qrobust.eval.certification.certify_images`, in this
process or (``--executor ray``) as one Ray task per image.
"""

from __future__ import annotations

import typer

from qrobust.cli.app import app
from qrobust.cli.common import DataDir, NoVerify, Out, ReduceRange, ckpt_option, cli_progress
from qrobust.errors import ConfigError


@app.command("certify")
def certify_cmd(
    ckpt: str = ckpt_option(),
    sigma: float = typer.Option(0.25, "--sigma", help="Noise std in [0, 1] pixel units."),
    n0: int = typer.Option(100, "--n0", help="Samples to select the class."),
    n: int = typer.Option(10_000, "--n", help="Samples to bound its probability."),
    alpha: float = typer.Option(0.001, "--alpha", help="Failure probability per image."),
    out: str = Out,
    integer: bool = typer.Option(False, "--integer", help="Integer-only smoothing (IntRS) of "
                                 "the checkpoint's IntegerModel (an imported checkpoint: its "
                                 "program on the reference executor, --integer-input clipped)."),
    noise: str = typer.Option("gaussian", "--noise", help="gaussian (float), or with --integer: "
                              "rounded-gaussian (default) or discrete-gaussian (IntRS)."),
    recipe: str = typer.Option("w8a8", "--recipe", help="Quantization recipe for --integer "
                               "with a float checkpoint."),
    reduce_range: str = ReduceRange,
    backend: str = typer.Option("onnx", "--backend", help="Integer backend: onnx, reference or openvino."),
    integer_input: str = typer.Option("wide", "--integer-input", help="With --integer: 'wide' "
                                      "(the model sees the unclipped noisy image, as float "
                                      "smoothing does) or 'clipped' (codes clipped to [0, 255])."),
    limit: int = typer.Option(None, "--limit", help="N test points (a seeded choice)."),
    first: bool = typer.Option(False, "--first", help="With --limit: the first N test points "
                               "in order instead."),
    batch_size: int = typer.Option(1000, "--batch-size", help="Noisy images per forward pass."),
    seed: int = typer.Option(0, "--seed"),
    executor: str = typer.Option("local", "--executor", help="local (this process) or ray "
                                 "(one task per image; pip install 'qrobust[ray]')."),
    address: str = typer.Option(None, "--address", help="Ray cluster to join (--executor ray): "
                                "auto, HOST:6379 or ray://HOST:10001; default: a local Ray "
                                "instance with --workers workers."),
    workers: int = typer.Option(None, "--workers", help="Local Ray workers (--executor ray "
                                "without --address); default: one per core."),
    device: str = typer.Option("cpu", "--device", help="Float smoothing only: cpu or cuda "
                               "(the integer model runs on ONNX Runtime's CPU kernels)."),
    data_dir: str = DataDir, no_verify: bool = NoVerify,
) -> None:
    """Certify test images with randomized smoothing (Cohen et al.; IntRS with --integer) of a
    float, quantized or imported checkpoint (float smoothing of a quantized or imported one
    smooths its differentiable twin)."""
    from qrobust.eval.certification import EXECUTORS, CertifyJob, certify_images

    EXECUTORS.get(executor)  # an unknown executor fails before any work
    if (address or workers is not None) and executor != "ray":
        raise ConfigError("--address and --workers are for --executor ray")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    job = CertifyJob(ckpt=str(ckpt), sigma=sigma, n0=n0, n=n, alpha=alpha, integer=integer,
                     noise=noise, recipe=recipe, reduce_range=reduce_range, backend=backend,
                     integer_input=integer_input, batch_size=batch_size, seed=seed,
                     device=device, data_dir=data_dir, verify=not no_verify)
    options = {"address": address, "num_cpus": workers} if executor == "ray" else {}
    result = certify_images(job, out, limit, executor, progress=cli_progress(), first=first,
                            **options)
    summary = result.summary
    acc = " ".join(f"r={r}: {v:.3f}" for r, v in summary["certified_accuracy"].items())
    kind = f"integer ({summary['config']['noise']})" if integer else "float"
    typer.echo(f"{kind} smoothing, sigma={sigma}, n={n}, {len(result.rows)} images: certified "
               f"accuracy {acc}; abstained {summary['abstain_rate']:.3f} -> {out}")
