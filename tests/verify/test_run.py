"""The batch runner of verification queries: eps parsing, the process pool and its hard time
limit, the per-eps summary."""

import multiprocessing

import pytest
import torch

from qrobust.checkpoint import load_checkpoint
from qrobust.data import load_dataset
from qrobust.errors import ConfigError
from qrobust.integer.base import pixel_codes
from qrobust.verify import run as vrun
from qrobust.verify.run import Query, eps_codes, integer_program, run_queries, summarize


@pytest.mark.parametrize(("value", "codes"), [
    (0, 0), (2, 2), ("2", 2), (255, 255), ("255", 255), ("0.1", 26), (0.1, 26),
    ("8/255", 8), (2 / 255, 2), ("0", 0), ("0.0", 0), (0.5, 128), ("1/510", 1), ("0.001", 0),
])
def test_eps_codes(value, codes):
    assert eps_codes(value) == codes


@pytest.mark.parametrize(("value", "message"), [
    (-1, "negative"), ("-0.1", "negative"), (256, "beyond the input range"),
    ("1.0", "beyond the input range"), (1.5, "beyond the input range"),
    ("abc", "not a number"), (True, "must be a number"), ("nan", "not a number"),
])
def test_eps_codes_rejects(value, message):
    with pytest.raises(ConfigError, match=message):
        eps_codes(value)


@pytest.fixture(scope="module")
def program_and_points(digits_mlp_w4a4):
    import qrobust.quant  # noqa: F401  (registers the quantized checkpoint kind)

    twin, _ = load_checkpoint(digits_mlp_w4a4[1])
    program = integer_program(twin.eval(), (1, 8, 8))
    x, y = load_dataset("digits").test.subset(slice(0, 6)).tensors()  # 0: slow at eps 2
    return program, pixel_codes(x), y


def test_float_activations_do_not_lower(digits_mlp_w4a4):
    from qrobust.quant import quantize

    model, _ = load_checkpoint(digits_mlp_w4a4[0])
    calib = load_dataset("digits").train.subset(slice(0, 32)).tensors()[0]
    with pytest.raises(ConfigError, match="does not lower to one: .*quantized activations"):
        integer_program(quantize(model.eval(), "w4", calib), (1, 8, 8))


def test_pool_returns_the_verifiers_verdicts_in_order(program_and_points):
    from qrobust.verify import verify

    program, codes, y = program_and_points
    queries = [Query(i, codes[i], int(y[i]), eps) for eps in (0, 1) for i in range(3)]
    seen = []
    records = run_queries(program, queries, timeout=20, workers=2, progress=False,
                          sink=lambda q, r: seen.append((q.id, q.eps)))
    assert sorted(seen) == sorted((q.id, q.eps) for q in queries)
    for q, r in zip(queries, records, strict=True):
        direct = verify(program, q.image, q.label, q.eps, 20)
        assert (r["id"], r["eps"], r["verdict"], r["nodes"]) == (q.id, q.eps, direct.status,
                                                               direct.nodes)
        if r["verdict"] == "vulnerable":
            assert torch.equal(torch.tensor(r["counterexample"]), direct.counterexample)
    assert not multiprocessing.active_children()


def test_a_query_that_overruns_is_killed_and_times_out(program_and_points, monkeypatch):
    # the pool's limit at 1 s, far below the verifier's own 5 s: the first query (eps 2)
    # takes seconds, so the pool must kill its worker; the second one runs in a fresh pool
    monkeypatch.setattr(vrun, "grace", lambda timeout: 1.0 - timeout)
    program, codes, y = program_and_points
    queries = [Query(0, codes[0], int(y[0]), 2), Query(1, codes[1], int(y[1]), 0)]
    slow, fast = run_queries(program, queries, timeout=5, progress=False)
    assert slow["verdict"] == "timeout" and 1.0 <= slow["seconds"] < 5 and slow["nodes"] == 0
    assert fast["verdict"] == "robust"  # eps 0: decided at once
    assert not multiprocessing.active_children()


def test_bad_limits_fail_before_any_work(program_and_points):
    program, codes, y = program_and_points
    with pytest.raises(ConfigError, match="positive"):
        run_queries(program, [], timeout=0)
    with pytest.raises(ConfigError, match="workers"):
        run_queries(program, [], timeout=1, workers=0)


def test_summarize_counts_over_all_points():
    records = [{"verdict": v, "seconds": s} for v, s in
               [("robust", 1.0), ("robust", 3.0), ("vulnerable", 2.0), ("timeout", 9.0)]]
    s = summarize(records, n=5, correct=4)
    assert s == {"n": 5, "queries": 4, "clean_acc": 0.8, "verified_acc": 0.4, "robust": 2,
                 "vulnerable": 1, "timeout": 1, "median_seconds": 2.5, "max_seconds": 9.0}
    assert summarize([], n=3, correct=0)["median_seconds"] is None
