"""`qrobust verify` end to end on a tiny quantized MLP of the digits data."""

import json

import pytest

from qrobust.checkpoint import save_checkpoint
from qrobust.cli import main


def test_verify_prints_the_table_and_writes_per_query_json(digits_mlp_w4a4, tmp_path, capsys):
    import torch

    from qrobust.checkpoint import load_checkpoint
    from qrobust.data import load_dataset
    from qrobust.verify import predict
    from qrobust.verify.run import integer_program

    out = tmp_path / "res" / "results.json"
    args = ["-q", "verify", "--ckpt", str(digits_mlp_w4a4[1]), "--eps", "0", "--eps", "1",
            "--eps", "1/255", "--eps", "0.1", "--timeout", "2", "--limit", "8", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "eps codes" in text and "verified" in text and "median s" in text
    result = json.loads(out.read_text())
    assert result["limit"] == 8 and set(result["summary"]) == {"0", "1", "26"}  # 1/255 is 1
    n_correct = 8 - len(result["misclassified"])
    assert len(result["queries"]) == 3 * n_correct
    zero, one, big = (result["summary"][k] for k in ("0", "1", "26"))
    # eps 0: every correctly classified point is robust, so verified = clean accuracy
    assert zero["robust"] == n_correct and zero["verified_acc"] == zero["clean_acc"]
    assert one["robust"] == n_correct  # this model is robust at 1 code on these points
    assert big["robust"] + big["vulnerable"] + big["timeout"] == n_correct
    assert big["vulnerable"] > 0 and big["verified_acc"] < one["verified_acc"]
    twin, _ = load_checkpoint(digits_mlp_w4a4[1])
    program = integer_program(twin, (1, 8, 8))
    x, y = load_dataset("digits").test.tensors()
    for q in result["queries"]:
        assert set(q) == {"id", "eps", "verdict", "method", "seconds", "nodes", "counterexample"}
        assert q["id"] not in result["misclassified"]
        assert (q["counterexample"] is not None) == (q["verdict"] == "vulnerable")
        if q["counterexample"] is not None:  # in the ball, in range, misclassified
            cex = torch.tensor(q["counterexample"])
            image = torch.round(x[q["id"]] * 255).long()
            assert cex.shape == (1, 8, 8) and int((cex - image).abs().max()) <= q["eps"]
            assert int(cex.min()) >= 0 and int(cex.max()) <= 255
            assert int(predict(program, cex[None])[0]) != int(y[q["id"]])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(("args", "message"), [
    (["--eps", "-1"], "eps -1 is negative"),
    (["--eps", "256"], "eps 256 is beyond the input range"),
    (["--eps", "1.0"], "eps 1.0 is beyond the input range"),
    (["--eps", "1", "--eps", "0.4x"], "is not a number"),
    (["--eps", "1", "--timeout", "0"], "--timeout must be > 0"),
    (["--eps", "1", "--timeout", "-5"], "--timeout must be > 0"),
    (["--eps", "1", "--limit", "0"], "--limit must be > 0"),
    (["--eps", "1", "--workers", "0"], "--workers must be > 0"),
    (["--eps", "1", "--ties", "coin"], "unknown tie rule 'coin'"),
    (["--eps", "1", "--data", "no-such-set"], "unknown dataset"),
])
def test_bad_arguments_are_one_line_errors(digits_mlp_w4a4, tmp_path, capsys, args, message):
    out = tmp_path / "r.json"
    assert main(["verify", "--ckpt", str(digits_mlp_w4a4[1]), *args, "--out", str(out)]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_bad_checkpoints_are_one_line_errors(digits_mlp_w4a4, tmp_path, capsys):
    from qrobust.checkpoint import load_checkpoint
    from qrobust.data import load_dataset
    from qrobust.quant import quantize, save_quantized

    out = tmp_path / "r.json"
    fp, _ = digits_mlp_w4a4

    def verify(ckpt) -> str:
        assert main(["verify", "--ckpt", str(ckpt), "--eps", "1", "--out", str(out)]) == 2
        return one_line_error(capsys)

    assert "verify needs a quantized or imported checkpoint (an integer program); quantize " \
           "it with `qrobust quantize` first" in verify(fp)
    model, meta = load_checkpoint(fp)
    calib = load_dataset("digits").train.subset(slice(0, 32)).tensors()[0]
    save_quantized(tmp_path / "w4", quantize(model.eval(), "w4", calib), meta)  # float acts
    capsys.readouterr()  # the quantizer's log
    assert "does not lower to one: to_integer needs a twin with quantized activations" \
        in verify(tmp_path / "w4")
    assert "not found" in verify(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x80\x04\x95garbage")
    assert "not a safetensors checkpoint" in verify(tmp_path / "bad")
    save_checkpoint(tmp_path / "f2", model, meta)
    assert "quantize it with `qrobust quantize` first" in verify(tmp_path / "f2")
    assert not out.exists()


def test_data_of_another_shape_is_a_one_line_error(digits_mlp_w4a4, tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (4, 1, 6, 6), dtype=np.uint8),
              "y_train": np.arange(4) % 2, "x_test": rng.integers(0, 256, (4, 1, 6, 6),
                                                                   dtype=np.uint8),
              "y_test": np.arange(4) % 2}
    np.savez(tmp_path / "small.npz", **arrays)
    assert main(["verify", "--ckpt", str(digits_mlp_w4a4[1]), "--eps", "1",
                 "--data", str(tmp_path / "small.npz")]) == 2
    assert "has images of shape (1, 6, 6); the checkpoint takes (1, 8, 8)" \
        in one_line_error(capsys)
