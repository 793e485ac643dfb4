"""Attack detection from ensemble disagreement, and the adversarial information plane.

After Farkya, Raghavan, Ziskind (arXiv 2312.00105), who detect attacks from the members'
disagreement / mutual information and draw robustness profiles in an "adversarial
information plane" (AIP): mutual information against accuracy as the attack grows. Their
exact statistic is not published; ours:

    MI(x) = H(mean_k p_k(x)) - mean_k H(p_k(x))          (nats, in [0, log K])

the mutual information between the predicted label and the member index (the BALD /
Jensen-Shannon-divergence disagreement of the K member distributions p_k over classes),
plus the simpler vote disagreement 1 - (votes for the majority class) / K. Larger means
"more likely adversarial"; detection quality is the ROC AUC of the score between clean
(label 0) and adversarial (label 1) inputs, from scikit-learn's ``roc_auc_score``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from qrobust.errors import ConfigError


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim`` (0 log 0 = 0)."""
    return -(p * p.clamp_min(1e-30).log()).sum(dim)


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """(K, N, C) member probabilities -> (N,) MI between label and member, in [0, log K]."""
    return (entropy(probs.mean(0)) - entropy(probs).mean(0)).clamp_min(0)


def vote_disagreement(probs: torch.Tensor) -> torch.Tensor:
    """(K, N, C) -> (N,) 1 - (members voting for the majority class) / K, in [0, 1 - 1/K]."""
    votes = F.one_hot(probs.argmax(-1), probs.shape[-1]).sum(0)  # (N, C)
    return 1 - votes.max(-1).values.to(probs.dtype) / probs.shape[0]


SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mi": mutual_information, "disagreement": vote_disagreement}


@torch.no_grad()
def member_probs(ensemble: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(K, N, C) softmax outputs of an :class:`~qrobust.defenses.ensemble.SQEnsemble`'s members
    on ``x`` (N, C, H, W) in [0, 1]; one stochastic pass, eval mode."""
    ensemble.eval()
    parts = [ensemble.member_outputs(x[i:i + batch_size])[0].softmax(-1)
             for i in range(0, len(x), batch_size)]
    return torch.cat(parts, 1)


def detection_score(probs: torch.Tensor, score: str = "mi") -> torch.Tensor:
    """(K, N, C) -> (N,) detection score by name: ``mi`` or ``disagreement``."""
    if score not in SCORES:
        raise ConfigError(f"unknown detection score '{score}'; valid: {', '.join(sorted(SCORES))}")
    return SCORES[score](probs)


def detection_auc(clean_scores: torch.Tensor, adv_scores: torch.Tensor) -> float:
    """ROC AUC of separating adversarial (positive) from clean inputs by the score.

    0.5: no better than chance; 1.0: every adversarial score exceeds every clean one.
    """
    from sklearn.metrics import roc_auc_score

    if len(clean_scores) == 0 or len(adv_scores) == 0:
        raise ConfigError("detection AUC needs at least one clean and one adversarial score")
    scores = torch.cat([clean_scores.flatten(), adv_scores.flatten()]).double().cpu().numpy()
    labels = [0] * len(clean_scores.flatten()) + [1] * len(adv_scores.flatten())
    return float(roc_auc_score(labels, scores))


def plane_row(ensemble: torch.nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
              clean_scores: torch.Tensor | None, eps: float, score: str = "mi") -> dict:
    """One point of the information plane from ready adversarial inputs ``x_adv`` (N, C, H, W):
    accuracy of the mean ensemble, mean / median score, and the detection AUC against
    ``clean_scores`` (None or eps = 0: AUC reported as 0.5)."""
    probs = member_probs(ensemble, x_adv)
    s = detection_score(probs, score)
    acc = (probs.mean(0).argmax(-1) == y).double().mean().item()
    auc = detection_auc(clean_scores, s) if clean_scores is not None and eps != 0 else 0.5
    return {"eps": float(eps), "accuracy": acc, "score": score, "mean_score": s.mean().item(),
            "median_score": s.median().item(), "auc": auc}


def information_plane(ensemble: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      attack_at: Callable[[float], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
                      eps: Sequence[float], score: str = "mi") -> list[dict]:
    """The adversarial information plane: one :func:`plane_row` per eps (accuracy, mean and
    median detection score, detection AUC against the clean inputs).

    ``attack_at(eps)`` returns a callable ``(x, y) -> x_adv`` (eps = 0 uses the clean x).
    """
    clean = detection_score(member_probs(ensemble, x), score)
    return [plane_row(ensemble, x if e == 0 else attack_at(e)(x, y), y, clean, e, score)
            for e in eps]
