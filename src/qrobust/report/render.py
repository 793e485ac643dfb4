"""The study report: one self-contained HTML file (PNGs inlined as base64) and report.md.

Sections: summary table (clean accuracy and robust accuracy per recipe), accuracy vs eps
(a curve per bit width), bits x eps heatmaps, clean accuracy vs bits, twin vs integer
transfer, verified accuracy (verify cells) beside the attack's upper bound and smoothing
certificates, certified accuracy, the fitted accuracy model with its goodness of fit,
warnings, provenance.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qrobust.eval.grid import model_label
from qrobust.eval.store import ResultStore
from qrobust.report import plots
from qrobust.report.fit import FORMULA, PARAMS, Fit, fit_accuracy
from qrobust.report.tables import FLOAT_BITS, Record, _mean_sd, cross_checks, records


@dataclass
class Figure:
    name: str  # file stem
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Report:
    title: str
    study: dict
    recs: list[Record]
    fits: dict[tuple, Fit | str]
    figures: list[Figure] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (where, message)
    provenance: dict = field(default_factory=dict)
    missing: int = 0  # planned cells of the latest run with no stored result
    planned: int = 0
    certified: list[dict] = field(default_factory=list)  # one per certification cell
    verified: list[dict] = field(default_factory=list)  # stored verify cells (table verify)

    @property
    def banner(self) -> str:
        if not self.missing:
            return ""
        return (f"Unfinished study: {self.missing} of {self.planned} planned cells have no result "
                "yet; figures and fits use the others. Run `qrobust run` on the same study and "
                "out dir to complete it.")


ATTACK_NOTE = ("'standard' is the worst case over APGD-CE, APGD-T and Square (AutoAttack's "
               "standard version; 'budget_scale=F' when run below its published budget); 'fast' "
               "(PGD-10) and single attacks are upper bounds that a stronger attack may lower. "
               "Robust accuracy is the worst case after the attack's masking checks "
               "(temperature-rescaled and black-box follow-up attacks on the points left); in "
               "parentheses the attack alone, where the checks lowered it.")


CI_NOTE = ("Accuracy cells read 'mean ± h [lo, hi]': the mean over the k seeds; ± h the "
           "half-width of the 95% t-interval over seeds (mean ± t(0.975, k-1)·sd/√k: training, "
           "calibration and attack randomness; shown for k >= 2); [lo, hi] the 95% Wilson "
           "binomial interval over the n test points (test-set sampling; the seeds share the "
           "same n points, so n trials, not n·k).")


def _acc(r: Record, k: str) -> str:
    """An accuracy cell: 'mean ± seed half-width [binomial lo, hi]' (± only for >= 2 seeds)."""
    m = r.metrics.get(k)
    if m is None:
        return "–"
    seed, binom = r.seed_ci.get(k), r.binom_ci.get(k)
    return (_fmt(m) + (f" ± {_fmt((seed[1] - seed[0]) / 2)}" if seed else "")
            + (f" [{_fmt(binom[0])}, {_fmt(binom[1])}]" if binom else ""))


def _robust(r: Record) -> str:
    """'worst' or 'worst (attack alone)' when the masking checks' attacks lowered it, each
    with its intervals."""
    worst, alone = r.metrics.get("robust_acc_worst"), r.metrics["robust_acc"]
    if worst is None or alone is None or _fmt(worst) == _fmt(alone):
        return _acc(r, "robust_acc")
    return f"{_acc(r, 'robust_acc_worst')} ({_acc(r, 'robust_acc')})"


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def fit_all(recs: list[Record]) -> dict[tuple, Fit | str]:
    """One accuracy(bits, eps) fit per (model, defense, attack) over its recipes."""
    out: dict[tuple, Fit | str] = {}
    for key in sorted({(r.model, r.defense, r.attack) for r in recs}):
        pts = [r for r in recs if (r.model, r.defense, r.attack) == key
               and r.robust is not None]
        if len({r.bits for r in pts}) < 2:
            out[key] = "a single bit width: nothing to fit across bits"
            continue
        out[key] = fit_accuracy(np.array([r.bits for r in pts]), np.array([r.eps for r in pts]),
                                np.array([r.robust for r in pts]))
    return out


def load_rows(store_file: str | Path) -> tuple[list[dict], dict, int]:
    """The study's rows, its config and how many cells the latest run planned (0: no plan).
    Rows of cells that are not in that plan (an earlier version of the study written to the
    same store) stay stored but are left out."""
    with ResultStore(store_file) as store:
        rows = store.rows("robustness")
        study = store.get_meta("study", {}) or {}
        planned = store.get_meta("plan")
    if planned is None:
        return rows, study, 0
    keep = set(planned)
    return [r for r in rows if r["key"] in keep], study, len(keep)


def certification_groups(store_file: str | Path) -> list[dict]:
    """The stored certificates grouped by certification cell (config without the image
    index): its label, config, and the certified accuracy at radii (the summary
    ``qrobust certify`` writes)."""
    from qrobust.eval.certification import summarize
    from qrobust.eval.store import canonical_json

    with ResultStore(store_file) as store:
        rows = store.rows("certify")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        cfg = {k: v for k, v in r["config"].items() if k != "index"}
        groups.setdefault(canonical_json(cfg), []).append(r)
    out = []
    for text, members in sorted(groups.items()):
        c = json.loads(text)
        kind = (f"integer {c.get('recipe') or 'twin'} ({c['noise']}, {c['backend']})"
                if c["integer"] else "float")
        label = f"{c['weights_sha256'][:8]} {kind}, sigma {c['sigma']:g}, n {c['n']}"
        out.append({"label": label, "config": c, **summarize(members),
                    "members": [m["metrics"] for m in members]})
    return out


def verify_rows(store_file: str | Path) -> list[dict]:
    """The stored verify cells of the latest run's plan (all of them without a plan)."""
    with ResultStore(store_file) as store:
        rows = store.rows("verify")
        planned = store.get_meta("verify_plan")
    return rows if planned is None else [r for r in rows if r["key"] in set(planned)]


