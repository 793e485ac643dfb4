"""Complete verification of integer programs against L-infinity pixel-code perturbations:
exact interval and linear (CROWN, arXiv 1811.00866) bounds and an input-splitting branch and
bound (Henzinger et al., arXiv 2012.08185, asked the same question of an SMT solver)."""

from qrobust.verify.bounds import interval_bounds, linear_bounds, mlp_chain
from qrobust.verify.search import Verdict, predict, verify

__all__ = ["Verdict", "interval_bounds", "linear_bounds", "mlp_chain", "predict", "verify"]
