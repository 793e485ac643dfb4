"""The report: self-contained HTML, markdown tables with the stored numbers, sanity checks."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from scipy.stats import binomtest

from qrobust.cli import main
from qrobust.config import parse_study
from qrobust.eval.grid import TABLE, plan
from qrobust.eval.store import ResultStore
from qrobust.report import write_report
from qrobust.report.fit import accuracy_model
from qrobust.report.tables import bits_of, cross_checks, records

EPS = [0, 0.02, 0.05, 0.1, 0.2, 0.3]
TRUE = (0.95, 0.8, 0.08, 0.1, np.log(0.02), 0.5)


def synthetic_store(path, rising: bool = False, pgd_weaker: bool = False):
    study = parse_study({
        "name": "synthetic", "data": {"dataset": "digits", "n_test": 1000},
        "models": [{"name": "m", "arch": "small-cnn"}],
        "recipes": ["fp32", "w8a8", "w4a4", "w2a2"],
        "attacks": [{"name": "fgsm", "eps": EPS}, {"name": "pgd", "eps": EPS[1:]}]})
    with ResultStore(path) as store:
        store.set_meta("study", study.model_dump(mode="json"))
        for c in plan(study):
            b = bits_of(c.recipe)
            acc = float(accuracy_model(np.array([[b], [c.eps]]), *TRUE)[0])
            if c.attack.name == "pgd":
                acc *= 0.9
            if rising and c.attack.name == "fgsm" and c.recipe == "w4a4" and c.eps == 0.2:
                acc = 0.95
            if pgd_weaker and c.attack.name == "pgd" and c.recipe == "w2a2" and c.eps == 0.1:
                acc = 0.99
            clean = float(accuracy_model(np.array([[b], [0.0]]), *TRUE)[0])
            metrics = {"n": 1000, "clean_acc": clean, "robust_acc": acc,
                       "clean_acc_int": None if b == 32 else clean - 0.01,
                       "robust_acc_int": None if b == 32 else min(acc + 0.05, clean),
                       "transfer_rate": None if b == 32 or c.eps == 0 else 0.8,
                       "adv_disagreement": None if b == 32 else 0.02, "seconds": 0.1,
                       "integer_note": None}
            store.put(c.key, TABLE, c.config, metrics, ["masked here"] if b == 2 else [], c.seed)
    return study


def test_bits_of():
    assert [bits_of(r) for r in ("fp32", "w8a8", "w4a8", "w3", "gorsline5")] == [32, 8, 4, 3, 5]


def test_html_is_self_contained_and_md_has_the_numbers(tmp_path):
    synthetic_store(tmp_path / "results.sqlite")
    paths = write_report(tmp_path / "results.sqlite", tmp_path / "report")
    html = paths["html"].read_text()
    assert "<link" not in html and "http://" not in html and "https://" not in html
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', html)
    # acc-vs-eps, 2 heatmaps, clean-vs-bits, transfer, 2 fit plots
    assert len(images) == 7 == html.count("<img")
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    for section in ("Accuracy vs eps", "Bits x eps", "Clean accuracy vs bits",
                    "Twin vs integer model", "Fitted model", "Warnings"):
        assert section in html
    md = paths["md"].read_text()
    clean32 = float(accuracy_model(np.array([[32], [0.0]]), *TRUE)[0])
    ci = binomtest(round(clean32 * 1000), 1000).proportion_ci(0.95, method="wilson")
    # one seed: no ± over seeds, the Wilson interval over the 1000 test points
    assert (f"| m | none | fgsm (upper bound) | fp32 | {clean32:.3f} [{ci.low:.3f}, "
            f"{ci.high:.3f}] | – |") in md
    # the synthetic data follow the model exactly (fgsm): the fit is near perfect
    fit_row = next(line for line in md.splitlines() if line.startswith("| m | none | fgsm | 24"))
    r2 = float(fit_row.split("|")[5])
    assert r2 > 0.999
    assert "masked here" in md and len(list((tmp_path / "report" / "figures").glob("*.png"))) == 7


def test_cross_checks_flag_rising_accuracy_and_weak_pgd(tmp_path):
    synthetic_store(tmp_path / "a.sqlite")
    with ResultStore(tmp_path / "a.sqlite") as s:
        assert cross_checks(records(s.rows())) == []
    synthetic_store(tmp_path / "b.sqlite", rising=True, pgd_weaker=True)
    with ResultStore(tmp_path / "b.sqlite") as s:
        found = cross_checks(records(s.rows()))
    assert len(found) == 3, found  # w4a4 fgsm rises 0.1->0.2 ; w2a2 pgd rises 0.05->0.1, > fgsm
    assert any("m/w4a4/none/fgsm: robust accuracy rises" in w for w in found)
    assert any("m/w2a2/none: PGD leaves 0.990" in w for w in found)


def test_cli_results_and_report(tmp_path, capsys):
    synthetic_store(tmp_path / "results.sqlite")
    assert main(["results", str(tmp_path), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("model,recipe,defense,attack,norm,eps,seed") and len(lines) == 45
    assert main(["results", str(tmp_path), "--format", "json"]) == 0
    assert '"robust_acc"' in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report" / "report.html").is_file()
    assert main(["results", str(tmp_path / "nothing")]) == 2
    assert "no results store" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["xml"])
def test_bad_format(tmp_path, capsys, fmt):
    synthetic_store(tmp_path / "results.sqlite")
    assert main(["results", str(tmp_path), "--format", fmt]) == 2
    assert "--format must be csv or json" in capsys.readouterr().err


def test_unfinished_study_says_how_many_cells_are_missing(tmp_path):
    study = synthetic_store(tmp_path / "results.sqlite")
    keys = [c.key for c in plan(study)]
    with ResultStore(tmp_path / "results.sqlite") as store:
        store.set_meta("plan", keys + ["not-run-1", "not-run-2", "not-run-3"])
    paths = write_report(tmp_path / "results.sqlite", tmp_path / "report")
    banner = f"Unfinished study: 3 of {len(keys) + 3} planned cells have no result"
    assert banner in paths["html"].read_text() and banner in paths["md"].read_text()
    with ResultStore(tmp_path / "results.sqlite") as store:
        store.set_meta("plan", keys)  # complete: no banner
    paths = write_report(tmp_path / "results.sqlite", tmp_path / "report")
    assert "Unfinished" not in paths["html"].read_text()


def test_long_defense_names_never_make_panel_titles_overlap(monkeypatch):
    from qrobust.report import plots
    from qrobust.report.tables import Record

    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or b"")
    recs = [Record("small-cnn", recipe, defense, attack, "linf", eps, bits, 100, [0],
                   {"robust_acc": 0.5}, {"robust_acc": None})
            for defense in ("none", "mc-dropout(passes=2,rate=0.2)")
            for attack in ("fgsm", "pgd") for recipe, bits in (("fp32", 32), ("w4a4", 4))
            for eps in (0.0, 0.1)]
    plots.accuracy_vs_eps(recs, "small-cnn")
    plots.heatmap(recs, "small-cnn", "mc-dropout(passes=2,rate=0.2)", "pgd")
    for fig in figures:
        fig.tight_layout()
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
        assert boxes and all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        assert all(b.x0 >= 0 and b.x1 <= fig.bbox.x1 for b in boxes)  # and inside the figure
    assert "\n" in figures[0].axes[2].get_title()  # the long one was wrapped


def test_a_new_report_replaces_the_old_one_whole_and_leaves_other_files_alone(tmp_path):
    synthetic_store(tmp_path / "results.sqlite")
    out = tmp_path / "report"
    write_report(tmp_path / "results.sqlite", out)
    (out / "figures" / "from-an-older-report.png").write_bytes(b"old")
    stale_stage = tmp_path / ".report.killed.tmp"  # what a killed report run left
    stale_stage.mkdir()
    paths = write_report(tmp_path / "results.sqlite", out)
    assert not (out / "figures" / "from-an-older-report.png").exists()  # replaced whole
    assert set(p.name for p in out.iterdir()) == {"report.html", "report.md", "figures"}
    assert len(list((out / "figures").glob("*.png"))) == 7 and paths["md"].is_file()
    assert not stale_stage.exists() and not list(tmp_path.glob(".report.*"))
    # a directory with other files in it: the report's files are replaced, the others stay
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("mine")
    write_report(tmp_path / "results.sqlite", mixed)
    assert (mixed / "notes.txt").read_text() == "mine" and (mixed / "report.html").is_file()
    assert len(list((mixed / "figures").glob("*.png"))) == 7
