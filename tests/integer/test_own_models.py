"""The user's own torch models (no qrobust Normalize, no zoo): a MobileNetV2-style network
(inverted residuals: 1x1 expand, 3x3 depthwise, ReLU6, 1x1 project, residual add; a
squeeze-excite gate x * hardsigmoid(...); a hard-swish head) and a VGG-style one (conv
stacks, average pooling, a channel concatenation, a grouped conv, Hardtanh / clamp, sigmoid),
quantized with ``input_mean`` / ``input_std`` and held to the twin <-> integer contract of
tests/integer/test_integer_reference.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import ConfigError
from qrobust.integer import to_integer
from qrobust.integer.agreement import contract
from qrobust.integer.program import (
    ClampOp,
    Codes,
    ConcatOp,
    GroupConvOp,
    LookupOp,
    MulOp,
    WindowSumPoolOp,
    lookup_table,
)
from qrobust.models import Normalize
from qrobust.quant import QuantAct, QuantSpec, quantize
from qrobust.quant.functional import round_half_up

CODE_MISMATCH_TOLERANCE = 1e-3  # as the zoo's contract tests
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.22, 0.2)  # pixel units, as transforms.Normalize


class SqueezeExcite(nn.Module):
    """MobileNetV3's gate (arXiv 1905.02244): x * hardsigmoid(excite(relu(squeeze(pool(x)))))."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.squeeze = nn.Conv2d(channels, reduced, 1)
        self.excite = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.hardsigmoid(self.excite(torch.relu(self.squeeze(self.pool(x)))))
        return x * gate  # an elementwise product, broadcast over H, W


