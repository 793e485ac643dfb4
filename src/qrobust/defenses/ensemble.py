"""Ensembles of stochastic-quantizer networks trained for diversity (after arXiv 2312.00105).

Farkya, Raghavan, Ziskind train K SQ networks with cross-entropy plus a mutual-information
term that rewards *diverse* member representations. They publish neither the estimator nor
K; ours, stated:

- Members: K copies of an architecture (different seeds), every ReLU replaced by a stochastic
  ReLU6 quantizer (:func:`qrobust.defenses.sq.sq_model`).
- Objective (per batch): CE(ensemble) + member_ce * mean_k CE(member_k) + weight * D, where
  the ensemble's logits are log(mean_k softmax(logits_k)) and
  D = mean over member pairs (i < j) of CKA_rbf(Z_i, Z_j), Z_k the (N, D) penultimate
  features of member k (the input of its last linear layer) on the batch.
- The dependence estimator: CKA with Gaussian kernels = HSIC(K_i, K_j) / sqrt(HSIC(K_i, K_i)
  HSIC(K_j, K_j)), the biased HSIC estimator trace(K H L H) / (N - 1)^2 (Gretton et al. 2005)
  and the median-distance bandwidth. Why this and not a direct MI estimate: HSIC with a
  characteristic kernel is zero iff the representations are independent, so it is a proper
  dependence (MI) proxy; it needs no extra critic network (MINE, InfoNCE) and no
  N >> D covariance inverse (the Gaussian MI formula -1/2 log det(I - R^2) is unstable for
  128-dim features on 128-sample batches); the normalization makes it invariant to feature
  scale, so members cannot lower it by shrinking activations; it lies in [0, 1] and is cheap
  (N x N kernels). It is a proxy for MI, not an MI value in nats.
- Prediction: ``reduce="mean"`` (log of the mean member probability, differentiable) or
  ``"vote"`` (log of the vote fractions; not differentiable: ``surrogate()`` gives the mean
  ensemble for BPDA). Always ``randomized = True``: evaluate it with EOT.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.defenses.sq import sq_model
from qrobust.errors import ConfigError


def penultimate_layer(member: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``member``: its input is the member's representation."""
    linears = [m for m in member.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("ensemble members need a final nn.Linear layer (its input is the "
                          "representation used by the diversity term)")
    return linears[-1]


def logits_and_features(member: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C), penultimate features (N, D)) of one member, in one forward pass."""
    store: list[torch.Tensor] = []
    handle = penultimate_layer(member).register_forward_hook(
        lambda _m, inp, _out: store.append(inp[0]))
    try:
        logits = member(x)
    finally:
        handle.remove()
    return logits, store[-1].flatten(1)


def rbf_kernel(z: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
    """Gaussian kernel matrix exp(-||z_a - z_b||^2 / (2 sigma^2)) of (N, D) rows -> (N, N).

    ``bandwidth=None``: sigma^2 = (lower) median of the nonzero squared distances / 2, not
    differentiated (the median heuristic; invariant to rescaling z).
    """
    sq = (z * z).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)
    if bandwidth is None:
        off = d2.detach()[~torch.eye(len(z), dtype=torch.bool, device=z.device)]
        off = off[off > 0]
        sigma2 = off.median() / 2 if off.numel() else torch.ones((), dtype=z.dtype)
        sigma2 = sigma2.clamp_min(1e-12)
    else:
        sigma2 = torch.tensor(bandwidth**2, dtype=z.dtype, device=z.device)
    return torch.exp(-d2 / (2 * sigma2))


def hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Biased HSIC estimate trace(K H L H) / (N - 1)^2 of two (N, N) kernel matrices."""
    n = k.shape[0]
    kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()  # H K H
    return (kc * l).sum() / (n - 1) ** 2


def cka(k: torch.Tensor, l: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Centered kernel alignment HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), in [0, 1]."""
    return hsic(k, l) / (hsic(k, k) * hsic(l, l)).clamp_min(eps).sqrt()


def diversity_penalty(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean pairwise RBF-CKA between members' (N, D) features (0: independent, 1: identical)."""
    if len(features) < 2:
        raise ConfigError("the diversity term needs at least 2 ensemble members")
    kernels = [rbf_kernel(z) for z in features]
    return torch.stack([cka(a, b) for a, b in itertools.combinations(kernels, 2)]).mean()


