"""The exact mixed-integer program of an integer MLP, solved with HiGHS (scipy.optimize.milp).

Input splitting (:mod:`qrobust.verify.search`) is complete but slow when a margin depends on
many pixels through unstable neurons; a MILP branches on the neurons instead, with LP bounds
at every node (the encoding of Tjeng et al., arXiv 1711.07356, made exact for integer
rounding). For a chain of :class:`~qrobust.verify.bounds.Affine` and requantization /
ReLU :class:`~qrobust.verify.bounds.Step` stages every quantity is an integer:

- inputs: the centred input codes, integer variables in the box's interval;
- an accumulator ``v = W x + b`` is a linear expression of the previous stage (no variable);
- a requantization ``Q = floor((m (v - z_t) + 2^(S-1)) / 2^S) + z`` is an integer variable
  with the two inequalities ``2^S (Q - z) <= m (v - z_t) + 2^(S-1) <= 2^S (Q - z) + 2^S - 1``
  (divided by 2^S); a ReLU is ``Q = v``;
- the clamp ``y = clamp(Q, lo, hi)`` is exact with one binary per side that can be active
  (big-M from the stage's integer bounds, :func:`~qrobust.verify.bounds.linear_bounds`);
  neurons whose bounds lie on one side of a clamp are constants or ``y = Q``.

A query's margin ``out_j - out_y`` (integer output codes, one output scale) must reach 0
(j < y: ties go to the lower index) or 1 (j > y) for a misclassification; each class j is
one problem, ``maximise out_j - out_y subject to out_j - out_y >= need`` (only the output
neurons j and y encoded), the objective only steering HiGHS's branching and heuristics: it
stops at the first feasible point. Each class is solved at three levels of integrality
(:data:`LEVELS`): only the clamps' binaries integer, then the rounding codes too, then the
inputs too (the exact program), in the order of :data:`SCHEDULE` (a short try with the codes
integer first). Dropping integrality only adds points, so each level is a relaxation of the
next and "infeasible" at any level proves the class; a feasible point of a loose level is
tried (below) and otherwise passes the class up a level.

**Trust**: HiGHS works in floating point with tolerances ~1e-7 to
1e-6. Every inequality above is loosened by ``SLACK`` (in units of one output code of its
stage; the margin by 1/2), so every integer point of the program satisfies each one with room
``SLACK`` to spare: a solver error below that cannot cut off a real counterexample. An
"infeasible" answer is therefore a proof relative to HiGHS's LP arithmetic being right to
within ``SLACK`` (not an exact-arithmetic certificate like the interval and linear bounds);
verdicts say which method decided them. The relaxed levels change nothing here: their
inequalities are the same loosened ones, only the integrality of some variables is dropped,
and the objective cannot cut off a feasible point (it is no constraint). A feasible answer is
only a candidate: its input is rounded, mapped to pixel codes and re-run on the reference
executor (:func:`qrobust.verify.search.milp_stage`, with a short descent from it); a point
that is not misclassified decides nothing.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from qrobust.integer.program import RequantOp
from qrobust.verify.bounds import Affine, Chain, Step

log = logging.getLogger(__name__)

T = TypeVar("T")
SLACK = 1e-4  # the loosening of every inequality (see the module docstring)


@dataclass
class _Model:
    """The growing MILP: rows of ``lb <= A x <= ub`` and the variables' bounds."""

    lower: list[float]
    upper: list[float]
    integer: list[int]
    binary: list[bool]
    rows: list[dict[int, float]]
    row_lo: list[float]
    row_hi: list[float]

    def var(self, lo: float, hi: float, binary: bool = False) -> int:
        """A new integer variable in [lo, hi] (a clamp's switch: ``binary``)."""
        self.lower.append(float(lo))
        self.upper.append(float(hi))
        self.integer.append(1)
        self.binary.append(binary)
        return len(self.lower) - 1

    def row(self, coeffs: dict[int, float], lo: float, hi: float) -> None:
        self.rows.append(coeffs)
        self.row_lo.append(lo)
        self.row_hi.append(hi)

    def solve(self, time_limit: float, objective: np.ndarray, integer: list[int]):
        """HiGHS on the model with the integrality ``integer`` (a relaxation where it drops
        some of the model's own), minimising ``objective``; it stops at the first feasible point
        found (``mip_max_improving_sols``: any point of the program answers the question, the
        objective only steers the search)."""
        n = len(self.lower)
        data, cols, ptr = [], [], [0]
        for r in self.rows:
            cols.extend(r)
            data.extend(r.values())
            ptr.append(len(cols))
        a = csr_array((data, cols, ptr), shape=(len(self.rows), n))
        with warnings.catch_warnings():  # scipy passes options it does not know to HiGHS
            warnings.simplefilter("ignore", RuntimeWarning)
            return milp(objective, integrality=np.array(integer),
                        bounds=Bounds(np.array(self.lower), np.array(self.upper)),
                        constraints=LinearConstraint(a, np.array(self.row_lo),
                                                     np.array(self.row_hi)),
                        options={"time_limit": max(time_limit, 0.01), "presolve": True,
                                 "mip_max_improving_sols": 1})


