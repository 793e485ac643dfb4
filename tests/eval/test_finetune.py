"""Fine-tuned models in studies: each model's own recipes pick its cells, every fine-tune
(DQ, vanilla QAT, SQ ensemble) is trained once from one shared float model, saved with the
architecture options it was built with, and a rerun trains and computes nothing."""

from __future__ import annotations

import pytest

from qrobust.checkpoint import read_meta
from qrobust.config import parse_study
from qrobust.eval.executors import run_study
from qrobust.eval.store import ResultStore

pytestmark = pytest.mark.slow

BASE = {"arch": "small-cnn", "arch_params": {"width": 4}, "train": {"epochs": 1}}


def study() -> dict:
    return {
        "name": "ft", "data": {"dataset": "digits", "n_test": 24},
        "models": [
            {**BASE, "recipes": ["fp32", "w4a4"]},
            {**BASE, "name": "dq", "recipes": ["w4a4"],
             "finetune": {"method": "dq", "beta": 1e-3, "epochs": 1, "n_train": 128}},
            {**BASE, "name": "ens", "recipes": ["fp32"],
             "finetune": {"method": "sq-ensemble", "k": 2, "epochs": 1, "n_train": 128}},
        ],
        "attacks": [{"name": "fgsm", "eps": ["16/255"]}],
        "quant": {"calib": 64}, "seeds": [0], "batch_size": 24,
    }


def test_finetunes_share_one_float_model_and_rerun_trains_nothing(tmp_path):
    config = parse_study(study())
    first = run_study(config, tmp_path, progress=False)
    assert (first.total, first.computed) == (4, 4)  # fp32 + w4a4, dq w4a4, ensemble fp32
    dirs = sorted(p.name.split("-s0-")[0] for p in (tmp_path / "models").iterdir())
    assert dirs == ["dq-w4a4", "ens", "small-cnn"]  # one float model, not one per fine-tune
    for d in (tmp_path / "models").iterdir():
        assert read_meta(d)["model"]["kwargs"] == {"width": 4}, d.name
    kinds = {d.name.split("-s0-")[0]: read_meta(d).get("kind") for d in (tmp_path / "models").iterdir()}
    assert kinds["dq-w4a4"] == "quantized" and kinds["ens"] == "sq-ensemble"
    with ResultStore(first.store) as store:
        rows = store.rows("robustness")
    cells = sorted((r["config"]["model"].get("name") or "small-cnn", r["config"]["recipe"])
                   for r in rows)
    assert cells == [("dq", "w4a4"), ("ens", "fp32"), ("small-cnn", "fp32"), ("small-cnn", "w4a4")]
    ens = next(r for r in rows if r["config"]["model"].get("name") == "ens")
    assert ens["metrics"]["estimator"].startswith("eot")  # the ensemble is randomized

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "models").rglob("*") if p.is_file()}
    again = run_study(parse_study(study()), tmp_path, progress=False)
    assert (again.skipped, again.computed) == (4, 0)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "models").rglob("*")
            if p.is_file()} == stamps


def test_model_identity_holds_what_the_weights_depend_on():
    from qrobust.eval.grid import model_identity

    def ident(**finetune):
        return model_identity(parse_study({**study(), "models": [
            {**BASE, "name": "dq", "recipes": ["w4a4"],
             "finetune": {"method": "dq", **finetune}}]}).models[0])

    plain = ident()
    assert "subset_seed" not in plain["finetune"]  # keys written before it existed stay valid
    assert "quantizers" not in plain["finetune"] and ident(quantizers="lsq") != plain
    assert ident(subset_seed=2) != plain and ident(beta=0.1) != plain
    assert ident(subset_seed=2) == ident(subset_seed=2)
    recipes_only = parse_study({**study(), "models": [{**BASE, "recipes": ["w8a8"]}]}).models[0]
    assert model_identity(recipes_only) == model_identity(parse_study(study()).models[0])
