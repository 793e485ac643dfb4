"""Randomized smoothing after Cohen, Rosenfeld and Kolter 2019 (arXiv 1902.02918).

The smoothed classifier g(x) = argmax_c P[f(x + e) = c] is estimated by Monte Carlo: noisy
copies of every image are classified in batches and counted with ``bincount``. The noise and
the base classifier come together as a :class:`NoisyClassifier` (float Gaussian here,
integer-only noise in :mod:`qrobust.certify.intrs`), which also maps a lower bound on the
top-class probability to a certified L2 radius in [0, 1] pixel units. One counting loop
serves PREDICT, CERTIFY and both noise kinds.

Float rounding (Voracek & Hein, ICLR 2023): in :class:`GaussianNoise` the noisy input
x + e is computed in float32, so the noise actually applied is not exactly N(0, sigma^2 I);
the certificate is the standard one and inherits that caveat. The integer path adds exact
integer noise to integer pixel codes, so no rounding happens between the noise and the
classifier; it is the sound one (docs/intrs_radius.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from qrobust.certify import stats
from qrobust.certify.law import Noise
from qrobust.errors import ConfigError
from qrobust.progress import bar as progress_bar

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Certificate:
    """The smoothed prediction at one image. ``label`` None means abstain (radius 0).

    ``radius``: certified L2 radius in [0, 1] pixel units; ``p_lower``: the (1 - alpha)
    lower confidence bound on P[f(x + noise) = label] from ``n`` noisy samples; ``count``:
    how many of them were ``label``.
    """

    label: int | None
    radius: float
    p_lower: float
    count: int
    n: int
    alpha: float

    def to_dict(self) -> dict:
        return asdict(self)


class NoisyClassifier(Protocol):
    """Base classifier + noise: labels of noisy copies, and the radius of a bound."""

    def labels(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """x float (m, C, H, W) in [0, 1] -> int64 (m,) labels of x + fresh noise."""
        ...

    def radius(self, p_lower: float, input_shape: tuple[int, ...]) -> float:
        """Certified L2 radius ([0, 1] pixel units) for top-class probability >= p_lower."""
        ...


@dataclass(frozen=True)
class GaussianNoise:
    """Float smoothing: ``base`` (images in [0, 1] -> logits) on x + N(0, sigma^2 I), the
    :class:`qrobust.certify.law.Noise` of kind ``gaussian``.

    ``clip``: smooth ``base(clip(x + noise, 0, 1))`` instead, the base classifier that integer
    smoothing certifies (pixel codes are clipped to [0, 255]); a fixed post-processing of the
    noisy input, so Cohen's radius holds unchanged. Off by default, as in Cohen et al.
    """

    base: nn.Module
    sigma: float
    clip: bool = False
    noise: Noise = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise", Noise("gaussian", self.sigma, self.clip))

    @torch.no_grad()
    def labels(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.base(self.noise.sample(x, generator)).argmax(1)

    def radius(self, p_lower: float, input_shape: tuple[int, ...]) -> float:
        return self.noise.radius(p_lower, input_shape)


class Smoothed:
    """Monte Carlo smoothed classifier: :meth:`predict` and :meth:`certify` over image batches.

    ``noisy``: a :class:`NoisyClassifier`; ``num_classes``: K; ``batch_size``: noisy images per
    forward pass (split over the images of a batch, so many images share one pass).
    """

    def __init__(self, noisy: NoisyClassifier, num_classes: int, batch_size: int = 1000,
                 progress: bool | None = None) -> None:
        if num_classes < 2 or batch_size < 1:
            raise ConfigError(f"need num_classes >= 2 and batch_size >= 1, got {num_classes}, "
                              f"{batch_size}")
        self.noisy, self.num_classes, self.batch_size = noisy, num_classes, batch_size
        self.progress = progress

    def counts(self, x: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """Class counts (B, K) int64 of ``n`` noisy copies of each image x (B, C, H, W)."""
        if n < 1:
            raise ConfigError(f"number of noise samples must be >= 1, got {n}")
        b, k = x.shape[0], self.num_classes
        counts = torch.zeros(b * k, dtype=torch.int64)
        per_image = max(1, self.batch_size // max(b, 1))
        image_chunk = max(1, min(b, self.batch_size))
        done = 0
        with progress_bar(total=n * b, desc="noise samples", progress=self.progress) as bar:
            while done < n:  # one loop over noise draws; images of a chunk share the pass
                reps = min(per_image, n - done)
                for start in range(0, b, image_chunk):
                    xs = x[start:start + image_chunk]
                    owner = torch.arange(start, start + len(xs)).repeat_interleave(reps)
                    labels = self.noisy.labels(xs.repeat_interleave(reps, 0), generator).cpu()
                    counts += torch.bincount(owner * k + labels, minlength=b * k)
                done += reps
                bar.update(reps * b)
        return counts.view(b, k)

    def predict(self, x: torch.Tensor, n: int, alpha: float,
                generator: torch.Generator | None) -> list[int | None]:
        """Cohen et al. PREDICT: the top class, or None (abstain) when the binomial test of the
        top two counts against 1/2 has p-value > alpha. P[wrong non-abstained] <= alpha."""
        counts = self.counts(x, n, generator).numpy()
        out: list[int | None] = []
        for row in counts:
            top2 = np.argsort(-row, kind="stable")[:2]
            na, nb = int(row[top2[0]]), int(row[top2[1]])
            keep = stats.binomial_pvalue(na, na + nb) <= alpha
            out.append(int(top2[0]) if keep else None)
        return out

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float,
                generator: torch.Generator | None) -> list[Certificate]:
        """Cohen et al. CERTIFY for each image of x (B, C, H, W) in [0, 1].

        n0 samples select the class, n fresh samples bound its probability (one-sided
        Clopper-Pearson at 1 - alpha); abstain when the radius is 0. With probability >=
        1 - alpha per image, a returned label is g's prediction on the whole L2 ball.
        """
        stats.clopper_pearson_lower(0, 1, alpha)  # validates alpha
        guess = self.counts(x, n0, generator).argmax(1)
        counts = self.counts(x, n, generator)
        top = counts.gather(1, guess[:, None]).flatten().numpy()
        p_lower = np.atleast_1d(stats.clopper_pearson_lower(top, np.full_like(top, n), alpha))
        shape = tuple(x.shape[1:])
        certs = []
        for c, k, p in zip(guess.tolist(), top.tolist(), p_lower.tolist(), strict=True):
            r = self.noisy.radius(p, shape)
            certs.append(Certificate(c if r > 0 else None, r, p, k, n, alpha))
        return certs


def certified_accuracy(certs: Sequence[Certificate], labels: Sequence[int] | torch.Tensor,
                       radii: Sequence[float] = DEFAULT_RADII) -> dict[float, float]:
    """Fraction of images certified correct at each radius r (label right and radius >= r;
    at r = 0: right and not abstained), as in Cohen et al.'s tables."""
    y = [int(v) for v in labels]
    if len(y) != len(certs) or not certs:
        raise ConfigError(f"need one label per certificate, got {len(y)} labels, {len(certs)} "
                          "certificates")
    return {float(r): sum(c.label == t and c.radius >= r for c, t in zip(certs, y, strict=True))
            / len(certs) for r in radii}


def curve(certs: Sequence[Certificate], labels: Sequence[int] | torch.Tensor,
          steps: int = 101, max_radius: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Certified accuracy vs radius on an even grid: (radii, accuracy), both (steps,)."""
    top = max_radius if max_radius is not None else max([c.radius for c in certs] + [1e-3])
    radii = np.linspace(0.0, top, steps)
    acc = certified_accuracy(certs, labels, radii.tolist())
    return radii, np.array([acc[float(r)] for r in radii])