def build_report(store_file: str | Path) -> Report:
    rows, study, planned = load_rows(store_file)
    missing = max(0, planned - len({r["key"] for r in rows}))
    recs = records(rows)
    fits = fit_all(recs)
    verified = verify_rows(store_file)
    cells = rows + verified
    prov = {}
    if cells:
        shas = sorted({str(r["git_sha"]) for r in cells})
        prov = {"git_sha": ", ".join(shas), "versions": cells[-1]["versions"],
                "cells": len(cells),
                "compute_seconds": round(sum(r["metrics"].get("seconds", 0) for r in cells), 1)}
    rep = Report(f"qrobust study: {study.get('name', Path(store_file).parent.name)}", study,
                 recs, fits, provenance=prov, missing=missing, planned=planned,
                 certified=certification_groups(store_file), verified=verified)
    if rep.certified:
        rep.figures.append(Figure("certified-accuracy", "certified accuracy vs radius",
                                  plots.certified_accuracy(rep.certified),
                                  "Share of the certified test points classified correctly "
                                  "with a certified L2 radius of at least r (pixel units)."))
    for model in sorted({r.model for r in recs}):
        mfits = {k: v for k, v in fits.items() if isinstance(v, Fit)}
        rep.figures.append(Figure(f"{model}-acc-vs-eps", f"{model}: accuracy vs eps",
                                  plots.accuracy_vs_eps(recs, model, mfits),
                                  "Robust accuracy of the (defended) fake-quant twin under each "
                                  "attack, a curve per recipe; error bars: sd over seeds; dashed: "
                                  "the fitted accuracy model."))
        for defense in sorted({r.defense for r in recs if r.model == model}):
            for attack in sorted({r.attack for r in recs if r.model == model}):
                rep.figures.append(Figure(f"{model}-heatmap-{attack}-{defense}",
                                          f"bits x eps: {attack}, defense {defense}",
                                          plots.heatmap(recs, model, defense, attack)))
        rep.figures.append(Figure(f"{model}-clean-vs-bits", f"{model}: clean accuracy vs bits",
                                  plots.clean_vs_bits(recs, model)))
        png = plots.transfer(recs, model)
        notes = sorted({n for r in recs if r.model == model for n in r.notes})
        if png is not None:
            rep.figures.append(Figure(f"{model}-transfer", f"{model}: twin vs integer model", png,
                                      "x_adv crafted on the twin, evaluated on the integer model."))
        for key, fit in fits.items():
            if key[0] == model and isinstance(fit, Fit):
                pts = [r for r in recs if (r.model, r.defense, r.attack) == key
                       and r.robust is not None]
                rep.figures.append(Figure(f"{model}-fit-{key[2]}-{key[1]}",
                                          f"fit: {key[2]}, defense {key[1]}",
                                          plots.fit_quality(pts, fit, f"{key[2]} · {key[1]}")))
        rep.warnings += [(f"{model} integer model", n) for n in notes]
    for r in recs:
        where = f"{r.model}/{r.recipe}/{r.defense}/{r.attack}@eps={r.eps * 255:.3g}/255"
        rep.warnings += [(where, w) for w in r.warnings]
    rep.warnings += [("cross-cell check", w) for w in cross_checks(recs)]
    return rep


