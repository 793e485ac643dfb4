"""The defenses table of a study as "plain / adaptive" pairs (beside an earlier table, with
the difference and its sampling error), and what the table does not show, from the study's
own models: the SQ ensemble's adversarial information plane (accuracy and mutual-information
detection under the adaptive attack) and the layer-wise amplification of one perturbation in
every deterministic model. Run it after `qrobust run`:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/defenses_analysis.py \
        benchmarks/defenses_cifar10.yaml --out runs/defenses-cifar10-study \
        --compare benchmarks/results/defenses_cifar10.json \
        --json benchmarks/results/defenses_cifar10_study.json

"plain" is the study's attack with ``estimator: autograd``, "adaptive" the one with
``eot_samples`` (EOT for randomized models) after its masking checks (temperature).

Nothing here trains or evaluates on its own terms: the models come from the study's Workbench
(the same checkpoints its cells attacked) and the ensemble's adversarial examples from
`robustness_cell` with the seed of the study cell they belong to, so they are the very inputs
behind the table's adaptive column. The amplification delta is PGD on the float model with
every point attacked (no early stop), the same delta fed to every model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from qrobust.attacks import ThreatModel, make_attack
from qrobust.config import load_study
from qrobust.defenses.amplification import compare_amplification
from qrobust.defenses.detection import detection_score, member_probs, plane_row
from qrobust.eval.grid import Workbench, cell_seed, plan, spec_of
from qrobust.eval.robustness import robustness_cell
from qrobust.provenance import provenance
from qrobust.quant.spec import FLOAT_RECIPES
from qrobust.report.plots import plot_amplification, plot_information_plane
from qrobust.report.render import load_rows
from qrobust.report.tables import records

log = logging.getLogger("defenses_analysis")


def information_plane(bench: Workbench, cells) -> list[dict]:
    """One row per eps of the ensemble's adaptive (EOT) cells, plus the clean inputs."""
    group = bench.group(cells[0])
    ensemble = group.defended
    x, y = bench.test_points()
    clean = detection_score(member_probs(ensemble, x))
    rows = [plane_row(ensemble, x, y, clean, 0.0)]
    for cell in cells:
        spec = replace(spec_of(cell, bench.study.batch_size), checks=())  # x_adv only
        r = robustness_cell(ensemble, x, y, spec, cell_seed(cell),
                            clean_pred=group.clean_pred)
        rows.append(plane_row(ensemble, r.x_adv, y, clean, cell.eps))
        log.info("information plane eps %.1f/255: %s", cell.eps * 255, rows[-1])
    return rows


def deterministic_models(bench: Workbench, seed: int) -> dict[str, torch.nn.Module]:
    """Every undefended, non-randomized model of the study, by table label."""
    models = {}
    for model in bench.study.models:
        if model.finetune_method == "sq-ensemble":
            continue
        for recipe in bench.study.recipes_of(model):
            name = model.label if recipe in FLOAT_RECIPES else f"{model.label}-{recipe}"
            models[name] = (bench.float_model(model, seed).eval() if recipe in FLOAT_RECIPES
                            else bench.quantized(model, recipe, seed)[0])
    return models


def amplification(models: dict, x, y, eps: float, steps: int, seed: int) -> dict:
    source = next(iter(models.values()))  # the first model of the study: the float resnet20
    pgd = make_attack("pgd", source, ThreatModel("linf", eps),
                      {"steps": steps, "estimator": "autograd", "early_stop": False})
    delta = pgd(x, y, generator=torch.Generator().manual_seed(seed)) - x
    return compare_amplification(models, x, delta)


def table_name(model: str, recipe: str, defense: str, base: str) -> str:
    """The earlier script's row names: float, ptq-w4a4, qat-w4a4, dq-w4a4-beta0.003,
    sq-ensemble, shield(float), shield(ptq-w4a4); ``base`` is the label of the study's float
    model (its first)."""
    name = ("float" if recipe in FLOAT_RECIPES else f"ptq-{recipe}") if model == base \
        else model if recipe in FLOAT_RECIPES \
        else f"dq-{recipe}-beta{model.split('beta')[1]}" if model.startswith("dq-beta") \
        else f"{model}-{recipe}"
    return name if defense == "none" else f"{defense.split('(')[0]}({name})"


def pairs(store_file: Path, base: str) -> list[dict]:
    """One row per (model, recipe, defense, eps): plain and adaptive robust accuracy."""
    rows: dict[tuple, dict] = {}
    for r in records(load_rows(store_file)[0]):
        name = table_name(r.model, r.recipe, r.defense, base)
        row = rows.setdefault((name, r.eps), {
            "model": name, "eps_255": round(r.eps * 255, 3),
            "n": r.n, "clean_acc": r.metrics["clean_acc"], "old": None})
        adaptive = "eot_samples" in r.attack
        row["adaptive_robust_acc" if adaptive else "plain_robust_acc"] = (
            r.robust if adaptive else r.metrics["robust_acc"])
        if adaptive:
            row["adaptive_attack_alone"] = r.metrics["robust_acc"]
    return list(rows.values())


def sampling_error(p: float, n: int, q: float, m: int) -> float:
    """Two standard errors of the difference of two independent binomial proportions (with
    the same points on both sides it is smaller: conservative)."""
    return 2 * math.sqrt(max(p * (1 - p), 1 / n) / n + max(q * (1 - q), 1 / m) / m)


