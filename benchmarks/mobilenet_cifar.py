"""A MobileNetV2-style CIFAR-10 classifier in plain torch (a "user's own model" for the import
benchmark), and the one command that trains it briefly.

The network (inverted residuals of Sandler et al., arXiv 1801.04381: 1x1 expand, 3x3
depthwise, ReLU6, 1x1 linear projection, residual add; a 1x1 head, global average pooling, a
linear classifier) takes *normalized* images ``(x - MEAN) / STD``, as deployed files do; the
normalization is the importer's ``--mean`` / ``--std``.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mobilenet_cifar.py --epochs 5
    # -> benchmarks/models/mbv2-cifar10/model.safetensors (+ meta.json: accuracy, command)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "models" / "mbv2-cifar10"


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.body = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def mobilenet_v2_cifar(classes: int = 10) -> nn.Module:
    """(N, 3, 32, 32) normalized images -> logits (N, classes)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        InvertedResidual(16, 16, 1, 2), InvertedResidual(16, 24, 2, 4),
        InvertedResidual(24, 24, 1, 4), InvertedResidual(24, 32, 2, 4),
        InvertedResidual(32, 32, 1, 4), InvertedResidual(32, 64, 2, 4),
        InvertedResidual(64, 64, 1, 4),
        nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes))


def main(argv: list[str] | None = None) -> int:
    from qrobust.data import load_dataset
    from qrobust.models import Normalize
    from qrobust.train import TrainConfig, accuracy, train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=None, help="first N training images")
    args = parser.parse_args(argv)
    data = load_dataset("cifar10")
    train_split = data.train if args.train_images is None else data.train.subset(slice(0, args.train_images))
    torch.manual_seed(args.seed)
    net = mobilenet_v2_cifar()
    model = nn.Sequential(Normalize(MEAN, STD), net)  # trains on [0, 1] images
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.1, weight_decay=4e-5,
                      crop_padding=4, flip=True, val_fraction=0.0, seed=args.seed)
    start = time.perf_counter()
    train(model, train_split, None, cfg)
    acc = accuracy(model, data.test)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, OUT / "model.safetensors")
    (OUT / "meta.json").write_text(json.dumps({
        "factory": "mobilenet_cifar:mobilenet_v2_cifar", "mean": MEAN, "std": STD,
        "test_accuracy_float": acc, "n_test": len(data.test), "epochs": args.epochs,
        "train_images": len(train_split),
        "train_seconds": round(time.perf_counter() - start, 1),
        "command": "OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mobilenet_cifar.py "
                   + " ".join(sys.argv[1:])}, indent=1))
    print(f"float test accuracy {acc:.4f} on {len(data.test)} images -> {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
