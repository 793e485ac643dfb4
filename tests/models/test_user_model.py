"""load_user_model: a user's factory by 'pkg.module:factory', weights from safetensors or a
state dict (never unpickled code), one-line errors."""

import textwrap

import pytest
import torch
from safetensors.torch import save_file

from qrobust.errors import CheckpointError, ConfigError
from qrobust.models import load_user_model

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, classes=10, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.fc = nn.Linear(width * 8 * 8, classes)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

        @classmethod
        def build(cls):
            return cls(classes=5)

    def make(classes=10):
        return Net(classes)

    not_callable = 3

    def not_a_module():
        return "model"
''')


@pytest.fixture()
def user_pkg(tmp_path, monkeypatch):
    (tmp_path / "mynets_user_model_test.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mynets_user_model_test"


def trained_state(pkg: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = load_user_model(f"{pkg}:make")
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def test_factory_and_weights_round_trip(user_pkg, tmp_path):
    state = trained_state(user_pkg)
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "lightning.ckpt")
    for name in ("w.safetensors", "w.pt", "lightning.ckpt"):
        model = load_user_model(f"{user_pkg}:make", weights=tmp_path / name)
        assert not model.training
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)
    assert load_user_model(f"{user_pkg}:Net", classes=3).fc.out_features == 3  # kwargs
    assert load_user_model(f"{user_pkg}:Net.build").fc.out_features == 5  # dotted attribute


@pytest.mark.parametrize("spec,match", [
    ("mynets_user_model_test", "must look like 'package.module:factory'"),
    ("mynets_user_model_test:make()", "must look like"),
    ("no_such_pkg_xyz.mod:make", "cannot import module 'no_such_pkg_xyz.mod'"),
    ("mynets_user_model_test:nope", "has no attribute 'nope'"),
    ("mynets_user_model_test:not_callable", "not a callable"),
    ("mynets_user_model_test:not_a_module", "returned a str, not an nn.Module"),
])
def test_bad_specs_are_one_line_config_errors(user_pkg, spec, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_user_model(spec)
    assert "\n" not in str(info.value)


def test_bad_weights_are_one_line_checkpoint_errors(user_pkg, tmp_path):
    spec = f"{user_pkg}:make"
    state = trained_state(user_pkg)
    with pytest.raises(CheckpointError, match="not found"):
        load_user_model(spec, weights=tmp_path / "missing.safetensors")
    torch.save(load_user_model(spec), tmp_path / "pickled.pt")  # the whole module: code
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    save_file({k: v for k, v in state.items() if k != "fc.bias"} | {"extra": torch.zeros(1)},
              str(tmp_path / "partial.safetensors"))
    save_file(trained_state(user_pkg) | {"fc.bias": torch.zeros(7)},
              str(tmp_path / "shape.safetensors"))
    cases = [("pickled.pt", "weights_only=True"), ("junk.safetensors", "not a readable"),
             ("partial.safetensors", "missing fc.bias; unexpected extra"),
             ("shape.safetensors", "shape mismatch for fc.bias")]
    for name, match in cases:
        with pytest.raises(CheckpointError, match=match) as info:
            load_user_model(spec, weights=tmp_path / name)
        assert "\n" not in str(info.value), name
    model = load_user_model(spec, weights=tmp_path / "partial.safetensors", strict=False)
    assert torch.equal(model.conv.weight, state["conv.weight"])
