"""What attacking a quantized twin costs beside attacking its float model (issue 17, item 2).

PGD-10 without early stopping (the same work on every model) on the first 128 test images,
float model vs its w8a8 and w4a4 twins (PTQ, 512 calibration images), one thread, round-robin
rounds, medians. ``--allocator`` chooses glibc's default or the command line's setting
(:func:`qrobust.hardware.keep_large_allocations`); each run adds its rows to
benchmarks/results/twin_attack_cost.json under that name.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/twin_attack_cost.py --allocator default
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/twin_attack_cost.py --allocator tuned
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from qrobust.attacks import PGD, ThreatModel
from qrobust.checkpoint import load_checkpoint
from qrobust.data import load_dataset, take
from qrobust.hardware import cpu_info, keep_large_allocations
from qrobust.provenance import provenance
from qrobust.quant import quantize, resolve_reduce_range

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "twin_attack_cost.json"
CASES = {"small-cnn/mnist": ("benchmarks/models/small-cnn-mnist", 0.1, 0.01),
         "resnet20/cifar10": ("benchmarks/models/resnet20-cifar10", 8 / 255, 2 / 255)}
RECIPES = ("w8a8", "w4a4")


def case_rows(name: str, n: int, rounds: int) -> list[dict]:
    path, eps, alpha = CASES[name]
    model, meta = load_checkpoint(ROOT / path)
    ds = load_dataset(meta["dataset"])
    x_calib, _ = take(ds.train, 512, 0).tensors()
    x, y = take(ds.test, n).tensors()
    nets = {"float": model} | {r: quantize(model, resolve_reduce_range(r, "off"), x_calib)
                               for r in RECIPES}
    seconds: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(rounds):
        for label, net in nets.items():
            attack = PGD(net, ThreatModel("linf", eps), steps=10, alpha=alpha, early_stop=False)
            start = time.perf_counter()
            attack(x, y.long(), torch.Generator().manual_seed(0))
            seconds[label].append(time.perf_counter() - start)
    base = statistics.median(seconds["float"])
    return [{"case": name, "model": label, "median_s": statistics.median(s), "all_s": s,
             "vs_float": statistics.median(s) / base} for label, s in seconds.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--allocator", choices=["default", "tuned"], required=True)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.allocator == "tuned" and not keep_large_allocations():
        raise SystemExit("no glibc here: the tuned allocator cannot be set")
    torch.set_num_threads(1)
    rows = [row for name in CASES for row in case_rows(name, args.n, args.rounds)]
    out = json.loads(OUT.read_text()) if OUT.exists() else {"benchmark": "twin_attack_cost",
                                                            "runs": {}}
    out["runs"][args.allocator] = {"cpu": cpu_info().to_dict(), **provenance(), "n": args.n,
                                   "rounds": args.rounds, "threads": 1, "rows": rows}
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    for r in rows:
        print(f"{args.allocator:8s} {r['case']:17s} {r['model']:6s} {r['median_s']:7.2f} s "
              f"{r['vs_float']:5.2f}x float")


if __name__ == "__main__":
    main()
