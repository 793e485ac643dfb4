"""Defensive Quantization's three claims, one by one, from a study store with several seeds.

Lin, Gan, Han (ICLR 2019, arXiv 1904.08444) claim that a DQ model (Lipschitz-regularised QAT)
1. is more robust than the vanilla quantized model of the same bit width,
2. is more robust than the full-precision model, and
3. has better clean accuracy than the vanilla quantized model.
Each comparison is paired by seed (the same float model, the same test points): the per-seed
difference, its mean and 95% Student-t interval over seeds. A claim holds at a (bits, eps,
beta) where the interval lies above 0, fails where it lies below, and is not shown otherwise.
Robust accuracy is the adaptive attack's (after the masking checks), the plain one beside it.
The study's two training-free or ensemble defenses (Stochastic-Shield on the float model, the
stochastic-quantizer ensemble) get the same paired comparison against the undefended float
model, plain and adaptive.

    .venv/bin/python benchmarks/dq_claims.py runs/dq-fmnist --json benchmarks/results/dq_fashion_mnist.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from qrobust.eval.grid import row_label
from qrobust.quant.spec import FLOAT_RECIPES
from qrobust.report.render import load_rows
from qrobust.report.tables import seed_interval


def per_seed(store: Path) -> dict[tuple, dict[int, dict]]:
    """(model, recipe, defense, attack kind, eps) -> seed -> {clean, robust}."""
    rows, _, _ = load_rows(store)
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        lab = row_label(r["config"])
        kind = "adaptive" if "eot_samples" in lab["attack"] else "plain"
        m = r["metrics"]
        robust = m.get("robust_acc_worst")
        out[(lab["model"], lab["recipe"], lab["defense"], kind, round(lab["eps"] * 255))][
            lab["seed"]] = {"clean": m["clean_acc"], "robust": m["robust_acc"] if robust is None
                            else robust, "n": m["n"]}
    return out


def paired(a: dict[int, dict], b: dict[int, dict], key: str) -> dict:
    """Mean of a - b over the seeds both have, with its 95% t interval (None for one seed)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s][key] - b[s][key] for s in seeds]
    mean = sum(d) / len(d)
    out = {"diff": mean, "ci": None, "seeds": seeds,
           "a": sum(a[s][key] for s in seeds) / len(seeds),
           "b": sum(b[s][key] for s in seeds) / len(seeds)}
    ci = seed_interval(d)  # None for one seed
    out["ci"] = list(ci) if ci else None
    return out


def verdict(p: dict) -> str:
    if p["ci"] is None:
        return "one seed"
    return "holds" if p["ci"][0] > 0 else "fails" if p["ci"][1] < 0 else "not shown"


def claims(data: dict, base: str) -> list[dict]:
    float_model = {k: v for k, v in data.items() if k[0] == base and k[1] in FLOAT_RECIPES
                   and k[2] == "none"}
    out = []
    for (model, recipe, defense, kind, eps), dq in sorted(data.items()):
        if not model.startswith("dq-") or defense != "none":
            continue
        qat = data.get(("qat", recipe, "none", kind, eps))
        fp = next((v for k, v in float_model.items() if k[3] == kind and k[4] == eps), None)
        beta = model.split("beta")[1]
        row = {"recipe": recipe, "beta": beta, "attack": kind, "eps_255": eps}
        if qat:
            row["1_vs_vanilla_quantized"] = paired(dq, qat, "robust")
            row["3_clean_vs_vanilla_quantized"] = paired(dq, qat, "clean")
        if fp:
            row["2_vs_full_precision"] = paired(dq, fp, "robust")
        out.append(row)
    return out


def defenses(data: dict, base: str) -> list[dict]:
    """Each defended row that is neither DQ nor vanilla QAT against the undefended float
    model, paired by seed: robust accuracy (its own mean beside the float one) and clean."""
    out = []
    for (model, recipe, defense, kind, eps), d in sorted(data.items()):
        if model.startswith(("dq-", "qat")) or (model == base and defense == "none"):
            continue
        fp = data.get((base, recipe, "none", kind, eps))
        if fp:
            out.append({"model": model, "defense": defense, "attack": kind, "eps_255": eps,
                        "robust_vs_float": paired(d, fp, "robust"),
                        "clean_vs_float": paired(d, fp, "clean")})
    return out


def cell(p: dict | None) -> str:
    if p is None:
        return "-"
    ci = "" if p["ci"] is None else f" [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]"
    return f"{p['diff']:+.3f}{ci} {verdict(p)}"


def markdown_defenses(rows: list[dict]) -> str:
    md = ["| model | defense | attack | eps | robust (defended / float, seeds) | defended - float "
          "(robust) | defended - float (clean) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["robust_vs_float"]
        md.append(f"| {r['model']} | {r['defense'].split('(')[0]} | {r['attack']} | "
                  f"{r['eps_255']}/255 | {p['a']:.3f} / {p['b']:.3f} ({len(p['seeds'])}) | "
                  f"{cell(p)} | {cell(r['clean_vs_float'])} |")
    return "\n".join(md) + "\n"


def markdown(rows: list[dict]) -> str:
    md = ["| recipe | beta | attack | eps | 1: DQ - vanilla QAT (robust) | 2: DQ - float (robust) "
          "| 3: DQ - vanilla QAT (clean) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['recipe']} | {r['beta']} | {r['attack']} | {r['eps_255']}/255 | "
                  f"{cell(r.get('1_vs_vanilla_quantized'))} | {cell(r.get('2_vs_full_precision'))}"
                  f" | {cell(r.get('3_clean_vs_vanilla_quantized'))} |")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", help="the study's --out folder")
    ap.add_argument("--base", default="small-cnn", help="label of the float model")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    data = per_seed(Path(args.run) / "results.sqlite")
    rows, other = claims(data, args.base), defenses(data, args.base)
    text = (markdown(rows) + "\n## Shield and the stochastic-quantizer ensemble against the "
            "undefended float model, paired by seed\n\n" + markdown_defenses(other))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "rows": rows,
                                               "defenses": other}, indent=1))
        Path(args.json).with_suffix(".md").write_text(
            "# DQ's claims, paired by seed (mean difference [95% t interval over seeds])\n\n"
            + text)


if __name__ == "__main__":
    main()
