"""The one construction of a noisy classifier from a loaded checkpoint, shared by
`qrobust certify`, the certification benchmark and the API, so that they cannot differ."""

from __future__ import annotations

import torch
from torch import nn

from qrobust.certify.intrs import IntegerNoise, integer_noise
from qrobust.certify.smoothing import GaussianNoise, NoisyClassifier
from qrobust.errors import ConfigError
from qrobust.quant import quantize, resolve_reduce_range

INTEGER_INPUTS = ("wide", "clipped")


def noisy_classifier(model: nn.Module, *, sigma: float, integer: bool = False,
                     noise: str = "gaussian", quantized: bool = False, recipe: str = "w8a8",
                     reduce_range: str = "auto", calib: torch.Tensor | None = None,
                     backend: str = "onnx", integer_input: str = "wide",
                     imported: bool = False, **options) -> NoisyClassifier:
    """Float Gaussian smoothing of ``model``, or (``integer``) integer-only smoothing of its
    IntegerModel on ``backend``.

    ``quantized``: ``model`` is already a twin (a quantized checkpoint); else it is quantized
    with ``recipe`` calibrated on ``calib`` (float images in [0, 1]), with ``reduce-range``
    resolved by ``reduce_range`` ('auto': 7-bit weights where this CPU's int8 kernels would
    saturate, so the ONNX Runtime / OpenVINO model stays exact and fast). ``integer_input``:
    'wide' (the model sees the unclipped noisy image, as float smoothing does) or 'clipped'
    (codes clipped to [0, 255]). ``noise``: 'gaussian' (float; with ``integer``, the rounded
    Gaussian), 'rounded-gaussian' or 'discrete-gaussian'. ``options`` go to the backend
    (``input_shape``, ``threads``).

    ``imported``: ``model`` is the twin of an imported file (``qrobust import``); integer
    smoothing runs its program on the exact reference executor (``backend`` does not apply),
    with codes clipped to [0, 255]: the file's own input quantizer cannot be widened.
    """
    if not integer:
        if noise != "gaussian":
            raise ConfigError(f"noise {noise!r} is integer noise (--integer, integer=True); "
                              "float smoothing uses gaussian")
        return GaussianNoise(model, sigma)
    if integer_input not in INTEGER_INPUTS:
        raise ConfigError(f"unknown integer input {integer_input!r} (--integer-input); valid: "
                          f"{', '.join(INTEGER_INPUTS)}")
    kind = "rounded-gaussian" if noise == "gaussian" else noise  # eta ~ 0: Cohen's radius
    if imported:
        from qrobust.integer.imports import integer_model

        if integer_input == "wide":
            raise ConfigError("integer smoothing of an imported program clips the noisy codes "
                              "to [0, 255] (the file's own input quantizer cannot be widened): "
                              "use --integer-input clipped")
        return IntegerNoise(integer_model(model), sigma, kind=kind, clip=True)
    if quantized:
        twin = model
    else:
        if calib is None:
            raise ConfigError("integer smoothing of a float model needs calibration images")
        twin = quantize(model, resolve_reduce_range(recipe, reduce_range), calib=calib)
    return integer_noise(twin, sigma, kind, wide=integer_input == "wide", backend=backend,
                         **options)


def image_generator(seed: int, index: int, device: str = "cpu") -> torch.Generator:
    """The noise generator of one test image: the same whichever other images run with it."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(index))


def holds_for(noisy: NoisyClassifier) -> dict:
    """What a certificate of ``noisy`` holds for: the noise and, for integer smoothing, the
    deployed model (backend, recipe, runtime, CPU and whether its int8 kernels are exact)."""
    if isinstance(noisy, IntegerNoise):
        deployment = getattr(noisy.base, "deployment", lambda: {})()
        return {"noise": noisy.kind, "sigma": noisy.sigma, "clip": noisy.clip, **deployment}
    return {"noise": "gaussian", "sigma": getattr(noisy, "sigma", None)}
