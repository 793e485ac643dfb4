"""Results rows -> flat records averaged over seeds, and the cross-cell validity checks."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from qrobust.eval.grid import IMPORTED, row_label
from qrobust.quant.spec import FLOAT_RECIPES, recipe_bits

FLOAT_BITS = 32  # where float recipes sit on a bits axis

METRICS = ("clean_acc", "robust_acc", "robust_acc_worst", "clean_acc_int", "robust_acc_int",
           "robust_acc_int_square", "transfer_rate", "adv_disagreement", "attack_success_rate",
           "mean_linf", "mean_l2", "seconds")


def bits_of(recipe: str) -> int:
    """Effective bit width of a recipe: the smaller of weight and activation bits; 32 = float."""
    if recipe in FLOAT_RECIPES:
        return FLOAT_BITS
    if recipe == IMPORTED:  # int8 files from other toolchains
        return 8
    w, a = recipe_bits(recipe)
    return min(b for b in (w, a) if b is not None)


@dataclass
class Record:
    """One (model, recipe, defense, attack, norm, eps) point, metrics averaged over seeds."""

    model: str
    recipe: str
    defense: str
    attack: str
    norm: str
    eps: float
    bits: int
    n: int
    seeds: list[int]
    metrics: dict[str, float | None]
    spread: dict[str, float | None]  # standard deviation across seeds (None for one seed)
    warnings: list[str] = field(default_factory=list)
    notes: set[str] = field(default_factory=set)

    @property
    def robust(self) -> float | None:
        """Robust accuracy after the masking checks' follow-up attacks (the attack's own where
        no check ran): the number figures and fits use."""
        worst = self.metrics.get("robust_acc_worst")
        return worst if worst is not None else self.metrics["robust_acc"]

    @property
    def robust_sd(self) -> float | None:
        worst = self.metrics.get("robust_acc_worst")
        return self.spread.get("robust_acc_worst" if worst is not None else "robust_acc")


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def records(rows: list[dict]) -> list[Record]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        lab = row_label(r["config"])
        groups[(lab["model"], lab["recipe"], lab["defense"], lab["attack"], lab["norm"],
                lab["eps"])].append(r)
    out = []
    for (model, recipe, defense, attack, norm, eps), rs in groups.items():
        means, sds = {}, {}
        for k in METRICS:
            means[k], sds[k] = _mean_sd([r["metrics"].get(k) for r in rs])
        warns = [f"seed {r['seed']}: {w}" if len(rs) > 1 else w for r in rs for w in r["warnings"]]
        notes = {r["metrics"].get("integer_note") for r in rs} - {None}
        out.append(Record(model, recipe, defense, attack, norm, eps, bits_of(recipe),
                          int(rs[0]["metrics"].get("n", 0)), sorted(r["seed"] for r in rs),
                          means, sds, warns, notes))
    out.sort(key=lambda r: (r.model, r.attack, r.defense, -r.bits, r.recipe, r.eps))
    return out


def _tolerance(p: float, n: int) -> float:
    """Two binomial standard errors plus one point: differences below it are noise."""
    return 2 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1)) + 1 / max(n, 1)


ITERATIVE = ("pgd", "apgd", "apgd-dlr", "fast", "standard")  # never weaker than FGSM


def cross_checks(recs: list[Record]) -> list[str]:
    """Validity flags that need several cells (AutoAttack-style sanity checks):

    * robust accuracy that *rises* with eps beyond noise (a stronger attack should never do
      worse: the attack is failing, e.g. gradient masking);
    * PGD (or APGD, or a suite) weaker than FGSM at the same eps beyond noise (iterating
      should only help)."""
    found = []
    series: dict[tuple, list[Record]] = defaultdict(list)
    for r in recs:
        series[(r.model, r.recipe, r.defense, r.attack, r.norm)].append(r)
    for (model, recipe, defense, attack, _), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r.eps)
        for lo, hi in zip(rs, rs[1:], strict=False):
            a, b = lo.metrics["robust_acc"], hi.metrics["robust_acc"]
            if a is not None and b is not None and b - a > _tolerance(a, lo.n):
                found.append(f"{model}/{recipe}/{defense}/{attack}: robust accuracy rises from "
                             f"{a:.3f} at eps={lo.eps:.4g} to {b:.3f} at eps={hi.eps:.4g} "
                             "(attack failing; gradient masking?)")
    index = {(r.model, r.recipe, r.defense, r.attack, r.norm, round(r.eps, 9)): r for r in recs}
    for (model, recipe, defense, attack, norm, eps), r in sorted(index.items()):
        if attack.split("(")[0] not in ITERATIVE or eps == 0:
            continue
        f = index.get((model, recipe, defense, "fgsm", norm, eps))
        if f is None or f.metrics["robust_acc"] is None or r.metrics["robust_acc"] is None:
            continue
        if r.metrics["robust_acc"] - f.metrics["robust_acc"] > _tolerance(f.metrics["robust_acc"],
                                                                          r.n):
            name = "PGD" if attack == "pgd" else attack
            found.append(f"{model}/{recipe}/{defense}: {name} leaves "
                         f"{r.metrics['robust_acc']:.3f} robust at eps={eps:.4g} but FGSM only "
                         f"{f.metrics['robust_acc']:.3f} ({name} should be at least as strong; "
                         "gradient masking?)")
    return found
