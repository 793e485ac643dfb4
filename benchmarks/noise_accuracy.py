"""Accuracy of a smoothing base classifier under its noise: float vs integer, clipped or not.

Certified accuracy follows the base classifier's accuracy under noise, so this separates what
each step of integer-only smoothing costs before any certificate is computed:

* ``float``: the float model on x + N(0, sigma^2) (what float smoothing samples);
* ``float_clipped``: the float model on clip(x + noise, 0, 1);
* ``integer_clipped``: the w8a8 ONNX Runtime int8 model on the noisy pixel codes, clipped to
  [0, 255] by its input (the plain IntegerModel);
* ``integer_wide``: the same with its input window widened to [-6 sigma, 1 + 6 sigma]
  (:func:`qrobust.certify.integer_base`, the default of integer smoothing).

Every model sees the same noise draws (float noise, rounded to pixel codes by the integer
models). Whole test split, ``--draws`` draws per image.

    .venv/bin/python benchmarks/noise_accuracy.py --ckpt benchmarks/models/resnet20-cifar10-noise025
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qrobust.certify import integer_base
from qrobust.checkpoint import load_checkpoint
from qrobust.data import load_dataset, take
from qrobust.integer import to_integer
from qrobust.provenance import provenance
from qrobust.quant import quantize


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="benchmarks/models/resnet20-cifar10-noise025")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/noise_accuracy_cifar10.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.ckpt)
    ds = load_dataset(meta["dataset"], args.data_dir)
    twin = quantize(model, args.recipe, calib=take(ds.train, 512, seed=1).tensors()[0])
    options = {"input_shape": ds.input_shape, "threads": args.threads}
    classifiers = {
        "float": lambda x: model(x),
        "float_clipped": lambda x: model(x.clamp(0, 1)),
        "integer_clipped": to_integer(twin, "onnx", **options),
        "integer_wide": integer_base(twin, args.sigma, "onnx", **options),
    }
    x, y = ds.test.tensors()
    generator = torch.Generator().manual_seed(args.seed)
    correct = dict.fromkeys(classifiers, 0)
    for _ in range(args.draws):
        noisy = x + args.sigma * torch.randn(x.shape, generator=generator)
        with torch.no_grad():
            for name, f in classifiers.items():
                correct[name] += int((f(noisy).argmax(1) == y).sum())
    total = args.draws * len(y)
    out = {"benchmark": "noise_accuracy", "ckpt": args.ckpt, "dataset": ds.name,
           "sigma": args.sigma, "recipe": args.recipe, "images": len(y), "draws": args.draws,
           "accuracy_under_noise": {k: v / total for k, v in correct.items()},
           "command": " ".join(["benchmarks/noise_accuracy.py",
                                 *(sys.argv[1:] if argv is None else argv)]), **provenance()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    for name, acc in main()["accuracy_under_noise"].items():
        print(f"{name:16s} {acc:.4f}")
