"""Verify cells of a study: computed once, keyed like the other cells, shown in the report
beside the attack's upper bound and the smoothing certificates."""

import pytest

from qrobust.config import parse_study
from qrobust.errors import ConfigError
from qrobust.eval.executors import run_study
from qrobust.eval.store import ResultStore
from qrobust.eval.verification import TABLE, verify_plan


def study(ckpt, **overrides) -> dict:
    s = {"name": "verify-tiny", "data": {"dataset": "digits", "n_test": 8},
         "models": [{"name": "mlp", "checkpoint": str(ckpt)}],
         "recipes": ["fp32", "w4a4"],
         "attacks": [{"name": "fgsm", "eps": ["1/255"], "checks": []}],
         "certify": [{"sigma": 0.25, "n0": 10, "n": 100, "limit": 8, "first": True}],
         "verify": [{"eps": [0, 1, 0.1], "timeout": 1, "limit": 8}],
         "batch_size": 32}
    s.update(overrides)
    return s


def test_verify_cells_run_once_and_render(digits_mlp_w4a4, tmp_path):
    from qrobust.report import write_report

    config = parse_study(study(digits_mlp_w4a4[0]))
    assert [c.eps for c in verify_plan(config)] == [0, 1, 26]  # w4a4 only; 0.1 is 26 codes
    s = run_study(config, tmp_path, progress=False)
    assert (s.verify_cells, s.verify_computed) == (3, 3)
    with ResultStore(tmp_path / "results.sqlite") as store:
        rows = {r["config"]["eps"]: r["metrics"] for r in store.rows(TABLE)}
    assert set(rows) == {0, 1, 26}
    for m in rows.values():
        assert m["n"] == 8 and m["robust"] + m["vulnerable"] + m["timeout"] == m["queries"]
        assert m["verified_acc"] == m["robust"] / 8 and m["input_dim"] == 64
        assert len(m["float_weights_sha256"]) == 64
    assert rows[0]["verified_acc"] == rows[0]["clean_acc"]  # eps 0: every correct point
    assert rows[26]["verified_acc"] <= rows[1]["verified_acc"] <= rows[0]["verified_acc"]
    # a rerun computes nothing, and neither do workers (how fast, not what is computed)
    again = parse_study(study(digits_mlp_w4a4[0], verify=[{"eps": [0, 1, 0.1], "timeout": 1,
                                                           "limit": 8, "workers": 2}]))
    s = run_study(again, tmp_path, progress=False)
    assert (s.computed, s.images_computed, s.verify_computed) == (0, 0, 0)
    paths = write_report(tmp_path / "results.sqlite", tmp_path / "report")
    md = paths["md"].read_text()
    assert "## Verified accuracy (integer model, complete verification)" in md
    (line,) = [ln for ln in md.splitlines() if ln.startswith("| mlp | w4a4 | 1 | 0 |")]
    assert "(float, sigma 0.25)" in line  # the smoothing certificate of the same checkpoint
    (line,) = [ln for ln in md.splitlines() if ln.startswith("| mlp | w4a4 | 1 | 1 |")]
    assert "(fgsm)" in line  # the attack's upper bound at 1/255
    assert "Verified accuracy" in paths["html"].read_text()
    # a longer time limit is another cell
    longer = parse_study(study(digits_mlp_w4a4[0], verify=[{"eps": [0], "timeout": 2,
                                                            "limit": 8}]))
    assert run_study(longer, tmp_path, progress=False).verify_computed == 1


def test_a_verify_only_study_runs_and_renders(digits_mlp_w4a4, tmp_path):
    from qrobust.report import write_report

    config = parse_study(study(digits_mlp_w4a4[0], attacks=[], certify=[],
                               verify=[{"eps": [0, 1], "timeout": 5, "limit": 4}]))
    s = run_study(config, tmp_path, progress=False)
    assert (s.total, s.verify_cells, s.verify_computed) == (0, 2, 2)
    md = write_report(s.store, tmp_path / "report")["md"].read_text()
    assert "2 cells" in md and md.count("| mlp | w4a4 | 5 |") == 2


def test_verify_config_errors(digits_mlp_w4a4):
    ckpt = digits_mlp_w4a4[0]
    with pytest.raises(ConfigError, match=r"verify\[0\]\.eps\[1\]: eps -1 is negative"):
        parse_study(study(ckpt, verify=[{"eps": [1, -1]}]))
    with pytest.raises(ConfigError, match=r"eps 256 is beyond the input range"):
        parse_study(study(ckpt, verify=[{"eps": [256]}]))
    with pytest.raises(ConfigError, match=r"verify\[0\]\.timeout: .*greater than 0"):
        parse_study(study(ckpt, verify=[{"eps": [1], "timeout": 0}]))
    with pytest.raises(ConfigError, match=r"verify\[0\]\.limit: .*greater than or equal to 1"):
        parse_study(study(ckpt, verify=[{"eps": [1], "limit": 0}]))
    with pytest.raises(ConfigError, match="verify cells verify integer programs"):
        parse_study(study(ckpt, recipes=["fp32", "w4"]))
    with pytest.raises(ConfigError, match="eps values repeat"):
        parse_study(study(ckpt, verify=[{"eps": [2, "2/255"]}]))
