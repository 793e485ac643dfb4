"""Quantization-aware training: fine-tune the twin with the one training loop (STE gradients)."""

from __future__ import annotations

from qrobust.data import Dataset, train_val_split
from qrobust.quant.spec import Recipe, parse_recipe
from qrobust.train import TrainConfig, TrainResult, default_config, train

LSQ_LR = 0.01  # Esser et al. fine-tune from full precision with SGD at 0.01, cosine-decayed


def is_learned(recipe: str | Recipe) -> bool:
    """Whether any quantizer of ``recipe`` has a learned scale (LSQ)."""
    r = parse_recipe(recipe)
    specs = (r.weight, r.act, *(s for o in r.overrides for s in (o.weight, o.act)))
    return any(s is not None and s.learned for s in specs)


def qat_config(epochs: int = 1, lr: float | None = None, seed: int = 0,
               batch_size: int = 128, dataset: str = "", learned: bool = False) -> TrainConfig:
    """The fine-tune of a PTQ-initialised twin, no weight decay, cosine-decayed, with the
    dataset's training augmentation (crops and flips on CIFAR-10). Observer recipes: Adam at
    ``lr`` (default 1e-4), a gentle fine-tune (activation scales stay as calibrated).
    ``learned`` (LSQ recipes): SGD with momentum at ``lr`` (default 0.01), LSQ's recipe, whose
    gradient scaling is tuned for SGD steps."""
    augment = default_config("", dataset)
    return TrainConfig(epochs=epochs, batch_size=batch_size,
                       optimizer="sgd" if learned else "adam",
                       lr=lr if lr is not None else LSQ_LR if learned else 1e-4,
                       schedule="cosine", weight_decay=0.0, seed=seed,
                       crop_padding=augment.crop_padding, flip=augment.flip)


def finetune(twin, data: Dataset, cfg: TrainConfig, progress: bool | None = None) -> TrainResult:
    """QAT: train ``twin`` in place on ``data.train`` (10% held out, best epoch kept)."""
    tr, val = train_val_split(data.train, cfg.val_fraction, cfg.seed)
    result = train(twin, tr, val, cfg, progress=progress)
    twin.eval()
    return result