def summary_table(recs: list[Record]) -> tuple[list[str], list[list[str]]]:
    """Rows (model, defense, attack, recipe): clean acc (twin / integer), robust acc per eps."""
    eps_all = sorted({r.eps for r in recs})
    head = ["model", "defense", "attack", "recipe", "clean", "clean int"] + [
        f"{e * 255:.3g}/255" for e in eps_all]
    body = []
    keys = sorted({(r.model, r.defense, r.attack, r.recipe, r.bits) for r in recs},
                  key=lambda k: (k[0], k[1] != "none", k[1], not k[2].startswith("standard"),
                                 k[2], -k[4], k[3]))
    for model, defense, attack, recipe, _ in keys:
        rs = {r.eps: r for r in recs if (r.model, r.defense, r.attack, r.recipe) ==
              (model, defense, attack, recipe)}
        any_r = next(iter(rs.values()))
        shown = attack if attack.startswith("standard") else f"{attack} (upper bound)"
        body.append([model, defense, shown, recipe, _acc(any_r, "clean_acc"),
                     _acc(any_r, "clean_acc_int")] +
                    [_robust(rs[e]) if e in rs else "" for e in eps_all])
    return head, body


def transfer_table(recs: list[Record]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "defense", "attack", "recipe", "eps", "robust twin", "robust int",
            "square on int", "transfer rate", "adv. disagreement", "mean linf", "mean l2"]
    body = [[r.model, r.defense, r.attack, r.recipe, f"{r.eps * 255:.3g}/255",
             _acc(r, "robust_acc"), _acc(r, "robust_acc_int"),
             _acc(r, "robust_acc_int_square"),
             _fmt(r.metrics.get("transfer_rate")), _fmt(r.metrics.get("adv_disagreement")),
             _fmt(r.metrics.get("mean_linf"), 4), _fmt(r.metrics.get("mean_l2"), 3)]
            for r in recs if r.eps > 0]
    return head, body


def fit_table(fits: dict[tuple, Fit | str]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "defense", "attack", "n", "R²", "RMSE", *PARAMS]
    body = []
    for (model, defense, attack), f in sorted(fits.items()):
        if isinstance(f, Fit):
            body.append([model, defense, attack, str(f.n), f"{f.r2:.3f}", f"{f.rmse:.3f}",
                         *(f"{f.params[p]:.4g}" for p in PARAMS)])
        else:
            body.append([model, defense, attack, "–", "–", "–", f"not fitted: {f}",
                         *[""] * (len(PARAMS) - 1)])
    return head, body


