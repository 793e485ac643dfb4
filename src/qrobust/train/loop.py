"""One training loop: SGD/Adam, LR schedule, seeded order, early stopping, extra loss terms.

Extra loss terms (the Defensive-Quantization regularizer, the ensemble diversity term, ...)
are callables ``term(model, x, y, logits) -> scalar`` added to the cross-entropy. Batch
transforms (crop, flip, Gaussian noise for smoothing) run on the float [0, 1] batch.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.data import Split, batches, gaussian_noise, random_crop, random_flip
from qrobust.errors import ConfigError
from qrobust.progress import bar as progress_bar

log = logging.getLogger(__name__)


class LossTerm(Protocol):
    """An extra term of the training objective, evaluated on every batch."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 logits: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    val_fraction: float = 0.1
    patience: int | None = None  # epochs without validation gain before stopping
    seed: int = 0
    crop_padding: int = 0
    flip: bool = False
    noise_sigma: float = 0.0  # Gaussian augmentation in [0, 1] pixel space (for smoothing)
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"epochs, batch_size and lr must be positive, got {self.epochs}, "
                              f"{self.batch_size}, {self.lr}")
        if not 0 <= self.val_fraction < 1 or self.noise_sigma < 0:
            raise ConfigError("val_fraction must be in [0, 1) and noise_sigma >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


def default_config(arch: str, dataset: str, **overrides) -> TrainConfig:
    """Recipes that reach good accuracy quickly on CPU for the built-in models and data."""
    base: dict = {}
    if arch == "mlp":  # Gorsline et al.: Adam 1e-3, batch 32, 10% held out for early stopping
        base = dict(optimizer="adam", lr=1e-3, batch_size=32, schedule="constant",
                    weight_decay=0.0, patience=3)
    elif arch == "resnet20":
        base = dict(lr=0.2, batch_size=128, epochs=30, weight_decay=5e-4)
    if dataset in ("cifar10",):
        base.update(crop_padding=4, flip=True)
    elif dataset in ("svhn",):
        base.update(crop_padding=2)
    if dataset == "digits":
        base.setdefault("batch_size", 64)
        base.update(epochs=overrides.get("epochs", 30))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**base)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_val_acc: float | None = None
    best_epoch: int | None = None
    seconds: float = 0.0


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                           weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    if cfg.schedule == "onecycle" and steps * 0.25 > 1:  # fewer steps: no warm-up phase fits
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps,
                                                   pct_start=0.25)
    if cfg.schedule in ("cosine", "onecycle"):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    x = random_crop(x, cfg.crop_padding, gen)
    if cfg.flip:
        x = random_flip(x, gen)
    if cfg.noise_sigma > 0:
        x = gaussian_noise(x, cfg.noise_sigma, gen)
    return x


def train(model: nn.Module, train_split: Split, val_split: Split | None, cfg: TrainConfig,
          extra_losses: Sequence[LossTerm] = (), progress: bool | None = None) -> TrainResult:
    """Train ``model`` in place; returns it with the best-validation weights restored.

    Images are float [0, 1] NCHW; the data order and augmentations come from a generator
    seeded with ``cfg.seed`` (seed weight init with ``torch.manual_seed`` before building).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    steps_per_epoch = -(-len(train_split) // cfg.batch_size)
    sched = _scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    result = TrainResult(model)
    best_state, stale, start = None, 0, time.perf_counter()
    # one bar over every batch of every epoch: its ETA is the whole training's
    bar = progress_bar(total=cfg.epochs * steps_per_epoch, unit="batch", progress=progress)
    for epoch in range(cfg.epochs):
        model.train()
        seen, correct, loss_sum = 0, 0, 0.0
        bar.set_description(f"train epoch {epoch + 1}/{cfg.epochs}")
        for x, y in batches(train_split, cfg.batch_size, shuffle=True, generator=gen):
            x = _augment(x, cfg, gen)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            for term in extra_losses:
                loss = loss + term(model, x, y, logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * len(y)
            bar.update()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            refresh=False)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        if val_split is not None and len(val_split):
            # a smoothing base model is kept for its accuracy under its noise, not on clean
            # images; the same seeded draws every epoch, so epochs compare on equal terms
            row["val_acc"] = accuracy(model, val_split, noise_sigma=cfg.noise_sigma,
                                      seed=cfg.seed + 1, progress=False)
            if result.best_val_acc is None or row["val_acc"] > result.best_val_acc:
                result.best_val_acc, result.best_epoch, stale = row["val_acc"], epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        result.history.append(row)
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})
        if cfg.patience is not None and stale >= cfg.patience:
            log.info("early stop: no validation gain for %d epochs", stale)
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = 512, noise_sigma: float = 0.0,
            seed: int = 0, progress: bool | None = None, desc: str = "evaluate") -> torch.Tensor:
    """Predicted labels (N,) of ``model`` in eval mode; with ``noise_sigma`` > 0, of the images
    plus N(0, sigma^2) noise drawn from a generator seeded with ``seed``."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    noisy = (lambda x: gaussian_noise(x, noise_sigma, gen)) if noise_sigma > 0 else (lambda x: x)
    parts = progress_bar(batches(split, batch_size), total=-(-len(split) // batch_size),
                         desc=desc, unit="batch", progress=progress)
    return torch.cat([model(noisy(x)).argmax(1) for x, _ in parts])


def accuracy(model: nn.Module, split: Split, batch_size: int = 512, noise_sigma: float = 0.0,
             seed: int = 0, progress: bool | None = None, desc: str = "evaluate") -> float:
    pred = predict(model, split, batch_size, noise_sigma, seed, progress, desc)
    return (pred == torch.from_numpy(split.y)).float().mean().item()
