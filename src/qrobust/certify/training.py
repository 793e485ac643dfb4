"""Training base classifiers for smoothing: noise-aware quantization-aware training.

Gaussian augmentation is ``TrainConfig(noise_sigma=...)`` in :func:`qrobust.train.train`
(Cohen et al., arXiv 1902.02918). :func:`noise_aware_qat` fine-tunes a quantized twin
(:func:`qrobust.quant.quantize`, STE gradients) with the noise its smoothed classifier will
see: float Gaussian noise for float smoothing, or, for integer-only smoothing, integer noise on
the pixel-code grid, (round(255 x) + Z) / 255 with Z from the same law the certifier samples;
the twin's input quantizer clips it to its window, as the integer model will ([0, 1], or the
wider one of ``widen_input(twin, *noise_window(sigma))``, the default of integer smoothing).
It runs the one training loop, :func:`qrobust.train.train`, on ``Sequential(noise, twin)``;
validation is under noise as well.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from qrobust.certify.law import PIXEL_LEVELS, Noise, tail_bound
from qrobust.certify.noise import rational_sigma2
from qrobust.data import Split
from qrobust.train import TrainConfig, TrainResult, train


class SmoothingNoise(nn.Module):
    """x -> x + noise, in training *and* evaluation (so the loop's validation accuracy, which
    picks the weights it keeps, is accuracy under the smoothing noise).

    ``kind`` ``gaussian``: x + N(0, sigma^2) (float smoothing, no clipping, as Cohen et al.);
    an integer kind (``discrete-gaussian``, ``rounded-gaussian``): (round(255 x) + Z) / 255,
    unclipped (the twin clips to its input window), Z from a table over +-20 sigma codes.
    """

    def __init__(self, sigma: float, kind: str, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator
        # unclipped (the twin clips to its input window), integer noise over +-20 sigma codes
        bound = None if kind == "gaussian" else max(PIXEL_LEVELS, tail_bound(
            rational_sigma2(sigma, PIXEL_LEVELS)))
        self.noise = Noise(kind, sigma, clip=False, bound=bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = self.noise.sample(x, self.generator)
        return noisy.to(x.dtype) / PIXEL_LEVELS if self.noise.integer else noisy


def noise_aware_qat(twin: nn.Module, train_split: Split, val_split: Split | None, sigma: float,
                    cfg: TrainConfig | None = None, noise: str = "gaussian",
                    progress: bool | None = None) -> TrainResult:
    """Fine-tune ``twin`` in place under smoothing noise; returns the loop's TrainResult.

    ``sigma`` in [0, 1] pixel units; ``noise``: ``gaussian`` (float smoothing) or an integer
    kind (``discrete-gaussian``, ``rounded-gaussian``) for integer-only smoothing. The twin
    runs behind a :class:`SmoothingNoise` layer, so validation (and the loop's choice of the
    best epoch) is under noise too. ``cfg`` defaults to a short Adam fine-tune (3 epochs,
    lr 1e-4, constant schedule); its ``noise_sigma`` is ignored. The noise generator is seeded
    with ``cfg.seed``. The twin is left in eval mode.
    """
    cfg = cfg or TrainConfig(epochs=3, optimizer="adam", lr=1e-4, schedule="constant",
                             weight_decay=0.0)
    layer = SmoothingNoise(sigma, noise, torch.Generator().manual_seed(cfg.seed))
    result = train(nn.Sequential(layer, twin), train_split, val_split,
                   replace(cfg, noise_sigma=0.0), progress=progress)
    result.model = twin
    twin.eval()
    return result