VERIFY_NOTE = ("Verified accuracy: the share of the first `limit` test points on which the "
               "integer program is proved robust (complete verification, qrobust.verify) at eps "
               "pixel codes, L-infinity; a lower bound on robust accuracy, exact where no query "
               "timed out. 'attack (upper bound)': the lowest robust accuracy of the integer model "
               "under the study's Linf attacks at the same eps (undefended; over the study's "
               "n_test points, the same points when limit >= n_test). 'smoothing': randomized "
               "smoothing of the same float checkpoint, certified accuracy at L2 radius "
               "eps * sqrt(d) / 255, which contains the Linf ball (a different, smoothed "
               "classifier, on its own images).")


def _attack_bound(recs: list[Record], model: str, recipe: str, eps: int) -> str:
    """The lowest robust accuracy of the integer model over the Linf attacks at eps codes."""
    found = []
    for r in recs:
        if ((r.model, r.recipe, r.defense, r.norm) == (model, recipe, "none", "linf")
                and abs(r.eps * 255 - eps) < 1e-6):
            for k in ("robust_acc_int", "robust_acc_int_square"):
                if r.metrics.get(k) is not None:
                    found.append((r.metrics[k], r.attack))
    if not found:
        return "–"
    value, attack = min(found)
    return f"{_fmt(value)} ({attack})"


def _smoothing(groups: list[dict], sha: str | None, eps: int, dim: int) -> str:
    """Certified accuracy of each smoothing cell of the float checkpoint ``sha`` at the L2
    radius that contains the Linf ball of ``eps`` codes."""
    radius = eps * math.sqrt(dim) / 255
    shown = []
    for g in groups:
        if sha is None or g["config"]["weights_sha256"] != sha:
            continue
        m = g["members"]
        acc = sum(x["correct"] and x["radius"] >= radius for x in m) / len(m)
        kind = "int" if g["config"]["integer"] else "float"
        shown.append(f"{_fmt(acc)} ({kind}, sigma {g['config']['sigma']:g})")
    return "; ".join(shown) or "–"


def verification_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    """Rows (model, recipe, timeout, eps): verified accuracy (mean over seeds) and counts
    (summed over seeds) beside the attack's upper bound and smoothing certificates."""
    head = ["model", "recipe", "timeout s", "eps codes", "n", "clean int", "verified",
            "vulnerable", "timeouts", "median s", "max s", "attack (upper bound)", "smoothing"]
    groups: dict[tuple, list[dict]] = {}
    for r in rep.verified:
        c = r["config"]
        groups.setdefault((model_label(c["model"]), c["recipe"], c["verify"]["timeout"],
                           c["eps"]), []).append(r["metrics"])
    body = []
    for (model, recipe, timeout, eps), ms in sorted(groups.items()):
        mean = {k: _mean_sd([m[k] for m in ms])[0] for k in ("clean_acc", "verified_acc")}
        total = {k: sum(m[k] for m in ms) for k in ("n", "vulnerable", "timeout")}
        medians = [m["median_seconds"] for m in ms if m["median_seconds"] is not None]
        maxima = [m["max_seconds"] for m in ms if m["max_seconds"] is not None]
        body.append([model, recipe, f"{timeout:g}", str(eps), str(total["n"]),
                     _fmt(mean["clean_acc"]), _fmt(mean["verified_acc"]),
                     str(total["vulnerable"]), str(total["timeout"]),
                     _fmt(float(np.median(medians)) if medians else None),
                     _fmt(max(maxima) if maxima else None),
                     _attack_bound(rep.recs, model, recipe, eps),
                     _smoothing(rep.certified, ms[0].get("float_weights_sha256"), eps,
                                ms[0]["input_dim"])])
    return head, body


# -- markdown ---------------------------------------------------------------------------------
def certification_table(groups: list[dict]) -> tuple[list[str], list[list[str]]]:
    radii = ("0", "0.25", "0.5", "0.75", "1")
    head = ["certification cell", "images", *[f"r={r}" for r in radii], "abstain",
            "mean radius (correct)"]
    body = [[g["label"], str(g["n_images"]), *[_fmt(g["certified_accuracy"][r]) for r in radii],
             _fmt(g["abstain_rate"]), _fmt(g["mean_radius_correct"])] for g in groups]
    return head, body