class SQEnsemble(nn.Module):
    """K member networks; input (N, C, H, W) in [0, 1] -> (N, classes) log-probabilities.

    In training mode the last members' logits and features are kept in ``self.last`` for
    :class:`EnsembleLoss` (so the one training loop can train an ensemble unchanged).
    """

    randomized = True

    def __init__(self, members: Sequence[nn.Module], reduce: Literal["mean", "vote"] = "mean") -> None:
        super().__init__()
        if len(members) < 1:
            raise ConfigError("an ensemble needs at least one member")
        if reduce not in ("mean", "vote"):
            raise ConfigError(f"unknown ensemble reduce '{reduce}'; valid: mean, vote")
        self.members = nn.ModuleList(members)
        self.reduce = reduce
        self.last: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    @property
    def differentiable(self) -> bool:
        return self.reduce == "mean"

    def member_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Member logits (K, N, C) and features [(N, D)] * K, one stochastic pass each."""
        outs = [logits_and_features(m, x) for m in self.members]
        return torch.stack([o[0] for o in outs]), [o[1] for o in outs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, feats = self.member_outputs(x)
        self.last = (logits, feats) if self.training else None
        return combine(logits, self.reduce)

    def surrogate(self) -> SQEnsemble:
        """The mean ensemble over the same members (the BPDA surrogate of a voting ensemble)."""
        return SQEnsemble(list(self.members), "mean")


def combine(logits: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """(K, N, C) member logits -> (N, C) ensemble log-probabilities (mean) or log vote shares."""
    k = logits.shape[0]
    if reduce == "mean":
        return torch.logsumexp(F.log_softmax(logits, -1), 0) - math.log(k)
    votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0).to(logits.dtype) / k
    return votes.clamp_min(1e-12).log()


@dataclass(frozen=True)
class EnsembleLoss:
    """Loss term for ``train(ensemble, ..., extra_losses=[EnsembleLoss()])``.

    Adds ``member_ce`` * mean member CE + ``weight`` * diversity penalty to the loop's CE of
    the ensemble prediction. ``weight=0`` trains an independent-ish ensemble (a baseline).
    """

    weight: float = 0.1
    member_ce: float = 1.0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.member_ce < 0:
            raise ConfigError(f"EnsembleLoss weights must be >= 0, got {self.weight}, {self.member_ce}")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(model, SQEnsemble) or not model.training or model.last is None:
            raise ConfigError("EnsembleLoss needs an SQEnsemble in training mode")
        member_logits, feats = model.last
        ce = torch.stack([F.cross_entropy(z, y) for z in member_logits]).mean()
        loss = self.member_ce * ce
        if self.weight > 0 and len(feats) > 1:
            loss = loss + self.weight * diversity_penalty(feats)
        return loss


def build_sq_ensemble(build_member, k: int = 3, bits: int = 4, hi: float = 6.0, seed: int = 0,
                      reduce: Literal["mean", "vote"] = "mean") -> SQEnsemble:
    """K members ``sq_model(build_member(), bits, hi)``, member i initialised with seed + i.

    ``build_member``: a zero-argument callable returning a fresh float model (for example
    ``lambda: build_model(spec)``).
    """
    if k < 1:
        raise ConfigError(f"ensemble size k must be >= 1, got {k}")
    members = []
    for i in range(k):
        torch.manual_seed(seed + i)  # the member's weight init
        noise = torch.Generator().manual_seed(seed + i)  # and its own SQ noise stream
        members.append(sq_model(build_member(), bits=bits, hi=hi, generator=noise))
    return SQEnsemble(members, reduce)


def ensemble_from_meta(meta: dict) -> SQEnsemble:
    """The untrained skeleton of a saved ensemble (checkpoint kind ``sq-ensemble``)."""
    from qrobust.models import ModelSpec, build_model

    spec, e = ModelSpec.from_dict(meta["model"]), meta["ensemble"]
    return build_sq_ensemble(lambda: build_model(spec), e["k"], e["bits"], e["hi"], 0, e["reduce"])


def fit_sq_ensemble(arch: str, data, cfg, k: int = 3, bits: int = 4, hi: float = 6.0,
                    weight: float = 0.1, member_ce: float = 1.0,
                    reduce: Literal["mean", "vote"] = "mean", progress: bool | None = None,
                    model_kwargs: dict | None = None, init: nn.Module | None = None):
    """Train an SQ ensemble of ``k`` ``arch`` members on ``data`` with the one training loop.

    ``init``: a trained float model every member starts from (fine-tuning; the members then
    differ only through the stochastic quantizers and the diversity term), else fresh members
    with seeds ``cfg.seed + i``.

    Returns :class:`qrobust.train.Fitted`; its metadata has ``kind``-ready fields: save it with
    ``save_checkpoint(out, fitted.model, fitted.meta, kind="sq-ensemble")``.
    """
    from qrobust.models import build_model
    from qrobust.train import fit, model_spec

    spec = model_spec(arch, data, **(model_kwargs or {}))
    member = (lambda: copy.deepcopy(init)) if init is not None else (lambda: build_model(spec))
    ens = build_sq_ensemble(member, k, bits, hi, cfg.seed, reduce)
    fitted = fit(arch, data, cfg, extra_losses=[EnsembleLoss(weight, member_ce)],
                 progress=progress, model=ens)
    fitted.meta["model"] = spec.to_dict()
    fitted.meta["ensemble"] = {"k": k, "bits": bits, "hi": hi, "reduce": reduce,
                               "diversity_weight": weight, "member_ce": member_ce}
    return fitted


def _register_checkpoint_kind() -> None:
    from qrobust.checkpoint import BUILDERS

    if "sq-ensemble" not in BUILDERS:
        BUILDERS.register("sq-ensemble")(ensemble_from_meta)


_register_checkpoint_kind()