class InvertedResidual(nn.Module):
    """MobileNetV2 block (arXiv 1801.04381): 1x1 expand, 3x3 depthwise, 1x1 linear project;
    optionally MobileNetV3's squeeze-excite gate after the depthwise conv."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, se: bool = False) -> None:
        super().__init__()
        hidden = c_in * expand
        self.expand = nn.Sequential(nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                    nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6())
        self.gate = SqueezeExcite(hidden, 8) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False),
                                     nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.gate(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetLike(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, 3), InvertedResidual(8, 12, 2, 4),
                                    InvertedResidual(12, 12, 1, 4), InvertedResidual(12, 16, 2, 4),
                                    InvertedResidual(16, 16, 1, 4, se=True))
        self.head = nn.Conv2d(16, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu6(self.stem(x)))  # a functional clamp
        x = F.hardswish(self.head(x))  # MobileNetV3's activation: a lookup table
        return self.fc(torch.flatten(self.pool(x), 1))


class VGGLike(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
        self.branch3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.branch1 = nn.Conv2d(16, 8, 1)  # no ReLU: the concatenation is signed
        self.grouped = nn.Conv2d(24, 32, 3, padding=1, groups=2)
        self.clip = nn.Hardtanh(-0.5, 3.0)
        self.pool = nn.AvgPool2d(2)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.smooth = nn.AvgPool2d(3, stride=1, padding=1)
        self.out_pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.cat([self.branch3(x), self.branch1(x)], dim=1)
        x = self.pool(self.clip(self.grouped(x)))
        x = torch.sigmoid(self.smooth(torch.clamp(self.conv(x), min=0.0)))
        return self.fc(self.out_pool(x).flatten(1))


def seeded(model: nn.Module, seed: int) -> nn.Module:
    """He-initialised weights and random BatchNorm statistics from one torch.Generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """Smooth random colour images in [0, 1], (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size),
                           mode="bilinear", align_corners=False)
    return (coarse + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def labels(x: torch.Tensor) -> torch.Tensor:
    """A learnable synthetic task: the argmax of 10 fixed random projections of the coarse
    (4 x 4) colour pattern of each image."""
    g = torch.Generator().manual_seed(7)
    proj = torch.randn(10, 3 * 4 * 4, generator=g)
    coarse = F.adaptive_avg_pool2d(x, 4).flatten(1)
    return (coarse - 0.5) @ proj.t()


def trained(arch: str, seed: int = 0, steps: int = 60) -> nn.Module:
    """A few Adam steps on the synthetic task (seconds on one core), so that predictions
    spread over the classes; inputs normalized with MEAN / STD outside the model."""
    if (arch, seed) in _TRAINED:
        return _TRAINED[arch, seed]
    model = seeded(MODELS[arch](), seed)
    x = images(1024, seed=10 + seed)
    y = labels(x).argmax(1)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    _TRAINED[arch, seed] = model.eval()
    return model.eval()


MODELS = {"mobilenet": MobileNetLike, "vgg": VGGLike}
_TRAINED: dict = {}
CALIB, TEST = images(256, seed=1), images(1000, seed=2)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4", "w8a8,aclip=8", "w4a4,asym"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_own_model_twin_and_integer_agree(arch, recipe):
    """Same codes up to 1 LSB (on <= 0.1% of each quantizer's codes), identical predictions
    on >= 99.9% of 1000 images (aclip=8: fixed ranges, so the ReLU6 / Hardtanh clamps bind;
    asym: signed codes with non-zero zero points feed the lookup tables and the adds)."""
    twin = quantize(trained(arch), recipe, CALIB, input_mean=MEAN, input_std=STD)
    integer = to_integer(twin)
    report = contract(twin, integer, TEST)
    assert report.codes, "no activation quantizers compared"
    for name, d in report.codes.items():
        assert d.max_abs <= 1, (name, d)
        assert d.mismatch_rate <= CODE_MISMATCH_TOLERANCE, (name, d)
    assert report.n == len(TEST) and report.prediction_agreement >= 0.999
    ops = integer.program((3, 16, 16)).ops
    assert any(isinstance(op, GroupConvOp) for op in ops)
    assert any(isinstance(op, LookupOp) for op in ops)
    if arch == "mobilenet":
        assert any(isinstance(op, MulOp) for op in ops)
    if arch == "vgg":
        assert any(isinstance(op, ConcatOp) for op in ops)
        assert any(isinstance(op, WindowSumPoolOp) for op in ops)
    if "aclip" in recipe:  # the ReLU6 (0, 6) / Hardtanh (-0.5, 3) bounds, not the code range
        clamps = [op for op in ops if isinstance(op, ClampOp)]
        assert any(op.hi < 255 for op in clamps)
        assert any(-127 < op.lo < 0 for op in clamps) == (arch == "vgg")


def test_input_mean_std_folds_like_normalize():
    """input_mean / input_std give the twin of Sequential(Normalize(mean, std), model)."""
    model = seeded(VGGLike(), seed=3)
    twin = quantize(model, "w4a4", CALIB, input_mean=MEAN, input_std=STD)
    reference = quantize(nn.Sequential(Normalize(MEAN, STD), model), "w4a4", CALIB)
    x = TEST[:64]
    assert torch.equal(twin(x), reference(x))
    assert torch.equal(to_integer(twin)(x), to_integer(reference)(x))


def test_single_value_mean_std_is_repeated_per_channel():
    model = seeded(MobileNetLike(), seed=4)
    a = quantize(model, "w8a8", CALIB, input_mean=0.5, input_std=0.25)
    b = quantize(model, "w8a8", CALIB, input_mean=(0.5,) * 3, input_std=(0.25,) * 3)
    assert torch.equal(a(TEST[:32]), b(TEST[:32]))


def test_missing_or_bad_normalization_is_a_clear_error():
    model = seeded(MobileNetLike(), seed=0)
    with pytest.raises(ConfigError, match="Normalize.*input_mean=.*input_std="):
        quantize(model, "w8a8", CALIB)
    with pytest.raises(ConfigError, match="both input_mean and input_std"):
        quantize(model, "w8a8", CALIB, input_mean=MEAN)
    with pytest.raises(ConfigError, match="input_mean has 2 values.*3 channels"):
        quantize(model, "w8a8", CALIB, input_mean=(0.5, 0.5), input_std=STD)
    with pytest.raises(ConfigError, match="input_std must be positive"):
        quantize(model, "w8a8", CALIB, input_mean=MEAN, input_std=(0.2, 0.0, 0.2))
    with pytest.raises(ConfigError, match="already has a Normalize"):
        quantize(nn.Sequential(Normalize(MEAN, STD), model), "w8a8", CALIB, input_mean=MEAN,
                 input_std=STD)


def small_relu6() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Flatten(),
                         nn.Linear(8 * 16 * 16, 10))


@pytest.mark.parametrize("build,recipe,op", [(MobileNetLike, "w8a8", "GroupConvOp"),
                                             (VGGLike, "w8a8", "WindowSumPoolOp"),
                                             (small_relu6, "w8a8,aclip=8", "ClampOp")])
def test_onnx_export_refuses_new_ops_by_name(build, recipe, op):
    """The ONNX int8 export (unchanged) cannot express these ops: it says which one."""
    pytest.importorskip("onnxruntime")
    twin = quantize(seeded(build(), seed=0), recipe, CALIB, input_mean=MEAN, input_std=STD)
    with pytest.raises(ConfigError, match=f"does not support {op}"):
        to_integer(twin, "onnx")


@pytest.mark.parametrize("groups", [1, 3])
def test_first_layer_folds_per_channel_std(groups):
    """The 1 / std_c fold reaches the right weights of a grouped (depthwise) first layer: the
    w8a8 twin stays close to the float model on normalized images."""
    mean, std = (0.3, 0.5, 0.7), (0.1, 0.3, 0.6)
    model = seeded(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=groups), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(6 * 16 * 16, 10)), seed=5)
    twin = quantize(model, "w8a8", CALIB, input_mean=mean, input_std=std)
    x = TEST[:128]
    want = model((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():  # measured: 0.013 std (a wrong channel's std: 0.71)
        assert (twin(x) - want).abs().mean() < 0.05 * want.std()
    assert torch.equal(to_integer(twin)(x), twin(x))


@pytest.mark.parametrize("fn", [nn.Hardswish(), nn.Hardsigmoid(), nn.Sigmoid(), nn.SiLU(), nn.Tanh()])
@pytest.mark.parametrize("out_bits", [4, 8])
def test_lookup_table_is_the_twins_arithmetic(fn, out_bits):
    """A table over input codes with a non-zero zero point equals what the twin computes:
    its input quantizer, the function and its output quantizer, code for code."""
    spec = QuantSpec(out_bits, signed=True, symmetric=False, granularity="tensor")
    quant_in, quant_out = QuantAct(QuantSpec(5, signed=True, symmetric=False,
                                             granularity="tensor")), QuantAct(spec)
    quant_in._set(torch.tensor(0.37), torch.tensor(3.0))
    quant_out._set(torch.tensor(0.11 * 16 / 2**out_bits), torch.tensor(-5.0))
    x = torch.linspace(-7.0, 7.0, 4001, dtype=torch.float64)  # every input code, many times
    x_hat = quant_in(x)
    y = quant_out(fn(x_hat))
    want = (round_half_up(y / quant_out.scale) + quant_out.zero_point).long()
    codes = Codes("x", float(quant_in.scale), 3, -16, 15)
    table = lookup_table(codes, fn, spec, float(quant_out.scale), -5)
    q_in = (round_half_up(x_hat / quant_in.scale) + 3).long()
    assert torch.equal(table[q_in + 16], want)


class Product(nn.Module):
    """hardswish(conv1(x)) * conv2(x): a product of two signed tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((F.hardswish(self.conv1(x)) * self.conv2(x)).flatten(1))


def test_product_of_codes_with_zero_points():
    """x * y with asymmetric (non-zero zero point) codes on both sides."""
    twin = quantize(seeded(Product(), seed=6), "w4a4,asym", CALIB, input_mean=MEAN, input_std=STD)
    integer = to_integer(twin)
    (mul,) = [op for op in integer.program((3, 16, 16)).ops if isinstance(op, MulOp)]
    assert any(mul.zero_points)  # measured: (-7, 0)
    report = contract(twin, integer, TEST)
    assert report.max_abs <= 1 and report.max_mismatch_rate <= CODE_MISMATCH_TOLERANCE
    assert report.prediction_agreement >= 0.999


class Viewed(nn.Module):
    """conv -> relu -> max-pool -> ``reshape`` -> linear, the reshape written as ``how``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv, self.pool, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv(x)))
        if self.how == "size":
            return self.fc(x.view(x.size(0), -1))
        if self.how == "shape":
            return self.fc(x.reshape(x.shape[0], -1))
        return self.fc(x.view(-1, 512))  # a fixed shape: not recognised as a flatten


@pytest.mark.parametrize("how", ["size", "shape"])
def test_flatten_written_as_view(how):
    twin = quantize(seeded(Viewed(how), seed=7), "w4a4", CALIB, input_mean=0, input_std=1)
    report = contract(twin, to_integer(twin), TEST[:200])
    assert report.max_abs <= 1 and report.prediction_agreement == 1.0


def test_layer_behind_an_unsupported_reshape_is_a_clear_error():
    with pytest.raises(ConfigError, match="layer 'fc' reads call_method 'view'.*no activation "
                                          "quantizer"):
        quantize(seeded(Viewed("fixed"), seed=7), "w4a4", CALIB, input_mean=0, input_std=1)