def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def to_markdown(rep: Report, image_dir: str = ".") -> str:
    parts = [f"# {rep.title}", ""] + ([f"> **{rep.banner}**", ""] if rep.missing else [])
    if rep.provenance:
        p = rep.provenance
        parts += [f"{p['cells']} cells; git {p['git_sha']}; compute {p['compute_seconds']} s", ""]
    parts += ["## Clean and robust accuracy (fake-quant twin)", "",
              "Columns after 'clean int' are robust accuracy at each eps (linf unless the "
              "attack says otherwise). " + ATTACK_NOTE, "", CI_NOTE, "",
              _md_table(*summary_table(rep.recs)),
              ""]
    parts += ["## Fitted model of accuracy(bits, eps)", "", f"`{FORMULA}`", "",
              "bits = the smaller of weight/activation bits, 32 for float recipes; least squares "
              "(scipy.optimize.curve_fit); R² and RMSE on the fitted points.", "",
              _md_table(*fit_table(rep.fits)), ""]
    if rep.verified:
        parts += ["## Verified accuracy (integer model, complete verification)", "",
                  VERIFY_NOTE, "", _md_table(*verification_table(rep)), ""]
    if rep.certified:
        parts += ["## Certified accuracy (randomized smoothing)", "",
                  "Certified accuracy at L2 radius r (pixel units) over each cell's images; "
                  "the rows `qrobust certify` writes.", "",
                  _md_table(*certification_table(rep.certified)), ""]
    parts += ["## Figures", ""]
    parts += [f"![{f.title}]({image_dir}/{f.name}.png)" for f in rep.figures]
    parts += ["", "## Warnings", ""]
    parts += [f"- **{w}**: {m}" for w, m in rep.warnings] or ["none"]
    parts += ["", "## Twin vs integer model", "", CI_NOTE, "",
              _md_table(*transfer_table(rep.recs)), ""]
    return "\n".join(parts) + "\n"