def comparison(new: list[dict], old: list[dict]) -> list[dict]:
    earlier = {(r["model"], r["eps_255"]): r for r in old}
    out = []
    for r in new:
        o = earlier.get((r["model"], r["eps_255"]))
        row = {**r, "old": None}
        if o is not None:
            row["old"] = {k: o[k] for k in ("n", "clean_acc", "plain_robust_acc",
                                            "adaptive_robust_acc")}
            row["within_sampling_error"] = {
                k: abs(r[k] - o[k]) <= sampling_error(r[k], r["n"], o[k], o["n"])
                for k in ("clean_acc", "plain_robust_acc", "adaptive_robust_acc")}
        out.append(row)
    return out


def comparison_markdown(rows: list[dict]) -> list[str]:
    eps = sorted({r["eps_255"] for r in rows})
    md = ["## The table: this study (n) vs the earlier script (n); robust accuracy 'plain / "
          "adaptive'", "", "A `*` marks a difference beyond two standard errors of the "
          "difference (binomial, independent samples).", "",
          "| model | n new / old | clean new / old | " + " | ".join(
              f"{e:g}/255 new | {e:g}/255 old" for e in eps) + " |",
          "|" + "---|" * (3 + 2 * len(eps))]
    for name in dict.fromkeys(r["model"] for r in rows):
        by_eps = {r["eps_255"]: r for r in rows if r["model"] == name}
        first = next(iter(by_eps.values()))
        old = first["old"]

        def mark(r, k):
            return "" if r["old"] is None or r["within_sampling_error"][k] else "*"

        cells = [f"{first['n']} / {old['n'] if old else '-'}",
                 f"{first['clean_acc']:.3f}{mark(first, 'clean_acc')} / "
                 f"{old['clean_acc']:.3f}" if old else f"{first['clean_acc']:.3f} / -"]
        for e in eps:
            r = by_eps.get(e)
            if r is None:
                cells += ["-", "-"]
                continue
            cells.append(f"{r['plain_robust_acc']:.3f}{mark(r, 'plain_robust_acc')} / "
                         f"{r['adaptive_robust_acc']:.3f}{mark(r, 'adaptive_robust_acc')}")
            cells.append(f"{r['old']['plain_robust_acc']:.3f} / "
                         f"{r['old']['adaptive_robust_acc']:.3f}" if r["old"] else "-")
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    return md + [""]


def markdown(result: dict) -> str:
    md = [f"# Defenses study {result['study']}: the table, information plane, amplification",
          "", f"Made by `benchmarks/defenses_analysis.py {result['config']} --out "
          f"{result['out']}` from the study's store and models (`qrobust report "
          f"{result['out']}` has every metric and warning).", ""]
    if result["table"]:
        md += comparison_markdown(result["table"])
    md += ["## Adversarial information plane (SQ ensemble, adaptive attack: the study's EOT cells)",
          "", "| eps | accuracy | mean MI (nats) | MI detection AUC |", "|---|---|---|---|"]
    md += [f"| {r['eps'] * 255:.0f}/255 | {r['accuracy']:.3f} | {r['mean_score']:.4f} | "
           f"{r['auc']:.3f} |" for r in result["information_plane"]]
    amp = result["amplification"]
    depth = max(len(rows) for rows in amp.values())
    md += ["", "## Layer-wise amplification ||f_l(x+d)-f_l(x)|| / ||f_l(x)|| (mean over images)",
           "", result["amplification_delta"] + ".", "",
           "| model | " + " | ".join(["input"] + [f"layer {i}" for i in range(1, depth)]) + " |",
           "|" + "---|" * (depth + 1)]
    md += [f"| {name} | " + " | ".join(f"{r['mean']:.3f}" for r in rows) + " |"
           for name, rows in amp.items()]
    return "\n".join(md) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="the study config, e.g. benchmarks/defenses_cifar10.yaml")
    p.add_argument("--out", required=True, help="the study's out dir (its trained models)")
    p.add_argument("--json", default="benchmarks/results/defenses_cifar10_study.json")
    p.add_argument("--compare", help="an earlier table's JSON (rows with model, eps_255, n, "
                   "clean_acc, plain_robust_acc, adaptive_robust_acc)")
    p.add_argument("--amplification-eps", type=float, default=8.0, help="in 1/255 units")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    study = load_study(args.config)
    bench = Workbench(study, args.out)
    seed = study.seeds[0]
    ensemble_cells = [c for c in plan(study) if c.seed == seed
                      and c.model.finetune_method == "sq-ensemble"
                      and "eot_samples" in c.attack.params]
    table = pairs(Path(args.out) / "results.sqlite", study.models[0].label)
    if args.compare:
        table = comparison(table, json.loads(Path(args.compare).read_text())["rows"])
    plane = information_plane(bench, ensemble_cells) if ensemble_cells else []
    x, y = bench.test_points()
    steps = study.attacks[0].params.get("steps", 10)
    amp = amplification(deterministic_models(bench, seed), x, y, args.amplification_eps / 255,
                        steps, seed)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"study": study.name, "config": args.config, "out": args.out,
              "compared_with": args.compare, "n_test": len(y), "table": table,
              "information_plane": plane, "amplification": amp,
              "amplification_delta": f"PGD Linf eps={args.amplification_eps:g}/255, {steps} "
                                     "steps, on the float model, every point attacked (no early "
                                     "stop); the same delta fed to every model",
              "seconds": round(time.perf_counter() - start, 1), "provenance": provenance()}
    out.write_text(json.dumps(result, indent=2))
    stem = out.with_suffix("")
    plot_amplification(amp, f"{stem}_amplification.png")
    if plane:
        plot_information_plane({"sq-ensemble": plane}, f"{stem}_aip.png")
    stem.with_suffix(".md").write_text(markdown(result))
    log.info("wrote %s in %.0fs", out, result["seconds"])


if __name__ == "__main__":
    main()