# A stage's value: per neuron either a variable index (>= 0, coefficient 1) or a constant.
Value = tuple[list[int], list[float]]


Expr = tuple[dict[int, float], float]  # coefficients by variable, constant


def _identity(value: Value) -> list[Expr]:
    return [({i: 1.0}, 0.0) if i >= 0 else ({}, c) for i, c in zip(*value, strict=True)]


def _expression(exprs: list[Expr], weight: np.ndarray, bias: np.ndarray) -> list[Expr]:
    """``W x + b`` for x given as expressions of single variables or constants (a stage's
    value): per output row (coefficients by variable, constant)."""
    idx = [next(iter(c)) if c else -1 for c, _ in exprs]
    is_var = np.array([i >= 0 for i in idx])
    var_cols = np.nonzero(is_var)[0]
    fixed = np.where(is_var, 0.0, np.array([k for _, k in exprs]))
    base = bias + weight @ fixed
    return [({idx[c]: float(w) for c, w in zip(var_cols, row, strict=True) if w}, float(b))
            for row, b in zip(weight[:, var_cols], base, strict=True)]


def _add(coeffs: dict[int, float], var: int, k: float) -> dict[int, float]:
    out = dict(coeffs)
    out[var] = out.get(var, 0.0) + k
    return out


def _neuron(model: _Model, st: Step, i: int, expr: tuple[dict, float],
            v_lo: int, v_hi: int, y_lo: int, y_hi: int) -> tuple[int, float]:
    """The exact encoding of one neuron of a Step; returns (variable or -1, constant)."""
    op = st.op
    if y_lo == y_hi:
        return -1, float(y_lo)
    coeffs, const = expr
    if isinstance(op, RequantOp):
        m, s = int(op.terms[0].multiplier.reshape(-1)[i % op.shift.numel()]), \
            int(op.shift.reshape(-1)[i % op.shift.numel()])
        z_t, z = op.terms[0].zero_point, op.zero_point
        q_range = [((m * (v - z_t) + (1 << (s - 1))) >> s) + z for v in (v_lo, v_hi)]
        lo, hi = op.lo, op.hi
    else:  # ReLU on codes
        q_range, lo, hi = [v_lo, v_hi], op.zero_point, max(v_hi, op.zero_point)
    q = model.var(*q_range)
    if isinstance(op, RequantOp):
        r = m * 2.0**-s  # exact: m < 2^52
        # (Q - z) - r (v - z_t) <= 1/2  and  r (v - z_t) - (Q - z) <= 1/2 - 2^-S
        row = {k: -r * c for k, c in coeffs.items()}
        row = _add(row, q, 1.0)
        shift = r * (const - z_t) + z  # row . x = Q - r v', v' = v - z_t, plus z
        model.row(row, -np.inf, 0.5 + shift + SLACK)
        model.row(row, -0.5 + 2.0**-s + shift - SLACK, np.inf)
    else:
        model.row(_add({k: -c for k, c in coeffs.items()}, q, 1.0), const - SLACK, const + SLACK)
    q_lo, q_hi = q_range
    if lo <= q_lo and q_hi <= hi:
        return q, 0.0
    low_active, high_active = q_lo < lo, q_hi > hi
    t = q
    if low_active:  # t = max(Q, lo) with binary a (a = 1: the clamp is active)
        t = model.var(lo, max(lo, q_hi))
        a = model.var(0, 1, binary=True)
        model.row({t: 1.0, q: -1.0}, -SLACK, np.inf)
        model.row({t: 1.0, q: -1.0, a: -(lo - q_lo)}, -np.inf, SLACK)
        model.row({t: 1.0, a: (max(lo, q_hi) - lo)}, -np.inf, max(lo, q_hi) + SLACK)
    if high_active:  # y = min(t, hi) with binary b (b = 1: the clamp is active)
        t_lo = max(lo, q_lo) if low_active else q_lo
        y = model.var(min(t_lo, hi), hi)
        b = model.var(0, 1, binary=True)
        model.row({y: 1.0, t: -1.0}, -np.inf, SLACK)
        model.row({y: 1.0, t: -1.0, b: (q_hi - hi)}, -SLACK, np.inf)
        model.row({y: 1.0, b: -(hi - t_lo)}, t_lo - SLACK, np.inf)
        t = y
    return t, 0.0


