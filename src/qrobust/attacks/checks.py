"""Gradient-masking checks: pure functions that return warning strings stored with results.

AutoAttack-style sanity checks (Croce & Hein, arXiv 2003.01690; Athalye et al., arXiv
1802.00420; Carlini et al., arXiv 1902.06705), made quantization-aware after Gupta & Ajanthan
(arXiv 2003.13511): quantized and binarized nets often have zero or saturated gradients that
fake robustness. The thresholds are ours (documented defaults), not from the papers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ZERO_GRAD_THRESHOLD = 0.05  # fraction of gradient evaluations with an exactly zero gradient
BLACKBOX_THRESHOLD = 0.03  # fraction of white-box-robust points that a black-box attack breaks
EPS_TOLERANCE = 0.01  # allowed accuracy increase between consecutive eps
TEMPERATURE_THRESHOLD = 0.02  # robust accuracy drop from temperature scaling


def vanishing_gradients(zero_fraction: float | None, small_fraction: float | None,
                        threshold: float = ZERO_GRAD_THRESHOLD) -> list[str]:
    """Warn when many gradient evaluations were exactly zero (or below 1e-8 in l2 norm)."""
    out = []
    if zero_fraction is not None and zero_fraction > threshold:
        out.append(f"gradient masking: {zero_fraction:.1%} of gradient evaluations were exactly "
                   "zero (saturated softmax, sign/step activations or quantizers without STE); "
                   "try a temperature-scaled attack, BPDA or the black-box square attack")
    elif small_fraction is not None and small_fraction > threshold:
        out.append(f"gradient masking: {small_fraction:.1%} of gradient evaluations had norm "
                   "< 1e-8 (vanishing gradients); try a temperature-scaled attack")
    return out


def blackbox_beats_whitebox(broken_by_blackbox: int, robust_to_whitebox: int,
                            threshold: float = BLACKBOX_THRESHOLD) -> list[str]:
    """Warn when a score-based attack breaks points that the gradient attack left robust."""
    if robust_to_whitebox == 0:
        return []
    frac = broken_by_blackbox / robust_to_whitebox
    if frac > threshold:
        return [f"black-box beats white-box: the square attack broke {broken_by_blackbox} of "
                f"{robust_to_whitebox} points ({frac:.1%}) that the gradient attack left robust; "
                "gradients are masked or the attack is too weak"]
    return []


def accuracy_rises_with_eps(eps: Sequence[float], accuracy: Sequence[float],
                            tolerance: float = EPS_TOLERANCE) -> list[str]:
    """Warn when robust accuracy increases with the perturbation budget."""
    pairs = sorted(zip(eps, accuracy, strict=True))
    out = []
    for (e0, a0), (e1, a1) in zip(pairs, pairs[1:], strict=False):
        if a1 > a0 + tolerance:
            out.append(f"accuracy rises with eps: {a0:.4f} at eps={e0:g} but {a1:.4f} at "
                       f"eps={e1:g}; a stronger budget must not help the model (masked "
                       "gradients or too few steps)")
    return out


@torch.no_grad()
def output_is_random(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> bool:
    """Two forward passes on the same inputs give different logits."""
    return not torch.equal(model(x), model(x))


def randomness_under_deterministic_attack(model_is_random: bool, estimator_name: str) -> list[str]:
    """Warn when a randomized model is attacked with a deterministic gradient (no EOT)."""
    if model_is_random and not estimator_name.startswith("eot"):
        return ["randomness under a deterministic attack: the model's outputs change between "
                f"identical calls but the attack used '{estimator_name}' gradients; mark the "
                "defense randomized=True or pass estimator=EOT(n)"]
    return []


def temperature_much_stronger(plain_robust_acc: float, temperature_robust_acc: float,
                              threshold: float = TEMPERATURE_THRESHOLD) -> list[str]:
    """Warn when scaling the logits (decision boundary unchanged) makes the attack stronger."""
    drop = plain_robust_acc - temperature_robust_acc
    if drop > threshold:
        return [f"temperature-scaled attack much stronger: robust accuracy {plain_robust_acc:.4f} "
                f"-> {temperature_robust_acc:.4f} with logit temperature; the plain attack saw "
                "saturated/vanishing gradients (Gupta & Ajanthan, arXiv 2003.13511)"]
    return []


def outside_threat_model(mean_norm: float | None, norm: str, eps: float) -> list[str]:
    """The successful adversarial examples' mean perturbation exceeds eps (beyond float
    rounding): the attack left its threat model and its robust accuracy means nothing."""
    if mean_norm is None or mean_norm <= eps * (1 + 1e-5) + 1e-6:
        return []
    return [f"mean {norm} perturbation {mean_norm:.4g} exceeds eps {eps:.4g}: the attack left "
            "the threat model"]
