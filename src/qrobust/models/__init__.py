"""Model zoo. Every model takes images in [0, 1]; input normalization is its first layer.

``load_user_model("pkg.module:factory", weights=path)`` builds the user's own classifier
(which usually has no ``Normalize``: quantize it with ``input_mean`` / ``input_std``)."""

from qrobust.models.user import load_user_model
from qrobust.models.zoo import MODELS, ModelSpec, Normalize, build_model

__all__ = ["MODELS", "ModelSpec", "Normalize", "build_model", "load_user_model"]