# -- html -------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1200px;color:#222;line-height:1.4;padding:0 16px}
h1{font-size:1.6em;margin-bottom:0.2em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:1.6em}table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f4f4f4}
td:nth-child(-n+4),th:nth-child(-n+4){text-align:left}.meta{color:#666;font-size:12px}
figure{display:inline-block;margin:8px;vertical-align:top}figcaption{font-size:12px;color:#555;
max-width:760px}img{max-width:100%;border:1px solid #eee}.warn{color:#8a4b00}
code{background:#f6f6f6;padding:1px 4px}.banner{background:#fff4e0;border:1px solid #e0a040;
padding:8px 12px;font-weight:600}pre{background:#f6f6f6;padding:8px;font-size:11px;
overflow-x:auto}
"""


def _html_table(head: list[str], body: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in body)
    return f"<table><tr>{h}</tr>{rows}</table>"


def _img(f: Figure) -> str:
    data = base64.b64encode(f.png).decode()
    cap = html.escape(f.title + (": " + f.caption if f.caption else ""))
    return (f'<figure><img alt="{html.escape(f.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{cap}</figcaption></figure>")


def to_html(rep: Report) -> str:
    import yaml

    e = html.escape
    figs = {k: [f for f in rep.figures if k in f.name] for k in
            ("acc-vs-eps", "heatmap", "clean-vs-bits", "transfer", "fit-")}
    p = rep.provenance
    meta = (f"{p['cells']} cells · git {e(str(p['git_sha']))} · compute {p['compute_seconds']} s"
            if p else "no rows")
    warn = "".join(f"<li class='warn'><b>{e(w)}</b>: {e(m)}</li>" for w, m in rep.warnings)
    no_int = "" if figs["transfer"] else (
        "<p>No cell has an integer model (see warnings for why); only the twin was attacked.</p>")
    sections = [
        f"<h1>{e(rep.title)}</h1><p class='meta'>{meta}</p>",
        f"<p class='banner'>{e(rep.banner)}</p>" if rep.missing else "",
        "<h2>Clean and robust accuracy</h2><p>Robust accuracy of the (defended) fake-quant twin "
        f"per eps; the attack runs only on points still classified correctly. {e(ATTACK_NOTE)}</p>"
        f"<p>{e(CI_NOTE)}</p>",
        _html_table(*summary_table(rep.recs)),
        "<h2>Accuracy vs eps (a curve per bit width)</h2>",
        *map(_img, figs["acc-vs-eps"]),
        "<h2>Bits x eps</h2>", *map(_img, figs["heatmap"]),
        "<h2>Clean accuracy vs bits</h2>", *map(_img, figs["clean-vs-bits"]),
        "<h2>Twin vs integer model</h2>", no_int, *map(_img, figs["transfer"]),
        "<details><summary>transfer table</summary>", _html_table(*transfer_table(rep.recs)),
        "</details>",
        *([f"<h2>Verified accuracy (integer model, complete verification)</h2><p>"
           f"{e(VERIFY_NOTE)}</p>", _html_table(*verification_table(rep))]
          if rep.verified else []),
        *(["<h2>Certified accuracy (randomized smoothing)</h2>",
            _html_table(*certification_table(rep.certified)),
            *map(_img, [f for f in rep.figures if f.name == "certified-accuracy"])]
          if rep.certified else []),
        "<h2>Fitted model of accuracy(bits, eps)</h2>",
        f"<p><code>{e(FORMULA)}</code></p><p>b = the smaller of weight and activation bits "
        f"({FLOAT_BITS} for float recipes); the accuracy floor is 0; least-squares fit "
        "(scipy.optimize.curve_fit) per (model, defense, attack) across recipes and eps. "
        "Goodness of fit: R² and RMSE over the fitted points (n).</p>",
        _html_table(*fit_table(rep.fits)), *map(_img, figs["fit-"]),
        f"<h2>Warnings ({len(rep.warnings)})</h2>",
        f"<ul>{warn}</ul>" if warn else "<p>none</p>",
        "<h2>Study config and provenance</h2>",
        f"<pre>{e(yaml.safe_dump(rep.study, sort_keys=False))}</pre>",
        f"<pre>{e(json.dumps(p.get('versions', {}), indent=1))}</pre>",
    ]
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{e(rep.title)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(sections) + "</body></html>\n")


REPORT_FILES = {"report.html", "report.md", "figures"}


def _write_files(rep: Report, out: Path) -> None:
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for f in rep.figures:
        f.name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f.name).strip("-")
        (out / "figures" / f"{f.name}.png").write_bytes(f.png)
    (out / "report.html").write_text(to_html(rep))
    (out / "report.md").write_text(to_markdown(rep, "figures"))


def write_report(store_file: str | Path, out: str | Path) -> dict[str, Path]:
    """Write ``report.html`` (self-contained), ``report.md`` and the PNGs under ``out``.

    The three are replaced together: the new report is written to a sibling staging
    directory that then takes the place of ``out`` (two renames, so a reader sees the old
    report or the new one, never a mix, and no figure of an earlier report stays behind).
    A directory that holds anything besides a report gets the new files moved in one by one
    instead, so nothing else in it is touched. Staging directories of a killed run are
    removed."""
    rep = build_report(store_file)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        _write_files(rep, stage)
        stage.chmod(0o755)
        if out.exists() and not set(os.listdir(out)) <= REPORT_FILES:  # not ours alone
            (out / "figures").mkdir(parents=True, exist_ok=True)
            for f in [*(stage / "figures").iterdir(), stage / "report.html", stage / "report.md"]:
                os.replace(f, out / f.relative_to(stage))
        else:
            old = out.parent / f".{out.name}.{os.getpid()}.old.tmp"
            if out.exists():
                os.rename(out, old)
            os.rename(stage, out)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for path in (out / "report.html", out / "report.md", *(out / "figures").glob("*.png")):
        path.chmod(0o644)  # a report is meant to be shared
    return {"html": out / "report.html", "md": out / "report.md"}
