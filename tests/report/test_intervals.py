"""95% intervals in the report: the t-interval over seeds and the binomial interval over test
points, both against scipy computed independently here, and their rendering."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from qrobust.config import parse_study
from qrobust.eval.grid import TABLE, plan
from qrobust.eval.store import ResultStore
from qrobust.report import write_report
from qrobust.report.render import summary_table
from qrobust.report.tables import binomial_interval, records, seed_interval

N = 500
CLEAN = {0: 0.90, 1: 0.93, 2: 0.86}  # per seed
ROBUST = {0: 0.412, 1: 0.380, 2: 0.450}  # the attack alone, per seed
WORST = {0: 0.300, 1: 0.330, 2: 0.290}  # after the masking checks' follow-up attacks


def seeded_store(path, seeds=(0, 1, 2)):
    """A one-model study (fp32, w4a4; PGD at 8/255) whose metrics differ by seed."""
    study = parse_study({
        "name": "seeded", "data": {"dataset": "digits", "n_test": N}, "seeds": list(seeds),
        "models": [{"name": "m", "arch": "small-cnn"}], "recipes": ["fp32", "w4a4"],
        "attacks": [{"name": "pgd", "eps": [8 / 255]}]})
    with ResultStore(path) as store:
        store.set_meta("study", study.model_dump(mode="json"))
        for c in plan(study):
            metrics = {"n": N, "clean_acc": CLEAN[c.seed], "robust_acc": ROBUST[c.seed],
                       "robust_acc_worst": WORST[c.seed], "seconds": 0.1}
            store.put(c.key, TABLE, c.config, metrics, [], c.seed)
    return study


def _records(path):
    with ResultStore(path) as s:
        return records(s.rows())


@pytest.mark.parametrize("values", [[0.412, 0.380, 0.450], [0.5, 0.52], [0.1, 0.1, 0.2, 0.15, 0.12]])
def test_seed_interval_is_scipys_t_interval(values):
    k = len(values)
    oracle = stats.t.interval(0.95, k - 1, loc=np.mean(values), scale=stats.sem(values))
    assert seed_interval(values) == pytest.approx(oracle, abs=1e-12)


def test_one_seed_has_no_seed_interval(tmp_path):
    assert seed_interval([0.4]) is None and seed_interval([]) is None
    seeded_store(tmp_path / "r.sqlite", seeds=(0,))
    for r in _records(tmp_path / "r.sqlite"):
        assert r.seed_ci["robust_acc"] is None and r.spread["robust_acc"] is None
        assert r.binom_ci["robust_acc"] is not None  # the test points still give one


@pytest.mark.parametrize("k,n", [(1, 100), (3, 500), (5, 1000), (2, 37)])
def test_binomial_interval_matches_binomtest_and_holds_the_mean(k, n):
    rng = np.random.default_rng(k * n)
    accs = [rng.integers(0, n + 1) / n for _ in range(k)]
    successes = round(np.mean(accs) * n)  # the seeds share their n test points: n trials
    ci = stats.binomtest(successes, n).proportion_ci(0.95, method="wilson")
    lo, hi = binomial_interval(successes, n)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert lo <= np.mean(accs) <= hi and 0 <= lo < hi <= 1


def test_records_carry_both_intervals_for_each_accuracy(tmp_path):
    seeded_store(tmp_path / "r.sqlite")
    recs = _records(tmp_path / "r.sqlite")
    assert len(recs) == 2 and all(r.seeds == [0, 1, 2] for r in recs)
    for r in recs:
        for k, per_seed in (("clean_acc", CLEAN), ("robust_acc", ROBUST),
                            ("robust_acc_worst", WORST)):
            vals = list(per_seed.values())
            t_lo, t_hi = stats.t.interval(0.95, 2, loc=np.mean(vals), scale=stats.sem(vals))
            assert r.seed_ci[k] == pytest.approx((t_lo, t_hi))
            assert r.spread[k] == pytest.approx(np.std(vals, ddof=1))  # sd kept
            b = stats.binomtest(round(np.mean(vals) * N), N).proportion_ci(0.95, method="wilson")
            assert r.binom_ci[k] == pytest.approx((b.low, b.high))
            assert b.low <= r.metrics[k] <= b.high
        assert r.seed_ci["clean_acc_int"] is None and r.binom_ci["clean_acc_int"] is None


def test_three_seed_report_shows_mean_half_width_and_binomial_interval(tmp_path):
    seeded_store(tmp_path / "r.sqlite")
    recs = _records(tmp_path / "r.sqlite")
    md = write_report(tmp_path / "r.sqlite", tmp_path / "report")["md"].read_text()

    def cell(per_seed):
        vals = list(per_seed.values())
        m = np.mean(vals)
        half = stats.t.ppf(0.975, 2) * np.std(vals, ddof=1) / math.sqrt(3)
        b = stats.binomtest(round(m * N), N).proportion_ci(0.95, method="wilson")
        return f"{m:.3f} ± {half:.3f} [{b.low:.3f}, {b.high:.3f}]"

    # the checks lowered robust accuracy: worst and, in parentheses, the attack alone, each
    # with its own intervals
    robust = f"{cell(WORST)} ({cell(ROBUST)})"
    assert f"| m | none | pgd (upper bound) | fp32 | {cell(CLEAN)} | – | {robust} |" in md
    assert "95% t-interval over seeds" in md and "Wilson" in md
    head, body = summary_table(recs)
    assert len(body) == 2 and all(row[-1] == robust for row in body)
    html = (tmp_path / "report" / "report.html").read_text()
    assert robust in html and "95% t-interval over seeds" in html


def test_one_seed_report_has_no_plus_minus(tmp_path):
    seeded_store(tmp_path / "r.sqlite", seeds=(0,))
    head, body = summary_table(_records(tmp_path / "r.sqlite"))
    b = stats.binomtest(round(ROBUST[0] * N), N).proportion_ci(0.95, method="wilson")
    assert "±" not in body[0][-1] and f"({ROBUST[0]:.3f} [{b.low:.3f}, {b.high:.3f}])" in body[0][-1]
