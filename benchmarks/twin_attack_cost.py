"""What attacking a quantized twin costs beside attacking its float model (issue 17, item 2).

PGD-10 without early stopping (the same work on every model) on the first 128 test images,
float model vs its w8a8 and w4a4 twins (PTQ, 512 calibration images), one thread, round-robin
rounds, medians. ``--allocator`` chooses glibc's default or the command line's setting
(:func:`qrobust.hardware.keep_large_allocations`); each run adds its rows to
benchmarks/results/twin_attack_cost.json under that name. ``--profile`` instead records where
one attack step (forward + input-gradient backward, batch ``--n``) spends its time, float vs
w8a8 twin, as torch.profiler's self-CPU time per op, under ``profile``: the explanation of the
gap that remains.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/twin_attack_cost.py --allocator default
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/twin_attack_cost.py --allocator tuned
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/twin_attack_cost.py --allocator tuned --profile
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


def step_profile(name: str, n: int, top: int = 12) -> dict:
    """Self-CPU milliseconds per op of 3 profiled steps (after a warm-up), float vs w8a8."""
    from torch.profiler import ProfilerActivity, profile

    path, _, _ = CASES[name]
    model, meta = load_checkpoint(ROOT / path)
    ds = load_dataset(meta["dataset"])
    x, y = take(ds.test, n).tensors()
    twin = quantize(model, resolve_reduce_range("w8a8", "off"), take(ds.train, 512, 0).tensors()[0])
    out = {}
    for label, net in (("float", model), ("w8a8", twin)):
        net.eval().requires_grad_(False)

        def step(net=net):
            xg = x.clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(net(xg), y.long())
            torch.autograd.grad(loss, xg)

        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        out[label] = {"ms_per_step": total / 3 / 1e3,
                      "top_ops": [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 3 / 1e3,
                                   "share": e.self_cpu_time_total / total, "calls": e.count // 3}
                                  for e in events[:top]]}
    out["w8a8_vs_float_step"] = out["w8a8"]["ms_per_step"] / out["float"]["ms_per_step"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--allocator", choices=["default", "tuned"], required=True)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="op profile of one step instead")
    args = ap.parse_args()
    if args.allocator == "tuned" and not keep_large_allocations():
        raise SystemExit("no glibc here: the tuned allocator cannot be set")
    torch.set_num_threads(1)
    if args.profile:
        out = json.loads(OUT.read_text())
        out["profile"] = {"allocator": args.allocator, "n": args.n, "threads": 1,
                          **provenance(), **{name: step_profile(name, args.n) for name in CASES}}
        OUT.write_text(json.dumps(out, indent=2) + "\n")
        for name in CASES:
            p = out["profile"][name]
            print(name, f"step float {p['float']['ms_per_step']:.0f} ms, w8a8 "
                  f"{p['w8a8']['ms_per_step']:.0f} ms ({p['w8a8_vs_float_step']:.2f}x)")
            for op in p["w8a8"]["top_ops"]:
                print(f"   {op['op']:40s} {op['ms_per_step']:8.1f} ms {op['share']:6.1%} x{op['calls']}")
        return
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
