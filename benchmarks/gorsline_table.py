"""Clean accuracy per weight bit width of the Gorsline reproduction beside the paper's values,
mean over seeds with a 95% t interval.

Reads the study store written by
    qrobust run benchmarks/gorsline_mnist.yaml --out runs/gorsline
(the literal reading: the mid-rise grid, no scale) and the rows of
benchmarks/gorsline_readings.py (other readings at 1-3 bits), and writes
benchmarks/results/gorsline.json and benchmarks/results/gorsline/clean_accuracy.md.
Paper values (Gorsline, Smith, Merkel 2021, arXiv 2105.00227) are read off its figure at zero
attack strength (../shared/PAPERS.md), so they carry about +-0.1 points of reading error.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from qrobust.eval.grid import row_label
from qrobust.eval.store import ResultStore
from qrobust.report.tables import points_interval, seed_interval

PAPER = {1: 94.85, 2: 96.41, 3: 97.59, 4: 97.76, 5: 97.67, 6: 97.81, 7: 97.83, 8: 97.61,
         9: 97.81, 10: 97.73}
FANIN = "fanin-uniform-30ep"  # the reading that reaches the paper at 1 bit


def clean_by_recipe(store_file: Path) -> tuple[dict[str, dict[int, float]], int]:
    """recipe -> seed -> clean accuracy (%), and the number of test points."""
    with ResultStore(store_file) as store:
        rows = store.rows("robustness")
    out: dict[str, dict[int, float]] = defaultdict(dict)
    n = 0
    for r in rows:
        lab = row_label(r["config"])
        if lab["defense"] == "none" and lab["eps"] == 0:
            out[lab["recipe"]][lab["seed"]] = 100 * r["metrics"]["clean_acc"]
            n = r["metrics"]["n"]
    return out, n


def summary(by_seed: dict[int, float], n: int, paper: float | None) -> dict:
    """Mean, t interval over seeds, range, Wilson interval over the n test points, and the
    difference from the paper with its t interval (a shift of the seed interval)."""
    vals = [by_seed[s] for s in sorted(by_seed)]
    mean = sum(vals) / len(vals)
    ci = seed_interval(vals)
    pts = points_interval([v / 100 for v in vals], n)
    out = {"seeds": sorted(by_seed), "values": vals, "mean": mean,
           "ci": list(ci) if ci else None, "range": [min(vals), max(vals)],
           "points_ci": [100 * pts[0], 100 * pts[1]] if pts else None}
    if paper is not None:
        out["diff"] = mean - paper
        out["diff_ci"] = [ci[0] - paper, ci[1] - paper] if ci else None
        # "within 1 point": the whole interval of the difference inside +-1, or the mean only
        out["within_1"] = ("yes" if ci and abs(ci[0] - paper) <= 1 and abs(ci[1] - paper) <= 1
                           else "mean only" if abs(mean - paper) <= 1 else "no")
    return out


def cell(s: dict | None) -> str:
    if s is None:
        return "–"
    ci = f" [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]" if s["ci"] else ""
    return f"{s['mean']:.2f}{ci} ({len(s['seeds'])} seeds)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", default="runs/gorsline")
    ap.add_argument("--readings", default="benchmarks/results/gorsline_readings.json")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    ours, n = clean_by_recipe(Path(args.run) / "results.sqlite")
    fanin: dict[int, dict[int, float]] = defaultdict(dict)
    readings = Path(args.readings)
    if readings.is_file():
        for r in json.loads(readings.read_text())["rows"]:
            if r["reading"] == FANIN:
                fanin[r["bits"]][r["seed"]] = 100 * r["test_acc"]
    rows = []
    for b, paper in PAPER.items():
        lit = ours.get(f"gorsline{b}")
        rows.append({"bits": b, "paper": paper,
                     "midrise": summary(lit, n, paper) if lit else None,
                     "fanin_uniform": summary(fanin[b], 10000, paper) if fanin.get(b) else None})
    fp32 = summary(ours["fp32"], n, None) if ours.get("fp32") else None
    result = {"n_test": n, "fp32": fp32, "rows": rows, "sources": {
        "midrise": "benchmarks/gorsline_mnist.yaml",
        "fanin_uniform": f"benchmarks/gorsline_readings.py --readings {FANIN}"}}
    out = Path(args.out)
    (out / "gorsline").mkdir(parents=True, exist_ok=True)
    (out / "gorsline.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Gorsline et al. (arXiv 2105.00227) on MNIST: clean accuracy per weight bit width",
             "", "MLP 784-100-10, weights and biases in [-1, 1] rounded to B bits (QAT from "
             f"scratch, up to 30 epochs), activations float; accuracy (%) on all {n} MNIST test "
             "points, mean over seeds [95% t interval over seeds]. *Mid-rise*: the literal "
             "reading (levels -1 + 2k/(2^B - 1), no scale; `benchmarks/gorsline_mnist.yaml`). "
             "*Fan-in*: the same grid with products scaled by 1/sqrt(fan-in) and U(-1, 1) "
             f"initialisation (`benchmarks/gorsline_readings.py --readings {FANIN}`). Paper "
             "values read off its figure at zero attack strength. *Within 1*: yes when the whole t "
             "interval of the better reading's difference lies inside +-1 point, *mean only* "
             "when only its mean does.", "",
             "| bits | paper | mid-rise | fan-in | best − paper | within 1 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cands = [s for s in (r["midrise"], r["fanin_uniform"]) if s]
        best = max(cands, key=lambda s: s["mean"]) if cands else None
        diff = "–" if best is None else f"{best['diff']:+.2f}"
        within = "–" if best is None else best["within_1"]
        lines.append(f"| {r['bits']} | {r['paper']:.2f} | {cell(r['midrise'])} | "
                     f"{cell(r['fanin_uniform'])} | {diff} | {within} |")
    if fp32 is not None:
        lines.append(f"| float | – | {cell(fp32)} | – | – | – |")
    (out / "gorsline" / "clean_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
