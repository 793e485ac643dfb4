"""MNIST small-cnn accuracy table: fp32, and w8a8 / w4a4 / w2a2 / w1a1 after PTQ and after QAT,
for the fake-quant twin and the integer model (reference executor; ORT int8 for w8a8), with
the twin <-> integer prediction agreement on the full test set.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/quant_accuracy.py \
        [--ckpt benchmarks/models/small-cnn-mnist] [--n-test N] [--qat-images 15000]

Writes benchmarks/results/quant_accuracy_mnist.json after every row (partial results survive).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from qrobust.attacks.evaluate import predict
from qrobust.checkpoint import load_checkpoint
from qrobust.data import Dataset, load_dataset, take
from qrobust.integer import to_integer
from qrobust.provenance import provenance
from qrobust.quant import quantize
from qrobust.quant.qat import finetune, qat_config
from qrobust.train import accuracy

RESULTS = Path(__file__).parent / "results" / "quant_accuracy_mnist.json"
RECIPES = ("w8a8", "w4a4", "w2a2", "w1a1")


def measure(twin, ds: Dataset, recipe: str) -> dict:
    """Accuracies and agreement from one prediction pass per model over the test set."""
    x, y = ds.test.tensors()
    t0 = time.perf_counter()
    p_twin = predict(twin, x)
    p_int = predict(to_integer(twin), x)
    row = {"twin_acc": float((p_twin == y).float().mean()),
           "integer_acc": float((p_int == y).float().mean()),
           "twin_integer_agreement": float((p_twin == p_int).float().mean())}
    if recipe.startswith("w8a8"):
        p_ort = predict(to_integer(twin, "onnx", input_shape=tuple(x.shape[1:])), x)
        row["ort_int8_acc"] = float((p_ort == y).float().mean())
        row["twin_ort_agreement"] = float((p_twin == p_ort).float().mean())
    row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="benchmarks/models/small-cnn-mnist")
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--n-test", type=int, default=None,
                    help="evaluate on a seeded subset of the test set (default: all of it)")
    ap.add_argument("--qat-images", type=int, default=15000,
                    help="training images used for QAT (a subset, for CPU time)")
    ap.add_argument("--qat-lr", type=float, default=5e-4)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, meta = load_checkpoint(args.ckpt)
    ds = load_dataset(meta["dataset"])
    ds = Dataset(ds.name, ds.train, take(ds.test, args.n_test, seed=2), ds.classes, ds.source)
    qat_ds = Dataset(ds.name, take(ds.train, args.qat_images, seed=1), ds.test, ds.classes,
                     ds.source)
    calib_x, _ = take(ds.train, args.calib, seed=0).tensors()
    out = {"benchmark": "quant_accuracy", "model": args.ckpt, "dataset": ds.name,
           "n_test": len(ds.test), "calib_images": args.calib,
           "qat": {"epochs": args.qat_epochs, "images": args.qat_images, "optimizer": "adam",
                   "lr": args.qat_lr, "schedule": "cosine",
                   "note": "QAT fine-tunes the PTQ twin on a seeded subset of the training set"},
           "n_test_note": "seeded subset of the test set" if args.n_test else "full test set",
           "command": "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/quant_accuracy.py "
                      + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                 if v is not None and k != "out"),
           "rows": [], **provenance()}
    out["rows"].append({"recipe": "fp32", "mode": "float", "twin_acc": accuracy(model, ds.test)})
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        target.write_text(json.dumps(out, indent=2))

    save()
    for recipe in args.recipes.split(","):
        t0 = time.perf_counter()
        twin = quantize(model, recipe, calib_x)
        out["rows"].append({"recipe": recipe, "mode": "ptq", **measure(twin, ds, recipe),
                            "seconds": round(time.perf_counter() - t0, 1)})
        save()
        t0 = time.perf_counter()
        qat_twin = copy.deepcopy(twin)
        result = finetune(qat_twin, qat_ds, qat_config(args.qat_epochs, args.qat_lr, seed=0),
                          progress=False)
        out["rows"].append({"recipe": recipe, "mode": "qat", **measure(qat_twin, ds, recipe),
                            "qat_val_acc": result.best_val_acc,
                            "seconds": round(time.perf_counter() - t0, 1)})
        save()
    agreements = [r["twin_integer_agreement"] for r in out["rows"] if "twin_integer_agreement" in r]
    out["min_twin_integer_agreement"] = float(np.min(agreements)) if agreements else None
    save()


if __name__ == "__main__":
    main()
