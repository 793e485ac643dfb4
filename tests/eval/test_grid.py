"""The grid: cells, keys, metrics checked against a direct computation, resumption."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from qrobust.config import parse_study
from qrobust.eval.executors import run_study
from qrobust.eval.grid import TABLE, Workbench, evaluate_cell, plan
from qrobust.eval.store import ResultStore


def test_plan_is_the_full_product_with_unique_stable_keys(tiny_study):
    study = parse_study(tiny_study(seeds=[0, 1], defenses=["none", "median"]))
    cells = plan(study)
    n_eps = sum(len(a.eps) for a in study.attacks)
    assert len(cells) == len(study.models) * 2 * 2 * 2 * n_eps
    assert len({c.key for c in cells}) == len(cells)
    assert [c.key for c in plan(study)] == [c.key for c in cells]  # stable
    combos = {(c.recipe, c.defense.name, c.attack.name, c.eps, c.seed) for c in cells}
    assert len(combos) == len(cells)
    # changing one eps changes exactly the keys of that attack's cells at that eps
    other = parse_study(tiny_study(seeds=[0, 1], defenses=["none", "median"],
                                   attacks=[{"name": "fgsm", "eps": [0, "4/255", "15/255"]},
                                            {"name": "pgd", "eps": ["16/255"],
                                             "params": {"steps": 3}}]))
    changed = {c.key for c in cells} ^ {c.key for c in plan(other)}
    assert len(changed) == 2 * 2 * 2 * 2  # (old + new) x recipes x defenses x seeds


def fgsm_oracle(model, x, y, eps):
    """Plain FGSM written out: x + eps * sign(grad CE), clipped to [0, 1]."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return (x + eps * g.sign()).clamp(0, 1).detach()


def test_fgsm_cell_matches_a_direct_computation(tiny_study, tmp_path):
    study = parse_study(tiny_study(recipes=["fp32"]))
    bench = Workbench(study, tmp_path)
    x, y = bench.test_points()
    for cell in plan(study):
        if cell.attack.name != "fgsm":
            continue
        metrics, warnings = evaluate_cell(bench, cell)
        model = bench.float_model(cell.model, 0)
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        x_adv = fgsm_oracle(model, x, y, cell.eps) if cell.eps > 0 else x
        with torch.no_grad():
            robust = correct & (model(x_adv).argmax(1) == y)
        fooled = correct & ~robust
        assert metrics["n"] == len(y) == 48
        assert metrics["clean_acc"] == pytest.approx(correct.float().mean().item())
        assert metrics["robust_acc"] == pytest.approx(robust.float().mean().item())
        if cell.eps > 0 and fooled.any():
            assert metrics["mean_linf"] == pytest.approx(cell.eps, rel=1e-4)
            assert metrics["attack_success_rate"] == pytest.approx(fooled.sum().item() /
                                                              correct.sum().item())
        assert metrics["integer_note"] is None and metrics["robust_acc_int"] is None
        assert isinstance(warnings, list)


def test_integer_metrics_and_invariants(tiny_study, tmp_path):
    study = parse_study(tiny_study(recipes=["w8a8"], attacks=[
        {"name": "pgd", "eps": [0, "8/255"], "params": {"steps": 3}}]))
    bench = Workbench(study, tmp_path)
    rows = [evaluate_cell(bench, c)[0] for c in plan(study)]
    clean, attacked = rows
    assert clean["robust_acc"] == clean["clean_acc"] and clean["transfer_rate"] is None
    for m in rows:
        assert m["clean_acc_int"] is not None and 0 <= m["robust_acc_int"] <= 1
        assert m["robust_acc"] <= m["clean_acc"]
    # the 8-bit integer model predicts like its twin on clean points (quant contract: >= 99.9%)
    assert abs(clean["clean_acc_int"] - clean["clean_acc"]) <= 1 / 48
    assert attacked["robust_acc"] < attacked["clean_acc"]
    assert attacked["transfer_rate"] is not None and attacked["transfer_rate"] > 0.5
    assert attacked["estimator"] == "autograd"


def table(store_file):
    with ResultStore(store_file) as store:
        rows = store.rows(TABLE)
    return {r["key"]: {k: v for k, v in r["metrics"].items() if k != "seconds"} for r in rows}


def test_resume_computes_only_missing_cells_and_reproduces(tiny_study, tmp_path):
    study = parse_study(tiny_study())
    first = run_study(study, tmp_path / "a", progress=False)
    assert (first.total, first.skipped, first.computed) == (8, 0, 8)
    again = run_study(study, tmp_path / "a", progress=False)
    assert (again.skipped, again.computed) == (8, 0)
    full = table(first.store)
    # drop three rows as if the run had died before writing them
    with ResultStore(first.store) as store:
        victims = [r["key"] for r in store.rows()][2:5]
        store._db.execute(f"DELETE FROM results WHERE key IN ({','.join('?' * 3)})", victims)
    resumed = run_study(study, tmp_path / "a", progress=False)
    assert (resumed.skipped, resumed.computed) == (5, 3)
    assert table(first.store) == full


@pytest.mark.parametrize("defense", ["bit-depth", "mc-dropout"])
def test_defenses_pick_adaptive_estimators(tiny_study, tmp_path, defense):
    params = {"passes": 2, "rate": 0.2} if defense == "mc-dropout" else {}
    study = parse_study(tiny_study(recipes=["fp32"], defenses=[{"name": defense,
                                                                "params": params}],
                                   attacks=[{"name": "pgd", "eps": ["8/255"],
                                             "params": {"steps": 2}}]))
    bench = Workbench(study, tmp_path)
    (cell,) = plan(study)
    m1, _ = evaluate_cell(bench, cell)
    m2, _ = evaluate_cell(Workbench(study, tmp_path), cell)  # fresh process state, same seed
    expected = {"bit-depth": "bpda", "mc-dropout": "eot"}[defense]
    assert m1["estimator"].lower().startswith(expected)
    drop = {"seconds"}
    assert {k: v for k, v in m1.items() if k not in drop} == {
        k: v for k, v in m2.items() if k not in drop}


def test_cells_are_order_independent(tiny_study, tmp_path):
    study = parse_study(tiny_study(recipes=["fp32"]))
    cells = plan(study)
    forward = [evaluate_cell(Workbench(study, tmp_path), c)[0] for c in cells]
    bench = Workbench(study, tmp_path)
    backward = [evaluate_cell(bench, c)[0] for c in reversed(cells)][::-1]
    for a, b in itertools.zip_longest(forward, backward):
        a.pop("seconds"), b.pop("seconds")
        assert a == b


def test_report_shows_only_the_latest_plan(tiny_study, tmp_path):
    from qrobust.report.render import load_rows

    run_study(parse_study(tiny_study(recipes=["fp32"])), tmp_path, progress=False)
    changed = parse_study(tiny_study(recipes=["fp32"], attacks=[{"name": "fgsm", "eps": [0]}]))
    run_study(changed, tmp_path, progress=False)
    rows, study, _ = load_rows(tmp_path / "results.sqlite")
    with ResultStore(tmp_path / "results.sqlite") as store:
        assert len(store) == 4  # nothing is deleted ...
    assert [r["key"] for r in rows] == [c.key for c in plan(changed)]  # ... but only 1 shown
    assert study["attacks"][0]["eps"] == [0.0]
