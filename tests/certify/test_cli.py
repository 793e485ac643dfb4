"""`qrobust certify`: results per image in the store, resumable, reproducible, loud errors."""

from __future__ import annotations

import json

import pytest

from qrobust.checkpoint import save_checkpoint
from qrobust.cli import main
from qrobust.eval.store import ResultStore
from qrobust.hardware import cpu_info
from qrobust.quant import resolve_reduce_range


@pytest.fixture(scope="module")
def ckpt(digits_cnn, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "digits-cnn"
    save_checkpoint(path, digits_cnn.model, digits_cnn.meta)
    return path


def _run(ckpt, out, *extra):
    return main(["-q", "certify", "--ckpt", str(ckpt), "--sigma", "0.25", "--n0", "10",
                 "--n", "60", "--alpha", "0.01", "--out", str(out), "--batch-size", "200",
                 *extra])


def test_certify_writes_one_row_per_image_and_resumes(ckpt, tmp_path, capsys):
    out = tmp_path / "cert"
    assert _run(ckpt, out, "--limit", "5") == 0
    assert "certified accuracy" in capsys.readouterr().out
    with ResultStore(out / "results.sqlite") as store:
        first = {r["config"]["index"]: r for r in store.rows("certify")}
    assert len(first) == 5
    summary = json.loads((out / "summary.json").read_text())
    m = [r["metrics"] for r in first.values()]
    assert summary["n_images"] == 5
    assert summary["certified_accuracy"]["0"] == sum(x["correct"] for x in m) / 5
    for x in m:
        assert x["n"] == 60 and (x["label"] is None) == (x["radius"] == 0.0)
        assert x["correct"] == (x["label"] == x["true_label"])
    # a larger run keeps the stored rows (not recomputed) and adds the new images
    assert _run(ckpt, out, "--limit", "8") == 0
    with ResultStore(out / "results.sqlite") as store:
        second = {r["config"]["index"]: r for r in store.rows("certify")}
    assert len(second) == 8 and set(first) <= set(second)
    assert all(second[i]["created"] == first[i]["created"] for i in first)
    # per-image seeding: a fresh store computing the same images gives the same certificates
    fresh = tmp_path / "fresh"
    assert _run(ckpt, fresh, "--limit", "8") == 0
    with ResultStore(fresh / "results.sqlite") as store:
        again = {r["config"]["index"]: r["metrics"] for r in store.rows("certify")}
    for i, row in second.items():
        a, b = dict(row["metrics"]), dict(again[i])
        a.pop("seconds"), b.pop("seconds")
        assert a == b


@pytest.mark.parametrize("integer_input", ["wide", "clipped"])
def test_certify_integer_only(ckpt, tmp_path, capsys, integer_input):
    out = tmp_path / "int"
    assert _run(ckpt, out, "--limit", "3", "--integer", "--noise", "rounded-gaussian",
                "--integer-input", integer_input) == 0
    assert "integer (rounded-gaussian)" in capsys.readouterr().out
    with ResultStore(out / "results.sqlite") as store:
        rows = store.rows("certify")
    assert len(rows) == 3
    # reduce-range auto: 7-bit weight codes where this CPU's int8 kernels would saturate
    recipe = resolve_reduce_range("w8a8", "auto").text
    assert all(r["config"]["integer"] and r["config"]["recipe"] == recipe
               and r["config"]["integer_input"] == integer_input for r in rows)
    holds_for = json.loads((out / "summary.json").read_text())["holds_for"]
    assert holds_for["backend"] == "onnx" and holds_for["recipe"] == recipe
    assert holds_for["cpu"] == cpu_info().to_dict() and holds_for["u8s8_exact"] in (True, False)


@pytest.mark.parametrize("args,message", [
    (["--alpha", "2"], "alpha"),
    (["--noise", "rounded-gaussian"], "--integer"),
    (["--integer", "--noise", "laplace"], "unknown integer noise"),
    (["--device", "gpu"], "not a torch device"),
    (["--integer", "--device", "cuda"], "--device applies to float smoothing"),
    (["--integer", "--integer-input", "huge"], "unknown integer input 'huge'"),
    (["--executor", "dask"], "unknown certification executor 'dask'"),
    (["--workers", "2"], "--address and --workers are for --executor ray"),
    (["--executor", "ray", "--workers", "0"], "--workers must be >= 1"),
])
def test_bad_arguments_give_one_line_errors(ckpt, tmp_path, capsys, args, message):
    assert _run(ckpt, tmp_path / "bad", "--limit", "1", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def test_first_certifies_the_first_images_in_order(ckpt, tmp_path):
    assert _run(ckpt, tmp_path / "first", "--limit", "3", "--first") == 0
    with ResultStore(tmp_path / "first" / "results.sqlite") as store:
        assert sorted(r["config"]["index"] for r in store.rows("certify")) == [0, 1, 2]
