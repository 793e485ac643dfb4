"""Int8 model files made by other toolchains, imported as qrobust integer programs."""

from qrobust.integer.imports.base import Imported, InputSpec

__all__ = ["Imported", "InputSpec"]
