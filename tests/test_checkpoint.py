import json
import pickle

import pytest
import torch

from qrobust.checkpoint import load_checkpoint, read_meta, save_checkpoint
from qrobust.errors import CheckpointError


def test_round_trip_is_exact(tmp_path, digits_cnn, digits):
    save_checkpoint(tmp_path / "ck", digits_cnn.model, digits_cnn.meta)
    model, meta = load_checkpoint(tmp_path / "ck")
    x, _ = digits.test.tensors()
    torch.testing.assert_close(model(x), digits_cnn.model.eval()(x), rtol=0, atol=0)
    assert meta["model"]["arch"] == "small-cnn" and meta["dataset"] == "digits"
    assert "torch" in meta["versions"] and meta["metrics"]["test_acc"] > 0.9
    assert json.loads((tmp_path / "ck" / "meta.json").read_text())["seed"] == 0
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["meta.json", "model.safetensors"]


def test_architecture_mismatch(tmp_path, digits_cnn):
    save_checkpoint(tmp_path / "ck", digits_cnn.model, digits_cnn.meta)
    with pytest.raises(CheckpointError, match="holds a 'small-cnn' model, expected 'resnet20'"):
        load_checkpoint(tmp_path / "ck", expect_arch="resnet20")
    lying = dict(digits_cnn.meta, model=dict(digits_cnn.meta["model"], arch="mlp"))
    save_checkpoint(tmp_path / "lie", digits_cnn.model, lying)
    with pytest.raises(CheckpointError, match="do not match a 'mlp' model"):
        load_checkpoint(tmp_path / "lie")


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickle_renamed_as_checkpoint_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.safetensors").write_bytes(pickle.dumps({"w": _Payload()}))
    torch.save({"w": torch.zeros(2)}, tmp_path / "ck" / "torch.pt")
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        read_meta(tmp_path / "ck" / "torch.pt")
    assert not (tmp_path / "PWNED").exists()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, digits_cnn):
    save_checkpoint(tmp_path / "ck", digits_cnn.model, digits_cnn.meta)
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    with pytest.raises(TypeError):  # not JSON-serialisable: fails before anything is replaced
        save_checkpoint(tmp_path / "ck", digits_cnn.model, {"bad": object()})
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert not list((tmp_path / "ck").glob("*.tmp"))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_meta(tmp_path / "nope")
