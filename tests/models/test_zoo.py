import pytest
import torch
from torch import nn

from qrobust.models import MODELS, ModelSpec, Normalize, build_model

SHAPES = {"mlp": (1, 28, 28), "small-cnn": (1, 28, 28), "resnet20": (3, 32, 32)}


@pytest.mark.parametrize("arch", MODELS.names())
def test_every_model_maps_images_to_logits(arch):
    spec = ModelSpec(arch, SHAPES.get(arch, (1, 8, 8)), 10, dropout=0.1)
    model = build_model(spec).eval()
    x = torch.rand(2, *spec.input_shape)
    assert model(x).shape == (2, 10)
    assert isinstance(next(iter(model.children())), Normalize), "normalization is the first layer"
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    assert not any(isinstance(m, nn.Dropout) for m in build_model(ModelSpec(arch, spec.input_shape)).modules())


def test_mlp_is_the_gorsline_network():
    model = build_model(ModelSpec("mlp", (1, 28, 28)))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 100), (100, 10)]


def test_resnet20_depth_and_size():
    model = build_model(ModelSpec("resnet20", (3, 32, 32)))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # 19 3x3 convs + the final linear layer
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.30e6


def test_normalize_matches_formula():
    norm = Normalize([0.5, 0.25], [0.2, 0.4])
    x = torch.rand(3, 2, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.2, (x[:, 1] - 0.25) / 0.4], 1)
    torch.testing.assert_close(norm(x), expected)


def test_spec_round_trips_through_dict():
    spec = ModelSpec("small-cnn", (1, 8, 8), 10, 0.2, (0.3,), (0.2,), {"width": 16})
    assert ModelSpec.from_dict(spec.to_dict()) == spec
