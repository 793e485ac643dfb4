"""Results rows -> flat records averaged over seeds (with 95% intervals over seeds and over
test points), and the cross-cell validity checks."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from scipy.stats import binomtest
from scipy.stats import t as student_t

from qrobust.eval.grid import IMPORTED, row_label
from qrobust.quant.spec import FLOAT_RECIPES, recipe_bits

FLOAT_BITS = 32  # where float recipes sit on a bits axis

METRICS = ("clean_acc", "robust_acc", "robust_acc_worst", "clean_acc_int", "robust_acc_int",
           "robust_acc_int_square", "transfer_rate", "adv_disagreement", "attack_success_rate",
           "mean_linf", "mean_l2", "seconds")
# fractions of the cell's n test points: these get the two 95% intervals
ACCURACIES = ("clean_acc", "robust_acc", "robust_acc_worst", "clean_acc_int", "robust_acc_int",
              "robust_acc_int_square")
LEVEL = 0.95


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
    # per accuracy metric, (low, high): the 95% t-interval over seeds (None for one seed) ...
    seed_ci: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    # ... and the 95% Wilson interval over the n test points (None without n)
    binom_ci: dict[str, tuple[float, float] | None] = field(default_factory=dict)

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


def seed_interval(values: list[float], level: float = LEVEL) -> tuple[float, float] | None:
    """The t-interval of the mean over k seeds: mean +- t_{(1+level)/2, k-1} * sd / sqrt(k)
    (sd with k - 1 in the denominator). None for fewer than two values. Not clipped to [0, 1]."""
    if len(values) < 2:
        return None
    m, sd = _mean_sd(values)
    half = float(student_t.ppf((1 + level) / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return m - half, m + half


def binomial_interval(successes: int, trials: int, level: float = LEVEL
                      ) -> tuple[float, float] | None:
    """Wilson score interval of a proportion, ``successes`` of ``trials`` (scipy binomtest's
    ``proportion_ci(method="wilson")``; Wilson rather than Clopper-Pearson for near-nominal
    coverage in a report, where no certificate rests on it). None without trials."""
    if trials <= 0:
        return None
    ci = binomtest(successes, trials).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def points_interval(values: list[float], n: int, level: float = LEVEL
                    ) -> tuple[float, float] | None:
    """The binomial interval over test points of an accuracy averaged over seeds: the mean
    accuracy as round(mean * n) successes of the n test points.

    The seeds of a study evaluate the *same* n test points (``data.sample_seed`` does not vary
    with the seed), so there are n independent trials, not n * k: pooling n * k would assume
    the seeds err independently on each point and make the interval up to sqrt(k) too narrow.
    With n trials it is exact when the seeds agree on every point and conservative otherwise
    (the per-point mean correctness has variance at most p(1 - p))."""
    if not values or n <= 0:
        return None
    return binomial_interval(round(sum(values) / len(values) * n), n, level)


def records(rows: list[dict]) -> list[Record]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        lab = row_label(r["config"])
        groups[(lab["model"], lab["recipe"], lab["defense"], lab["attack"], lab["norm"],
                lab["eps"])].append(r)
    out = []
    for (model, recipe, defense, attack, norm, eps), rs in groups.items():
        means, sds, seed_ci, binom_ci = {}, {}, {}, {}
        n = int(rs[0]["metrics"].get("n", 0))
        for k in METRICS:
            means[k], sds[k] = _mean_sd([r["metrics"].get(k) for r in rs])
        for k in ACCURACIES:
            vals = [r["metrics"][k] for r in rs if r["metrics"].get(k) is not None]
            seed_ci[k], binom_ci[k] = seed_interval(vals), points_interval(vals, n)
        warns = [f"seed {r['seed']}: {w}" if len(rs) > 1 else w for r in rs for w in r["warnings"]]
        notes = {r["metrics"].get("integer_note") for r in rs} - {None}
        out.append(Record(model, recipe, defense, attack, norm, eps, bits_of(recipe), n,
                          sorted(r["seed"] for r in rs), means, sds, warns, notes, seed_ci,
                          binom_ci))
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