def encode(chain: Chain, values: list[tuple[torch.Tensor, torch.Tensor]],
           outputs: list[int] | None = None) -> tuple[_Model, list[int], list]:
    """The MILP of a chain over one box. ``values``: the integer bounds (1, n_j) of every
    stage value (:attr:`LinearBounds.values`); ``outputs``: the output neurons to encode
    (default all; a margin needs two, and the clamps of the others would only be dead weight
    for the solver). Returns (model, the input variables, the output as a list of
    (coefficients, constant) expressions, None for neurons left out)."""
    model = _Model([], [], [], [], [], [], [])
    lo0, hi0 = (v[0].tolist() for v in values[0])
    inputs = [model.var(a, b) for a, b in zip(lo0, hi0, strict=True)]
    exprs: list = _identity((inputs, [0.0] * len(inputs)))
    last = len(chain.stages)
    for j, st in enumerate(chain.stages, start=1):
        if isinstance(st, Affine):  # of the previous stage's value (a chain starts with one)
            exprs = _expression(exprs, st.weight.numpy(), st.bias.numpy())
            continue
        v_lo, v_hi = (v[0].tolist() for v in values[j - 1])
        y_lo, y_hi = (v[0].tolist() for v in values[j])
        keep = set(range(len(exprs)) if outputs is None or j < last else outputs)
        cells = [_neuron(model, st, i, e, v_lo[i], v_hi[i], y_lo[i], y_hi[i]) if i in keep
                 else None for i, e in enumerate(exprs)]
        exprs = [None if c is None else _identity(([c[0]], [c[1]]))[0] for c in cells]
    return model, inputs, exprs


# The relaxations of a class's problem, loosest first: the integer variables that stay
# integer. Each one's feasible set contains the next one's (dropping integrality only adds
# points), so "infeasible" at any level proves the class, and a point at one level is a point
# of every looser one. The clamps' switches are what a proof mostly branches on; the
# general-integer rounding codes and inputs are many and slow to branch on, yet the codes'
# integrality sometimes lets HiGHS's cuts prove in a second what the switches alone take ten
# for (and the other way round).
LEVELS = ("switches", "codes", "inputs")
# The tries, in order, as (level, seconds at most): a short one with the codes integer, then
# each level without a cap (the deadline's). A try that runs out of its seconds decides
# nothing and the class stays open for the next.
SCHEDULE = (("codes", 2.0), ("switches", math.inf), ("codes", math.inf), ("inputs", math.inf))


