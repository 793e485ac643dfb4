"""Certified robustness by randomized smoothing: float (Cohen et al., arXiv 1902.02918) and
integer-only (IntRS, arXiv 2108.09413) with an exact discrete-Gaussian sampler (arXiv 2004.00010).
"""

from qrobust.certify.build import holds_for, image_generator, noisy_classifier
from qrobust.certify.intrs import (
    IntegerNoise,
    integer_base,
    integer_noise,
    noise_window,
    pixel_codes,
    radius_eta,
)
from qrobust.certify.noise import (
    NoiseTable,
    discrete_gaussian_cks,
    gaussian,
    noise_table,
    rational_sigma2,
)
from qrobust.certify.smoothing import (
    Certificate,
    GaussianNoise,
    NoisyClassifier,
    Smoothed,
    certified_accuracy,
    curve,
)
from qrobust.certify.stats import (
    binomial_pvalue,
    clopper_pearson_lower,
    clopper_pearson_upper,
    discrete_radius,
    gaussian_radius,
)
from qrobust.certify.training import noise_aware_qat

__all__ = [
    "Certificate", "GaussianNoise", "IntegerNoise", "NoiseTable", "NoisyClassifier", "Smoothed",
    "binomial_pvalue", "certified_accuracy", "clopper_pearson_lower", "clopper_pearson_upper",
    "curve", "discrete_gaussian_cks", "discrete_radius", "gaussian", "gaussian_radius",
    "holds_for", "image_generator", "integer_base", "integer_noise", "noise_aware_qat",
    "noise_table", "noise_window", "noisy_classifier", "pixel_codes",
    "radius_eta", "rational_sigma2",
]
