"""Model zoo. Every model takes images in [0, 1]; input normalization is its first layer."""

from qrobust.models.zoo import MODELS, ModelSpec, Normalize, build_model

__all__ = ["MODELS", "ModelSpec", "Normalize", "build_model"]
