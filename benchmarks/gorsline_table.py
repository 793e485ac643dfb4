"""Clean accuracy per weight bit width of the Gorsline reproduction beside the paper's values.

Reads the study store written by
    qrobust run benchmarks/gorsline_mnist.yaml --out runs/gorsline
and writes benchmarks/results/gorsline.json and benchmarks/results/gorsline/clean_accuracy.md.
Paper values (Gorsline, Smith, Merkel 2021, arXiv 2105.00227) are read off its figure at zero
attack strength (../shared/PAPERS.md), so they carry about +-0.1 points of reading error.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from qrobust.eval.grid import row_label
from qrobust.eval.store import ResultStore

PAPER = {1: 94.85, 2: 96.41, 3: 97.59, 4: 97.76, 5: 97.67, 6: 97.81, 7: 97.83, 8: 97.61,
         9: 97.81, 10: 97.73}


def clean_by_recipe(store_file: Path) -> tuple[dict[str, float], int]:
    with ResultStore(store_file) as store:
        rows = store.rows("robustness")
    out, n = {}, 0
    for r in rows:
        lab = row_label(r["config"])
        if lab["defense"] == "none" and lab["eps"] == 0:
            out[lab["recipe"]] = 100 * r["metrics"]["clean_acc"]
            n = r["metrics"]["n"]
    return out, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", default="runs/gorsline")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    ours, n = clean_by_recipe(Path(args.run) / "results.sqlite")
    rows = []
    for b, paper in PAPER.items():
        acc = ours.get(f"gorsline{b}")
        se = 100 * math.sqrt(acc / 100 * (1 - acc / 100) / n) if acc is not None else None
        rows.append({"bits": b, "paper": paper, "ours": acc, "diff": None if acc is None
                     else acc - paper, "ours_se": se})
    result = {"n_test": n, "fp32": ours.get("fp32"), "rows": rows,
              "source": "benchmarks/gorsline_mnist.yaml"}
    out = Path(args.out)
    (out / "gorsline").mkdir(parents=True, exist_ok=True)
    (out / "gorsline.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Gorsline et al. (arXiv 2105.00227) on MNIST: clean accuracy per weight bit width",
             "", f"MLP 784-100-10, weights and biases in [-1, 1] rounded to B bits (QAT), "
             f"activations float; our accuracy on all {n} MNIST test points (± one binomial "
             "standard error); paper values read off its figure at zero attack strength.", "",
             "| bits | paper (%) | ours (%) | ours − paper (points) |", "|---|---|---|---|"]
    for r in rows:
        ours_s = "–" if r["ours"] is None else f"{r['ours']:.2f} ± {r['ours_se']:.2f}"
        diff = "–" if r["diff"] is None else f"{r['diff']:+.2f}"
        lines.append(f"| {r['bits']} | {r['paper']:.2f} | {ours_s} | {diff} |")
    if result["fp32"] is not None:
        lines.append(f"| float | – | {result['fp32']:.2f} | – |")
    (out / "gorsline" / "clean_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