def _integrality(model: _Model, inputs: list[int], level: str) -> list[int]:
    if level == "switches":
        return [int(b) for b in model.binary]
    integer = list(model.integer)
    if level == "codes":
        for i in inputs:
            integer[i] = 0
    return integer


def _problem(chain: Chain, values, label: int, j: int, tie_loses: bool):
    """(model, input variables, objective) of class j: the margin's row already bounded below
    by ``need - 1/2``, the objective minimising ``-(out_j - out_y)``; or None when the margin
    is a constant that never reaches ``need`` (raises LookupError when it always does:
    misclassified everywhere)."""
    model, inputs, exprs = encode(chain, values, [j, label])
    (j_coeffs, j_const), (y_coeffs, y_const) = exprs[j], exprs[label]
    row = dict(j_coeffs)
    for k, c in y_coeffs.items():
        row[k] = row.get(k, 0.0) - c
    need = (0.0 if tie_loses else 1.0) - (j_const - y_const)
    if not row:
        if need <= 0:
            raise LookupError(j)
        return None
    model.row(row, need - 0.5, np.inf)
    objective = np.zeros(len(model.lower))
    objective[list(row)] = [-c for c in row.values()]
    return model, inputs, objective


def search(chain: Chain, values, label: int, others: list[int], lower_index: list[bool],
           deadline: float, counterexample: Callable[[np.ndarray, int, str], T | None],
           schedule: tuple[tuple[str, float], ...] = SCHEDULE) -> tuple[str, T | None]:
    """Decide the margin problems of classes ``others`` (most promising first). The tries of
    ``schedule`` (:data:`SCHEDULE`) run in turn, each over all open classes before the next
    (a loose level proves most classes in a fraction of a second), each class as ``maximise
    out_j - out_y subject to out_j - out_y >= need`` (the objective gives the solver's
    branching a signal a pure feasibility problem lacks). A try is skipped for a class with
    a point at that level or a tighter one already. Returns ('infeasible', None) when every
    class is infeasible, ('vulnerable', what ``counterexample`` makes of the first point (its
    centred input codes, fractional at a relaxed level; the class; the level) it does not
    answer None for), ('unknown', None) at the
    deadline, on a solver failure, or when classes remain open after the last try."""
    problems, feasible = {}, {}
    for j, tie_loses in zip(others, lower_index, strict=True):
        try:
            problem = _problem(chain, values, label, j, tie_loses)
        except LookupError:
            return "unknown", None  # misclassified everywhere: the attack should have seen it
        if problem is not None:
            problems[j], feasible[j] = problem, -1
    for level, cap in schedule:
        rank = LEVELS.index(level)
        for j in [j for j in problems if feasible[j] < rank]:
            model, inputs, objective = problems[j]
            left = deadline - time.perf_counter()
            if left <= 0:
                return "unknown", None
            start = time.perf_counter()
            res = model.solve(min(left, cap), objective, _integrality(model, inputs, level))
            log.debug("milp class %d (%s, %.0fs at most): %s in %.2fs", j, level, cap,
                      res.message, time.perf_counter() - start)
            if res.status == 2:
                del problems[j]  # infeasible: class j is proved
                continue
            if res.x is None:
                if res.status == 1 and cap < left:
                    continue  # its seconds ran out, not the deadline's: the class stays open
                return "unknown", None  # the deadline, or a solver failure
            # a point (HiGHS's "solution limit reached", status 4 to scipy, after the first one)
            found = counterexample(res.x[inputs], j, level)
            if found is not None:
                return "vulnerable", found
            feasible[j] = rank
        if not problems:
            return "infeasible", None
    return "unknown", None
