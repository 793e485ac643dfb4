"""Which reading of Gorsline et al.'s quantizer reaches the paper's clean accuracy at 1-3 bits?

The paper (arXiv 2105.00227) says only "weights and biases constrained to [-1, 1] and rounded
to B bits" for its MLP 784-100-10 on MNIST (Adam 1e-3, batch 32, 10% held out for early
stopping). Each reading below is a ``quant.gorsline_grid`` of the study config plus a training
length; every run trains the twin from scratch (QAT, STE) with ``qrobust.train.fit`` and
measures accuracy on all 10,000 MNIST test images. Rows are appended to the JSON as they finish
(a rerun skips the (reading, bits, seed) rows already there).

    .venv/bin/python benchmarks/gorsline_readings.py --readings midrise-5ep fanin-30ep \
        --bits 1 2 3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from qrobust.data import load_dataset
from qrobust.models import build_model
from qrobust.quant import make_twin
from qrobust.train import default_config, fit, model_spec

# name -> (gorsline_grid, max epochs, early-stopping patience, Adam learning rate[, init])
# init "uniform": shadow weights and biases drawn from U(-1, 1), the whole constrained range
# (PyTorch's default init puts every weight of the 784-input layer within 0.036 of zero)
READINGS = {
    "midrise-5ep": ("midrise", 5, 2, 1e-3),  # the committed study's setting
    "midrise-30ep": ("midrise", 30, 5, 1e-3),
    "midrise-30ep-lr1e-4": ("midrise", 30, 5, 1e-4),
    "symmetric-30ep": ("symmetric", 30, 5, 1e-3),
    "fanin-30ep": ("midrise-fanin", 30, 5, 1e-3),
    "scaled-30ep": ("midrise-scaled", 30, 5, 1e-3),
    "fanin-30ep-lr1e-2": ("midrise-fanin", 30, 5, 1e-2),
    "fanin-uniform-30ep": ("midrise-fanin", 30, 5, 1e-3, "uniform"),
}
PAPER = {1: 94.85, 2: 96.41, 3: 97.59}


def run(reading: str, bits: int, seed: int, data) -> dict:
    grid, epochs, patience, lr, *init = READINGS[reading]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        skeleton = build_model(model_spec("mlp", data))
        if init == ["uniform"]:
            for layer in skeleton.modules():
                if isinstance(layer, torch.nn.Linear):
                    torch.nn.init.uniform_(layer.weight, -1.0, 1.0)
                    torch.nn.init.uniform_(layer.bias, -1.0, 1.0)
    twin = make_twin(skeleton, f"gorsline{bits}", None, grid).train()
    cfg = default_config("mlp", data.name, epochs=epochs, patience=patience, lr=lr, seed=seed)
    start = time.perf_counter()
    fitted = fit("mlp", data, cfg, model=twin, progress=False)
    m = fitted.meta["metrics"]
    return {"reading": reading, "grid": grid, "init": init[0] if init else "default",
            "bits": bits, "seed": seed, "lr": lr,
            "max_epochs": epochs, "patience": patience, "epochs_run": m["epochs_run"],
            "best_epoch": m["best_epoch"], "val_acc": m["val_acc"],
            "test_acc": m["test_acc"], "n_test": m["n_test"],
            "seconds": round(time.perf_counter() - start, 1), "paper": PAPER.get(bits)}


def markdown(rows: list[dict]) -> str:
    """Mean (and spread, with several seeds) test accuracy per reading and bit width."""
    bits = sorted({r["bits"] for r in rows})
    md = ["| reading | " + " | ".join(f"{b} bit{'s' if b > 1 else ''}" for b in bits) + " |",
          "|---|" + "---|" * len(bits),
          "| paper | " + " | ".join(f"{PAPER.get(b, '-')}" for b in bits) + " |"]
    for reading in dict.fromkeys(r["reading"] for r in rows):
        cells = []
        for b in bits:
            acc = [100 * r["test_acc"] for r in rows if r["reading"] == reading and r["bits"] == b]
            if not acc:
                cells.append("-")
                continue
            mean = sum(acc) / len(acc)
            spread = f" ({min(acc):.2f}-{max(acc):.2f}, {len(acc)} seeds)" if len(acc) > 1 else ""
            cells.append(f"{mean:.2f}{spread}")
        md.append(f"| {reading} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--readings", nargs="+", default=list(READINGS), choices=list(READINGS))
    ap.add_argument("--bits", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", default="benchmarks/results/gorsline_readings.json")
    ap.add_argument("--table", action="store_true", help="only write the markdown table")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        out.with_suffix(".md").write_text(
            "# Readings of Gorsline et al.'s quantizer: MNIST test accuracy (%, 10,000 images)\n\n"
            + markdown(json.loads(out.read_text())["rows"]))
        return
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["reading"], r["bits"], r["seed"]) for r in rows}
    data = load_dataset("mnist")
    for reading in args.readings:
        for bits in args.bits:
            for seed in args.seeds:
                if (reading, bits, seed) in done:
                    continue
                row = run(reading, bits, seed, data)
                print(json.dumps(row), flush=True)
                rows = json.loads(out.read_text())["rows"] if out.is_file() else []
                rows.append(row)  # re-read first: several readings may run side by side
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"paper": PAPER, "readings": {
                    k: dict(zip(("grid", "max_epochs", "patience", "lr", "init"), v, strict=False))
                    for k, v in READINGS.items()}, "rows": rows}, indent=1))
                tmp.replace(out)


if __name__ == "__main__":
    main()
