"""Matplotlib figures of a study (Agg backend, PNG bytes out). One function per figure."""

from __future__ import annotations

import io
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from qrobust.report.fit import Fit  # noqa: E402
from qrobust.report.tables import FLOAT_BITS, Record  # noqa: E402

plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def save_png(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG file at ``path`` (parent folders created), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def wrap(text: str, width_in: float, font_pt: float = 9.0) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``font_pt`` (long defense
    names such as 'mc-dropout(passes=2,rate=0.2)' break at commas, never run into the next
    panel's title)."""
    chars = max(12, int(width_in * 72 / (0.6 * font_pt)))
    return "\n".join(textwrap.wrap(text.replace(",", ", "), chars, break_on_hyphens=False)
                     ).replace(", ", ",")


def _recipes(recs: list[Record]) -> list[str]:
    seen = {r.recipe: r.bits for r in recs}
    return sorted(seen, key=lambda k: (-seen[k], k))


def _colors(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("viridis")
    n = max(len(names) - 1, 1)
    return {name: cmap(0.9 * i / n) for i, name in enumerate(names)}


def accuracy_vs_eps(recs: list[Record], model: str, fits: dict[tuple, Fit] | None = None
                    ) -> bytes:
    """Robust accuracy (twin) vs eps; panels = defense x attack; a curve per recipe. Dashed
    lines: the fitted accuracy model, where a fit exists."""
    recs = [r for r in recs if r.model == model]
    defenses = sorted({r.defense for r in recs}, key=lambda d: (d != "none", d))
    attacks = sorted({r.attack for r in recs})
    recipes = _recipes(recs)
    colors = _colors(recipes)
    fig, axes = plt.subplots(len(defenses), len(attacks), squeeze=False, sharey=True,
                             figsize=(4.2 * len(attacks), 3.0 * len(defenses)))
    for i, d in enumerate(defenses):
        for j, a in enumerate(attacks):
            ax = axes[i][j]
            for recipe in recipes:
                pts = sorted((r for r in recs if (r.defense, r.attack, r.recipe) == (d, a, recipe)),
                             key=lambda r: r.eps)
                if not pts:
                    continue
                eps = np.array([r.eps for r in pts])
                acc = np.array([r.robust for r in pts], dtype=float)
                sd = np.array([r.robust_sd or 0.0 for r in pts], dtype=float)
                ax.errorbar(eps * 255, acc, yerr=sd if sd.any() else None, marker="o", ms=3,
                            color=colors[recipe], label=recipe, capsize=2)
                fit = (fits or {}).get((model, d, a))
                if isinstance(fit, Fit):
                    grid = np.linspace(0, eps.max(), 100)
                    ax.plot(grid * 255, fit.predict(np.full_like(grid, pts[0].bits), grid),
                            ls="--", lw=0.9, color=colors[recipe])
            ax.set_title(wrap(f"{a} · defense: {d}", 3.3, 1.2 * plt.rcParams["font.size"]))
            ax.set_xlabel("eps (x 1/255)")
            ax.set_ylim(-0.02, 1.02)
            if j == 0:
                ax.set_ylabel("robust accuracy (twin)")
    axes[0][-1].legend(title="recipe", fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{model}: accuracy vs attack strength (dashed: fitted model)")
    return _png(fig)


def heatmap(recs: list[Record], model: str, defense: str, attack: str) -> bytes:
    """Bits (rows, recipes) x eps (columns) robust accuracy, annotated."""
    recs = [r for r in recs if (r.model, r.defense, r.attack) == (model, defense, attack)]
    recipes = _recipes(recs)
    eps = sorted({r.eps for r in recs})
    grid = np.full((len(recipes), len(eps)), np.nan)
    for r in recs:
        if r.robust is not None:
            grid[recipes.index(r.recipe), eps.index(r.eps)] = r.robust
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(eps), 0.9 + 0.36 * len(recipes)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(eps)), [f"{e * 255:.3g}" for e in eps])
    ax.set_yticks(range(len(recipes)), recipes)
    ax.set_xlabel("eps (x 1/255)")
    ax.grid(False)
    fig.colorbar(im, ax=ax, fraction=0.04, label="robust accuracy")
    width = 1.0 + 0.62 * len(eps)
    ax.set_title(wrap(f"{model} · {attack}", width, 8) + "\n" + wrap(f"defense: {defense}",
                                                                       width, 8), fontsize=8)
    return _png(fig)


def clean_vs_bits(recs: list[Record], model: str) -> bytes:
    """Clean accuracy vs bit width (float at 32), twin and integer model, per defense."""
    recs = [r for r in recs if r.model == model and r.metrics.get("clean_acc") is not None]
    by: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        by[(r.defense, "twin")][r.bits].append(r.metrics["clean_acc"])
        if r.metrics.get("clean_acc_int") is not None:
            by[(r.defense, "integer")][r.bits].append(r.metrics["clean_acc_int"])
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    for (defense, kind), pts in sorted(by.items()):
        bits = sorted(pts)
        acc = [float(np.mean(pts[b])) for b in bits]
        ax.plot(bits, acc, marker="o" if kind == "twin" else "s",
                ls="-" if kind == "twin" else ":", label=f"{defense} ({kind})")
    ticks = sorted({r.bits for r in recs})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [("fp32" if b == FLOAT_BITS else str(b)) for b in ticks])
    ax.set_xlabel("bits (min of weight / activation bits)")
    ax.set_ylabel("clean accuracy")
    ax.legend(fontsize=8)
    ax.set_title(f"{model}: clean accuracy vs bit width")
    return _png(fig)


def transfer(recs: list[Record], model: str) -> bytes | None:
    """Left: robust accuracy of the twin vs of the integer model (same x_adv). Right:
    transfer rate vs eps per recipe. None when no cell has an integer model."""
    recs = [r for r in recs if r.model == model and r.metrics.get("robust_acc_int") is not None]
    if not recs:
        return None
    recipes = _recipes(recs)
    colors = _colors(recipes)
    defenses = sorted({r.defense for r in recs}, key=lambda d: (d != "none", d))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for recipe in recipes:
        pts = [r for r in recs if r.recipe == recipe]
        for defense, marker in zip(defenses, "os^vDP", strict=False):
            mine = [r for r in pts if r.defense == defense]
            label = recipe if len(defenses) == 1 else f"{recipe} · {defense}"
            a1.scatter([r.robust for r in mine],
                       [r.metrics["robust_acc_int"] for r in mine], s=12, marker=marker,
                       color=colors[recipe], label=label)
        for attack, marker in zip(sorted({r.attack for r in pts}), "os^v", strict=False):
            line = sorted((r for r in pts if r.attack == attack and r.metrics["transfer_rate"]
                           is not None), key=lambda r: r.eps)
            if line:
                a2.plot([r.eps * 255 for r in line], [r.metrics["transfer_rate"] for r in line],
                        marker=marker, ms=3, color=colors[recipe], label=f"{recipe} {attack}")
    a1.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    a1.set_xlabel("robust accuracy, twin")
    a1.set_ylabel("robust accuracy, integer model")
    a1.legend(fontsize=7)
    a2.set_xlabel("eps (x 1/255)")
    a2.set_ylabel("transfer rate twin -> integer")
    a2.set_ylim(-0.02, 1.02)
    a2.legend(fontsize=6, ncol=2)
    a1.set_title("markers: defense" if len(defenses) > 1 else f"defense: {defenses[0]}",
                 fontsize=8)
    fig.suptitle(f"{model}: does the attack on the twin transfer to the deployed integer model?")
    return _png(fig)


def fit_quality(recs: list[Record], fit: Fit, title: str) -> bytes:
    """Observed vs fitted accuracy (one point per cell) with the identity line."""
    obs = np.array([r.robust for r in recs], dtype=float)
    pred = fit.predict(np.array([r.bits for r in recs]), np.array([r.eps for r in recs]))
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    ax.scatter(pred, obs, s=10, c=[r.bits for r in recs], cmap="viridis")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("fitted accuracy")
    ax.set_ylabel("observed accuracy")
    ax.set_title(f"{title}\nR²={fit.r2:.3f}, RMSE={fit.rmse:.3f}, n={fit.n}", fontsize=8)
    return _png(fig)


def plot_amplification(results: dict[str, list[dict]], path: str | Path,
                       title: str = "layer-wise error amplification") -> Path:
    """One line per model: mean ratio ||f_l(x+delta)-f_l(x)|| / ||f_l(x)|| against layer index
    (log scale). Writes a PNG at ``path`` and returns it."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, rows in results.items():
        ax.plot([r["index"] for r in rows], [r["mean"] for r in rows], "o-", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("layer (0 = input)")
    ax.set_ylabel("||f(x+d) - f(x)|| / ||f(x)||")
    ax.set_title(title)
    ax.legend()
    return save_png(fig, path)


def plot_information_plane(curves: dict[str, list[dict]], path: str | Path) -> Path:
    """Plot mean detection score (x) against accuracy (y), one line per model, eps annotated."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, rows in curves.items():
        ax.plot([r["mean_score"] for r in rows], [r["accuracy"] for r in rows], "o-", label=name)
        for r in rows:
            ax.annotate(f"{r['eps'] * 255:.0f}/255", (r["mean_score"], r["accuracy"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    score = next((r["score"] for rows in curves.values() for r in rows), "mi")
    ax.set_xlabel("mean member mutual information (nats)" if score == "mi" else f"mean {score}")
    ax.set_ylabel("accuracy")
    ax.set_title("adversarial information plane")
    ax.legend()
    return save_png(fig, path)


def certified_accuracy(groups: list[dict]) -> bytes:
    """Certified accuracy against radius, a step curve per certification cell."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for g in groups:
        m = g["members"]
        top = max([x["radius"] for x in m] + [1.0])
        r = np.linspace(0.0, top, 200)
        acc = [(sum(x["correct"] and x["radius"] >= v for x in m) / len(m)) for v in r]
        ax.plot(r, acc, label=wrap(g["label"], 3.0, 7), lw=1.2)
    ax.set_xlabel("L2 radius (pixel units)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6)
    return _png(fig)
