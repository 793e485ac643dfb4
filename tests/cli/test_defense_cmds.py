"""`qrobust train-dq`, `train-ensemble`, `amplification`: end to end on digits (tiny runs)."""

from __future__ import annotations

import json

from qrobust.checkpoint import load_checkpoint
from qrobust.cli import main


def test_train_dq_ensemble_and_amplification(tmp_path, capsys):
    f, dq, ens = tmp_path / "f", tmp_path / "dq", tmp_path / "ens"
    assert main(["-q", "train", "--model", "mlp", "--data", "digits", "--epochs", "1",
                 "--out", str(f)]) == 0
    assert main(["-q", "train-dq", "--model", "mlp", "--data", "digits", "--epochs", "1",
                 "--init", str(f), "--wbits", "4", "--abits", "3", "--beta", "1e-3",
                 "--out", str(dq)]) == 0
    model, meta = load_checkpoint(dq)
    assert meta["kind"] == "quantized" and meta["quant"]["dq"]["abits"] == 3
    assert main(["-q", "train-ensemble", "--model", "mlp", "--data", "digits", "--epochs", "1",
                 "--k", "2", "--out", str(ens)]) == 0
    assert load_checkpoint(ens)[1]["ensemble"]["k"] == 2
    capsys.readouterr()
    assert main(["-q", "amplification", "--ckpt", str(f), "--ckpt", str(dq), "--limit", "32",
                 "--json", "--plot", str(tmp_path / "amp.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == [str(f), str(dq)] and len(result[str(f)]) == 3  # input + 2 linears
    assert (tmp_path / "amp.png").exists()


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["train-dq", "--data", "digits", "--abits", "9", "--out", str(tmp_path)]) == 2
    assert "bit widths" in capsys.readouterr().err
    assert main(["train-ensemble", "--data", "digits", "--reduce", "max",
                 "--out", str(tmp_path)]) == 2
    assert main(["amplification", "--ckpt", str(tmp_path / "nope")]) == 2
