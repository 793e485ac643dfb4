"""Defensive Quantization (Lin, Gan, Han, ICLR 2019, arXiv 1904.08444).

DQ trains a quantized network with an orthogonality ("Lipschitz") regularizer so that every
layer stays close to non-expansive and small input perturbations are not amplified layer by
layer across quantization buckets:

    loss = CE + beta/2 * sum_l ||W_l^T W_l - I||_F^2

over the weights of every linear layer and every conv layer, the kernel reshaped to a
matrix W_l of shape (C_out, C_in*k*k).

Which Gram matrix (our design decision, not stated in the paper). For W of shape (m, n)
with singular values s_1..s_r (r = min(m, n)),

    ||W W^T - I_m||_F^2 = sum_i (s_i^2 - 1)^2 + (m - r)
    ||W^T W - I_n||_F^2 = sum_i (s_i^2 - 1)^2 + (n - r)

so both Grams give *the same gradient* and differ only by the constant |m - n|. We use the
smaller Gram (W W^T when C_out <= C_in*k*k, the usual case for conv layers): it is cheaper
(r x r instead of max(m, n)^2) and its value is exactly zero when the layer is a
(semi-)orthogonal map, i.e. when all singular values are 1 (spectral norm 1 = Lipschitz
constant 1 of the linear part), so the logged penalty is interpretable.

DQ models: :func:`dq_model` swaps every ReLU of a float model for a ReLU6-clipped unsigned
activation quantizer (``abits`` in 1..8; the paper uses 1-5) and quantizes linear and conv
weights symmetrically per output channel (``wbits``), both with straight-through
gradients; train it with ``train(model, tr, val, cfg, extra_losses=[LipschitzRegularizer(beta)])``
(``beta=0``: the "vanilla quantized" QAT baseline with the same quantizers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from qrobust.errors import ConfigError


def gram_deviation(weight: torch.Tensor) -> torch.Tensor:
    """||G - I||_F^2 with G the smaller Gram matrix of ``weight`` reshaped to (C_out, -1).

    ``weight``: a linear (C_out, C_in) or conv (C_out, C_in, k, k) weight, any float dtype.
    Returns a scalar >= 0 that is zero iff all singular values of the reshaped weight are 1.
    """
    w = weight.reshape(weight.shape[0], -1)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).sum()


def lipschitz_penalty(weights: Iterable[torch.Tensor], beta: float) -> torch.Tensor:
    """beta/2 * sum_l ||W_l^T W_l - I||_F^2 (smaller Gram, see the module docstring)."""
    terms = [gram_deviation(w) for w in weights]
    if not terms:
        raise ConfigError("the Lipschitz regularizer found no linear or conv weights in the model")
    return 0.5 * beta * torch.stack(terms).sum()


def regularized_weights(model: nn.Module) -> list[torch.Tensor]:
    """The float (latent) weights of every linear and conv layer, in module order.

    A weight is any ``weight`` parameter with 2+ dims (so BatchNorm is skipped). For layers
    whose weight is quantized through a parametrization (:func:`dq_model`), the latent float
    weight is returned: the regularizer acts on the weights the optimizer updates.
    """
    out = []
    for module in model.modules():
        param = getattr(module, "parametrizations", None)
        if param is not None and "weight" in param:
            out.append(param["weight"].original)
            continue
        w = module._parameters.get("weight")
        if w is not None and w.ndim >= 2 and w.requires_grad:
            out.append(w)
    return out


@dataclass(frozen=True)
class LipschitzRegularizer:
    """The DQ loss term for :func:`qrobust.train.train` (``extra_losses=[LipschitzRegularizer()]``).

    beta: regularization strength; 3e-4 to 6e-4 in reimplementations of arXiv 1904.08444.
    """

    beta: float = 3e-4

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 logits: torch.Tensor) -> torch.Tensor:
        return lipschitz_penalty(regularized_weights(model), self.beta)


def dq_recipe(wbits: int = 4, abits: int = 4, lsq: bool = False) -> str:
    """The quantization recipe of a DQ model: ``w{wbits}a{abits},relu6`` (activations clipped
    to [0, 6] with a fixed scale 6 / (2^abits - 1), per-channel symmetric weights); ``lsq``:
    every scale learned from that start (``...,relu6,lsq``)."""
    if not 1 <= abits <= 8 or not 1 <= wbits <= 8:
        raise ConfigError(f"DQ bit widths must be in 1..8 (the paper uses 1-5 for activations), "
                          f"got w{wbits}a{abits}")
    return f"w{wbits}a{abits},relu6" + (",lsq" if lsq else "")


def dq_model(model: nn.Module, wbits: int = 4, abits: int = 4,
             calib: torch.Tensor | None = None) -> nn.Module:
    """The QAT twin of a float ``model`` for Defensive Quantization.

    Built with :func:`qrobust.quant.quantize` and recipe :func:`dq_recipe`: ReLU6-clipped
    unsigned activation quantizers, per-channel weight fake-quant, STE gradients; the float
    (latent) weights are trainable, so ``train(twin, ..., extra_losses=[LipschitzRegularizer(beta)])``
    is DQ and ``beta = 0`` (no term) is the vanilla-QAT baseline with the same quantizers.
    ``calib``: images (N, C, H, W) in [0, 1] for the quantizers that are not clipped.
    """
    from qrobust.quant import quantize

    return quantize(model, dq_recipe(wbits, abits), calib)


def fit_dq(arch: str, data, cfg, wbits: int = 4, abits: int = 4, beta: float = 3e-4,
           init: nn.Module | None = None, progress: bool | None = None,
           arch_params: dict | None = None, lsq: bool = False):
    """Train a DQ model of ``arch`` on ``data`` (a :class:`qrobust.data.Dataset`) with the one
    training loop; ``init``: a trained float model to fine-tune from (else a fresh one) of
    ``arch`` with ``arch_params`` (as :func:`qrobust.train.fit`). ``lsq``: learned
    quantizer scales (:func:`dq_recipe`).

    Returns :class:`qrobust.train.Fitted` whose model is the quantized twin and whose metadata
    adds ``quant = {"recipe": ..., "dq": {"wbits", "abits", "beta"}}``: save it as the
    quantization module's checkpoint kind, ``save_checkpoint(out, model, meta, kind="quantized")``.
    """
    terms = [LipschitzRegularizer(beta)] if beta > 0 else []
    fitted = fit_twin(arch, data, cfg, dq_recipe(wbits, abits, lsq), terms, init, progress,
                      arch_params)
    fitted.meta["quant"]["dq"] = {"wbits": wbits, "abits": abits, "beta": beta, "lsq": lsq}
    return fitted


def fit_twin(arch: str, data, cfg, recipe: str, extra_losses=(), init: nn.Module | None = None,
             progress: bool | None = None, arch_params: dict | None = None):
    """Quantization-aware training with the one training loop: the float model ``init`` (else
    a fresh ``arch`` seeded with ``cfg.seed``) quantized with ``recipe``, calibrated on the
    first 512 training images, trained with ``extra_losses``. Returns
    :class:`qrobust.train.Fitted` with ``meta["quant"] = {"recipe": ...}`` (the shared path
    of DQ and certified training)."""
    from qrobust.models import build_model
    from qrobust.quant import quantize
    from qrobust.train import fit, model_spec

    torch.manual_seed(cfg.seed)
    float_model = (init if init is not None
                   else build_model(model_spec(arch, data, **(arch_params or {}))))
    calib, _ = data.train.subset(slice(0, 512)).tensors()
    twin = quantize(float_model, recipe, calib)
    fitted = fit(arch, data, cfg, extra_losses=list(extra_losses), progress=progress,
                 model=twin, arch_params=arch_params)
    fitted.meta["quant"] = {"recipe": twin.recipe.to_dict()}
    return fitted

