"""A complete verifier of L-infinity robustness for integer programs: attack, bound, branch.

Question (Henzinger et al., arXiv 2012.08185): for pixel codes ``image`` (C, H, W) in 0..255,
a label y and a radius eps, is there an integer input p with ``|p - image|_inf <= eps`` and
``0 <= p <= 255`` that the integer program misclassifies? The program's prediction is the
reference executor's: ``argmax`` of its float32 logits, ties to the **lowest index**
(torch.argmax returns the first maximal index), so a tie with a class j < y is an error and a
tie with j > y is not. ``ties='label'`` asks the other question some verifiers encode: is the
label's logit >= every other logit (the label wins every tie)?

Method (the branch and bound of Bunel et al., arXiv 1711.00455, on the input domain):
1. the bounds of step 3 on the whole box: a proof there ends the query (certified-trained
   models are mostly proved this way, in one pass);
2. a cheap attack on the integer program itself (random points and corners of the box, then
   greedy coordinate search moving pixels to the ends of their ranges), run with the
   reference executor;
3. for each box: exact integer intervals, then for MLP programs the linear relaxation of
   :mod:`qrobust.verify.bounds` (CROWN, arXiv 1811.00866); a box is proved when every margin
   ``out_y - out_j`` is >= 1 (j < y) or >= 0 (j > y);
4. an unproved box is probed at the corner that minimises the worst margin's linear bound
   (its centre without one), then split in two along one pixel: the one with the largest
   ``width x |coefficient|`` in that worst margin's linear bound (the widest pixel without a
   linear bound). Input splitting keeps every sub-problem a box of integer pixels, and the
   domain is finite: a box of one point is decided exactly by the reference executor, so
   the search ends with ``robust`` or ``vulnerable`` unless the clock runs out (``timeout``);
5. fixed-point MLP programs (qrobust's own, not imported files) with one output scale:
   when input splitting has not decided within ``bab_share`` of the time, the exact
   mixed-integer program of :mod:`qrobust.verify.milp` (branching on neurons instead of
   pixels) gets the rest; its proofs rest on HiGHS's arithmetic within a stated margin, so
   verdicts name the method that decided them.

Margins are compared as integers (the linear bound's ceiling) when the output scale is one
positive number and the output integers are small (|v| <= 2^22): then the executor's
``float32((v - z) s)`` is strictly increasing in v, so integer order and float order (ties
included) agree. With per-class scales the linear bound must clear the float32 rounding of
both logits instead (:class:`Bounder`); intervals compare the executor's float32 logits.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from qrobust.errors import ConfigError
from qrobust.integer.program import FloatAvgPoolOp, Program, ReluOp, RequantOp, input_codes
from qrobust.integer.reference import ReferenceIntegerModel, execute
from qrobust.verify.bounds import (
    BOUNDED_OPS,
    Affine,
    Chain,
    interval_bounds,
    linear_bounds,
    logits_of,
    mlp_chain,
    output_op,
    up,
)

log = logging.getLogger(__name__)

# the descent from each MILP point that the executor does not misclassify (milp_stage)
DESCENT_SECONDS, DESCENT_STEPS = 2.0, 20
# the most free pixels of the exact MILP on a relaxed point's neighbourhood (_fixed_box), and
# the most nested sub-boxes of one dive (solve_fixed)
FIXED_BOX_FREE, DIVE_DEPTH = 64, 8

Status = Literal["robust", "vulnerable", "timeout"]
# what decided a verdict: the attack, the sound bounds with input splitting, or the MILP stage
# (whose "robust" rests on HiGHS's arithmetic within milp.SLACK; see qrobust.verify.milp)
Method = Literal["attack", "branch-and-bound", "milp"]
Ties = Literal["first", "label"]
TIES = ("first", "label")


@dataclass(frozen=True)
class Verdict:
    """The answer to one query. ``counterexample``: pixel codes (C, H, W) int64 in the box
    that the program misclassifies (checked with the reference executor), for ``vulnerable``
    only. ``nodes``: boxes bounded by the branch and bound."""

    status: Status
    seconds: float
    nodes: int
    counterexample: torch.Tensor | None = None
    method: Method | None = None


# ---- the query ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Query:
    """A validated query: the program, its box of pixel codes (C, H, W) int64, the label."""

    program: Program
    lo: torch.Tensor
    hi: torch.Tensor
    label: int
    classes: int
    ties: Ties = "first"


def predict(program: Program, pixels: torch.Tensor) -> torch.Tensor:
    """The program's predictions (N,) for pixel codes (N, C, H, W): argmax of the reference
    executor's logits, ties to the lowest index."""
    return execute(program, pixels)["logits"].argmax(1)


def margins(program: Program, pixels: torch.Tensor, label: int, ties: Ties = "first"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit_y - max_{j != y} logit_j as float64 (N,), misclassified (N,) bool): with
    ``ties='first'`` misclassified means argmax != y (ties to the lowest index), with
    ``ties='label'`` some other logit is strictly larger."""
    logits = execute(program, pixels)["logits"].double()
    others = logits.clone()
    others[:, label] = -torch.inf
    margin = logits[:, label] - others.amax(1)
    return margin, (logits.argmax(1) != label) if ties == "first" else margin < 0


def _program(model, shape: tuple[int, ...]) -> Program:
    if isinstance(model, Program):
        return model
    if isinstance(model, ReferenceIntegerModel):
        try:
            return model.program(shape)
        except (RuntimeError, ValueError) as err:
            raise ConfigError(f"the integer model does not take images of shape {shape}: "
                              f"{err}") from err
    raise ConfigError(f"verify needs an integer Program or a ReferenceIntegerModel "
                      f"(to_integer(twin, 'reference')), not {type(model).__name__}")


def _integer(value, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def check_supported(program: Program) -> None:
    """A ConfigError for programs the bounds do not follow (checked before any query runs):
    an op without an interval rule, or one that is not non-decreasing where the bounds need it
    (a negative requantization multiplier, a float average pool with a scale <= 0)."""
    for op in program.ops:
        if not isinstance(op, BOUNDED_OPS):
            raise ConfigError(f"the verifier has no bounds for {type(op).__name__} "
                              f"('{getattr(op, 'out', '')}'); supported: "
                              f"{', '.join(t.__name__ for t in BOUNDED_OPS)}")
        if isinstance(op, RequantOp) and any(
                bool((t.multiplier < 0).any() or (op.rounding == "float32"
                                                   and not (t.real_multiplier >= 0).all()))
                for t in op.terms):
            raise ConfigError("the program has a negative requantization multiplier; the bounds "
                              "need non-decreasing requantization (multipliers >= 0)")
        if isinstance(op, FloatAvgPoolOp) and not (op.scale > 0 and op.out_scale > 0):
            raise ConfigError(f"the float average pool '{op.out}' has a scale <= 0; the bounds "
                              "need it non-decreasing (scales > 0)")


def exact_milp(program: Program, chain: Chain | None) -> bool:
    """Whether the MILP stage follows the program exactly: an MLP chain of qrobust's own
    fixed-point requantizations read from the input formula (no input or lookup table, no
    imported rounding), as :mod:`qrobust.verify.milp` encodes them."""
    return (chain is not None and chain.input_slot == program.input_op.out
            and program.input_op.table is None
            and all(isinstance(st, Affine) or isinstance(st.op, ReluOp)
                    or st.op.rounding == "fixed" for st in chain.stages))


def make_query(model, image_codes: torch.Tensor, label: int, eps: int,
               ties: Ties = "first") -> Query:
    """Validate a query; a ConfigError with a one-line message for bad input."""
    if ties not in TIES:
        raise ConfigError(f"unknown tie rule {ties!r}; valid: {', '.join(TIES)}")
    if not isinstance(image_codes, torch.Tensor):
        raise ConfigError("image_codes must be a tensor of pixel codes (C, H, W)")
    program = _program(model, tuple(image_codes.shape))
    eps = _integer(eps, "eps")
    if not 0 <= eps <= 255:
        raise ConfigError(f"eps must be an integer number of pixel codes in 0..255, got {eps!r}")
    if tuple(image_codes.shape) != tuple(program.input_shape):
        raise ConfigError(f"image of shape {tuple(image_codes.shape)} does not fit the program's "
                          f"input shape {tuple(program.input_shape)}")
    image = image_codes.detach()
    if image.is_floating_point() and not bool((image == image.round()).all()):
        raise ConfigError("image_codes must hold integer pixel codes 0..255 (use pixel_codes(x))")
    image = image.long()
    if image.numel() and (int(image.min()) < 0 or int(image.max()) > 255):
        raise ConfigError("image_codes must hold pixel codes in 0..255")
    classes = int(execute(program, image.unsqueeze(0))["logits"].shape[1])
    label = _integer(label, "label")
    if not 0 <= label < classes:
        raise ConfigError(f"label must be an integer in 0..{classes - 1}, got {label!r}")
    scale = output_op(program).scale
    if bool((scale <= 0).any()):
        raise ConfigError("the program's output scale must be positive")
    check_supported(program)
    return Query(program, (image - eps).clamp(0, 255), (image + eps).clamp(0, 255), label, classes,
                 ties)


# ---- bounds on a batch of boxes -------------------------------------------------------------
@dataclass(frozen=True)
class Bounder:
    """Proves boxes of one query: intervals always, the linear relaxation when ``chain``.

    Linear margins come in two modes. ``integer``: one output scale (see
    :func:`_integer_margins`); rows ``e_y - e_j`` of the output integers v, proved when the
    ceiling of the lower bound is >= 1 (j < y) or >= 0 (j > y). Otherwise real: rows
    ``s_y e_y - s_j e_j``, proved when the lower bound exceeds ``z (s_y - s_j)`` plus the
    float32 rounding of both logits: with ``x_c = s_c (v_c - z)`` the executor's logit is
    within ``2^-23 |x_c| + 2^-149`` of x_c, so ``x_y - x_j > 2^-22 (s_y R_y + s_j R_j) +
    2^-140`` (R_c >= |v_c - z| on the query's box) makes logit_y > logit_j strictly."""

    query: Query
    chain: Chain | None
    objective: torch.Tensor  # (R, K) float64, one row per class j != y
    lower_index: torch.Tensor  # (R,) bool: j < y (a tie loses)
    threshold: torch.Tensor  # (R,) float64
    integer: bool

    @classmethod
    def of(cls, query: Query) -> Bounder:
        y, k = query.label, query.classes
        others = torch.tensor([j for j in range(k) if j != y], dtype=torch.long)
        rows = torch.arange(len(others))
        lower_index = others < y if query.ties == "first" else torch.zeros(len(others), dtype=torch.bool)
        objective = torch.zeros(len(others), k, dtype=torch.float64)
        chain = mlp_chain(query.program)
        op = output_op(query.program)
        scale = op.scale.reshape(-1).double().expand(k)
        out_lo, out_hi = interval_bounds(query.program, query.lo[None], query.hi[None])["output"]
        reach = torch.maximum((out_lo[0] - op.zero_point).abs(), (out_hi[0] - op.zero_point).abs())
        if _integer_margins(scale, reach):
            objective[:, y] = 1.0
            objective[rows, others] = -1.0
            return cls(query, chain, objective, lower_index, lower_index.double(), True)
        objective[:, y] = scale[y]
        objective[rows, others] = -scale[others]
        size = scale * reach.double()
        if float(size.max()) >= 2.0**100:
            chain = None  # logits near float32 overflow: intervals only
        tol = up(2.0**-22 * (size[y] + size[others])) + 2.0**-140
        shift = up(up(op.zero_point * (scale[y] - scale[others])))
        return cls(query, chain, objective, lower_index, up(shift + tol), False)

    def interval_rows(self, out_lo: torch.Tensor, out_hi: torch.Tensor) -> torch.Tensor:
        """Margins proved by intervals (N, R) bool, on the executor's float32 logits."""
        y = self.query.label
        low = logits_of(self.query.program, out_lo)[:, y:y + 1]
        high = logits_of(self.query.program, out_hi)
        high = torch.cat([high[:, :y], high[:, y + 1:]], 1)
        return torch.where(self.lower_index, low > high, low >= high)

    def linear_rows(self, lower: torch.Tensor) -> torch.Tensor:
        """Margins proved by the linear lower bounds (N, R) of the objective rows."""
        if self.integer:
            return torch.ceil(lower) >= self.threshold
        return lower > self.threshold

    def __call__(self, lo: torch.Tensor, hi: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Boxes (N, C, H, W) -> (proved (N,) bool, for each box the input coefficients
        (N, C*H*W) of its worst unproved margin's linear bound, or None without a chain)."""
        env = interval_bounds(self.query.program, lo, hi)
        rows = self.interval_rows(*env["output"])
        proved = rows.all(1)
        if self.chain is None or bool(proved.all()):
            return proved, None
        coeffs = torch.zeros(lo.shape[0], lo[0].numel(), dtype=torch.float64)
        todo = (~proved).nonzero().squeeze(1)
        x_lo, x_hi = (v[todo].flatten(1) for v in env[self.chain.input_slot])
        lin = linear_bounds(self.chain, x_lo, x_hi, self.objective)
        ok = rows[todo] | self.linear_rows(lin.lower) | self.interval_rows(*lin.values[-1])
        proved[todo] = ok.all(1)
        slack = torch.where(ok, torch.inf, lin.lower - self.threshold)
        worst = slack.argmin(1)
        coeffs[todo] = lin.coeffs[torch.arange(len(todo)), worst]
        return proved, coeffs


def _integer_margins(scale: torch.Tensor, reach: torch.Tensor) -> bool:
    """True when the executor's logits order the output integers exactly as the integers
    themselves: one positive scale s in [2^-100, 2^100] for all K outputs and |v - z| <= 2^22
    on the box (``reach`` (K,)): then fl32(fl64((v - z) s)) is strictly increasing in v, as
    the float32 spacing there is at most s / 2."""
    return (bool((scale == scale[0]).all()) and 2.0**-100 <= float(scale[0]) <= 2.0**100
            and int(reach.max()) <= 2**22)


# ---- attack ---------------------------------------------------------------------------------
def _uniform(lo: torch.Tensor, hi: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand((n, *lo.shape), generator=gen, dtype=torch.float64)
    return (lo + torch.floor(u * (hi - lo + 1).double()).long()).clamp(max=hi)


def _coordinate_moves(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """All single-pixel moves of x (C, H, W) to an end of its range: (moves (M, C, H, W),
    pixel index (M,), new value (M,))."""
    flat, idx, val = x.flatten(), [], []
    for end in (lo.flatten(), hi.flatten()):
        where = (end != flat).nonzero().squeeze(1)
        idx.append(where)
        val.append(end[where])
    idx_t, val_t = torch.cat(idx), torch.cat(val)
    moves = flat.expand(len(idx_t), -1).clone()
    moves[torch.arange(len(idx_t)), idx_t] = val_t
    return moves.view(-1, *x.shape), idx_t, val_t


def smooth_margin(chain: Chain, program: Program, pixels: torch.Tensor, label: int) -> torch.Tensor:
    """The MLP chain without rounding (each requantization as its real-valued line, clamps
    kept) on pixel codes (N, C, H, W): its output margin (N,) float64, a surrogate that moves
    where the integer margin is flat."""
    op = program.input_op
    if chain.input_slot == op.out:
        x = input_codes(op, pixels) - op.zero_point.view(1, -1, *([1] * (pixels.ndim - 2)))
    else:  # the chain starts after input lookup tables: the executor's values there
        x = execute(program, pixels, keep=True)[chain.input_slot]
    x = x.flatten(1).double()
    for st in chain.stages:
        if isinstance(st, Affine):
            x = x @ st.weight.t() + st.bias
        else:
            x = torch.clamp(st.rate * (x - st.z_in), st.low, st.high) + st.z
    others = x.clone()
    others[:, label] = -torch.inf
    return x[:, label] - others.amax(1)


def _evaluate(query: Query, points: torch.Tensor, chain: Chain | None = None, chunk: int = 1024):
    """(score (N,) float64, misclassified (N,) bool): the logit margin, plus the smooth
    margin of an MLP chain as a tie-breaker on plateaus."""
    scores, bad = [], []
    for i in range(0, len(points), chunk):
        part = points[i:i + chunk]
        score, wrong = margins(query.program, part, query.label, query.ties)
        if chain is not None:
            score = score + smooth_margin(chain, query.program, part, query.label)
        scores.append(score)
        bad.append(wrong)
    return torch.cat(scores), torch.cat(bad)


def attack(query: Query, gen: torch.Generator, deadline: float, starts: int = 16,
           steps: int = 50) -> torch.Tensor | None:
    """A misclassified point (C, H, W) of the box, or None: the box's centre, its two extreme
    corners and ``starts`` random points, then :func:`descend` from the best one."""
    lo, hi = query.lo, query.hi
    chain = mlp_chain(query.program)
    centre = ((lo + hi) // 2)[None]
    points = torch.cat([centre, lo[None], hi[None], _uniform(lo, hi, starts, gen)])
    score, bad = _evaluate(query, points, chain)
    if bool(bad.any()):
        return points[bad.nonzero()[0, 0]]
    return descend(query, points[score.argmin()], deadline, chain, steps)


def descend(query: Query, x: torch.Tensor, deadline: float, chain: Chain | None,
            steps: int = 50) -> torch.Tensor | None:
    """Greedy coordinate descent on the logit margin from pixel codes x (C, H, W) in the box:
    each step takes the best single-pixel move to an end of its range, or every improving move
    at once when that is better. A misclassified point it meets, or None."""
    lo, hi = query.lo, query.hi
    score, bad = _evaluate(query, x[None], chain)
    if bool(bad.any()):
        return x
    best = float(score[0])
    for _ in range(steps):
        if time.perf_counter() > deadline:
            break
        moves, idx, val = _coordinate_moves(x, lo, hi)
        if not len(moves):
            break
        s, bad = _evaluate(query, moves, chain)
        if bool(bad.any()):
            return moves[bad.nonzero()[0, 0]]
        if not float(s.min()) < best:
            break
        combined = x.flatten().clone()
        gain = torch.full((combined.numel(),), best, dtype=torch.float64)
        for i in (s < best).nonzero().squeeze(1).tolist():  # each pixel: its best move
            if s[i] < gain[idx[i]]:
                gain[idx[i]] = s[i]
                combined[idx[i]] = val[i]
        step = torch.stack([moves[s.argmin()], combined.view_as(x)])
        s2, bad2 = _evaluate(query, step, chain)
        if bool(bad2.any()):
            return step[bad2.nonzero()[0, 0]]
        x, best = step[s2.argmin()], float(s2.min())
    return None


# ---- branch and bound -----------------------------------------------------------------------
def _split(lo: torch.Tensor, hi: torch.Tensor, coeffs: torch.Tensor | None):
    """Halve each box (N, C, H, W) along its chosen pixel -> the 2N children (lo, hi)."""
    width = (hi - lo).flatten(1).double()
    score = width * coeffs.abs() if coeffs is not None else width
    score = torch.where(score.amax(1, keepdim=True) > 0, score, width)
    idx = score.argmax(1)
    rows = torch.arange(len(lo))
    lo_f, hi_f = lo.flatten(1), hi.flatten(1)
    mid = (lo_f[rows, idx] + hi_f[rows, idx]) // 2
    left_hi, right_lo = hi_f.clone(), lo_f.clone()
    left_hi[rows, idx] = mid
    right_lo[rows, idx] = mid + 1
    shape = lo.shape
    return (torch.cat([lo_f, right_lo]).view(-1, *shape[1:]),
            torch.cat([left_hi, hi_f]).view(-1, *shape[1:]))


def _probe(lo: torch.Tensor, hi: torch.Tensor, coeffs: torch.Tensor | None) -> torch.Tensor:
    """One point per box: the corner minimising the linear bound of the worst margin (input
    codes are non-decreasing in pixel codes), else the centre."""
    centre = (lo + hi) // 2
    if coeffs is None:
        return centre
    c = coeffs.view_as(lo)
    return torch.where(c > 0, lo, torch.where(c < 0, hi, centre))


def branch_and_bound(query: Query, deadline: float, batch: int = 64,
                     max_nodes: int | None = None) -> tuple[Status, int, torch.Tensor | None]:
    """(status, nodes, counterexample) of the depth-first input-splitting search."""
    bound = Bounder.of(query)
    stack_lo, stack_hi = [query.lo[None]], [query.hi[None]]
    nodes = 0
    while stack_lo:
        if time.perf_counter() > deadline or (max_nodes is not None and nodes >= max_nodes):
            return "timeout", nodes, None
        lo, hi = stack_lo.pop(), stack_hi.pop()
        if len(lo) > batch:
            stack_lo.append(lo[batch:])
            stack_hi.append(hi[batch:])
            lo, hi = lo[:batch], hi[:batch]
        nodes += len(lo)
        proved, coeffs = bound(lo, hi)
        open_ = ~proved
        if not bool(open_.any()):
            continue
        lo, hi = lo[open_], hi[open_]
        coeffs = None if coeffs is None else coeffs[open_]
        points = _probe(lo, hi, coeffs)
        _, bad = margins(query.program, points, query.label, query.ties)
        if bool(bad.any()):
            return "vulnerable", nodes, points[bad.nonzero()[0, 0]]
        single = (lo == hi).flatten(1).all(1)
        if bool(single.any()):  # decided by the executor: exact bounds prove these anyway
            log.debug("%d single-point boxes decided by execution", int(single.sum()))
        keep = ~single
        if bool(keep.any()):
            children = _split(lo[keep], hi[keep], None if coeffs is None else coeffs[keep])
            stack_lo.append(children[0])
            stack_hi.append(children[1])
    return "robust", nodes, None


def _pixels(query: Query, centred: torch.Tensor, exact: bool = True) -> torch.Tensor | None:
    """Pixel codes (C, H, W) in the query's box whose input codes are ``centred`` + zero point
    (flat), or None (``exact=False``: the same formula's pixels clamped to the box, never
    None, even where their codes differ). With step 1 they are the codes themselves; else
    ``u step - offset`` maps to u under round half up."""
    op = query.program.input_op
    view = lambda t: t.view(-1, *([1] * (query.lo.ndim - 1)))  # noqa: E731
    u = centred.view_as(query.lo) + view(op.zero_point)
    p = (u * op.step - view(op.offset)).clamp(query.lo, query.hi)
    return p if not exact or bool((input_codes(op, p[None])[0] == u).all()) else None


def box_bounds(query: Query, bound: Bounder):
    """(interval environment, linear bounds) of the query's whole box, for an MLP chain:
    what the MILP encodes (``.values``) and the margins it still has to decide."""
    env = interval_bounds(query.program, query.lo[None], query.hi[None])
    x_lo, x_hi = (v.flatten(1) for v in env[bound.chain.input_slot])
    return env, linear_bounds(bound.chain, x_lo, x_hi, bound.objective)


def _fixed_box(query: Query, centred: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sub-box of the query's box whose pixels are fixed where the relaxed point's input
    codes ``centred`` are whole (the neighbourhood a relaxation suggests: RINS / fix-and-solve
    of MILP heuristics), the others free in their ranges; None when no input is fractional or
    more than ``FIXED_BOX_FREE`` are (an exact MILP over that many pixels rarely ends)."""
    fractional = torch.from_numpy(np.abs(centred - np.rint(centred)) > 1e-6).view_as(query.lo)
    if not 0 < int(fractional.sum()) <= FIXED_BOX_FREE:
        return None
    whole = _pixels(query, torch.from_numpy(np.rint(centred)).long(), exact=False)
    return torch.where(fractional, query.lo, whole), torch.where(fractional, query.hi, whole)


def solve_fixed(query: Query, bound: Bounder, centred: np.ndarray, j: int, tie_loses: bool,
                deadline: float) -> torch.Tensor | None:
    """Pixel codes of the box that the executor misclassifies, found for class j (a rounded
    relaxed point on the way may lose to another class), or None (no sub-box, no point of
    class j in it, or the deadline): a dive of fix-and-solve. The sub-box :func:`_fixed_box` of
    the relaxed point ``centred`` gets the relaxation with integer codes again (bounds
    recomputed there, so most neurons are constants: a fraction of a second); its point fixes
    more pixels, and so on while the free pixels get fewer (at most ``DIVE_DEPTH`` boxes; a
    box whose relaxation is infeasible holds no counterexample and is dropped). Then the exact
    MILP runs on the boxes from the smallest up, each but the largest for at most half the
    time left: on the hardest benchmark query the dive goes from 30 free pixels to 16, where
    the exact MILP takes 1 s instead of 53."""
    from qrobust.verify import milp

    def sub_query(box) -> tuple[Query, list]:  # the sub-box's query and its bounds, once
        sub = replace(query, lo=box[0], hi=box[1])
        return sub, box_bounds(sub, bound)[1].values

    def solve(sub_values, level: str, until: float):
        return milp.search(bound.chain, sub_values[1], query.label, [j], [tie_loses], until,
                           lambda x, *_: x, schedule=((level, math.inf),))

    found = _misclassified(query, centred)  # first the point rounded: where class j wins on
    if found is not None:  # the whole box the MILP has no problem to solve
        return found
    boxes, box = [], _fixed_box(query, centred)
    while box is not None and len(boxes) < DIVE_DEPTH and time.perf_counter() < deadline:
        sub_values = sub_query(box)
        status, point = solve(sub_values, "codes", deadline)
        if status == "infeasible":
            break
        boxes.append(sub_values)
        if point is None:
            break
        sub = sub_values[0]
        found = _misclassified(sub, point)
        if found is not None:
            return found
        box = _fixed_box(sub, point)
        if box is not None and int((box[0] != box[1]).sum()) >= int((sub.lo != sub.hi).sum()):
            break
    for k, sub_values in enumerate(reversed(boxes)):
        left = deadline - time.perf_counter()
        until = deadline if k == len(boxes) - 1 else time.perf_counter() + left / 2
        status, point = solve(sub_values, "inputs", until)
        found = None if point is None else _misclassified(sub_values[0], point)
        if found is not None:
            return found
    return None


def _misclassified(query: Query, centred: np.ndarray) -> torch.Tensor | None:
    """The pixels of exact input codes ``centred`` if the executor misclassifies them."""
    pixels = _pixels(query, torch.from_numpy(np.rint(centred)).long())
    if pixels is None or not bool(margins(query.program, pixels[None], query.label, query.ties)[1][0]):
        return None
    return pixels


def milp_stage(query: Query, bound: Bounder, deadline: float
               ) -> tuple[Status | None, torch.Tensor | None]:
    """The exact MILP of an MLP program over the whole box (:mod:`qrobust.verify.milp`):
    ('robust', None), ('vulnerable', pixel codes the executor misclassifies), or (None, None)
    when it cannot decide (not an MLP with one output scale, the deadline, or a point of the
    exact loosened program that is not misclassified and from which :func:`descend` finds
    none either). Every point HiGHS finds, exact or of a relaxation, is rounded into the box
    and descended from for at most ``DESCENT_SECONDS``, and a point of the ``codes`` level
    searched around with :func:`solve_fixed`: counterexamples come only from the executor,
    so this is a search heuristic and no part of any proof."""
    from qrobust.verify import milp  # scipy's HiGHS: loaded only when a query needs it

    if not exact_milp(query.program, bound.chain) or not bound.integer:
        return None, None
    env, lin = box_bounds(query, bound)
    proved = (bound.linear_rows(lin.lower) | bound.interval_rows(*env["output"]))[0]
    slack = lin.lower[0] - bound.threshold
    rows = sorted((~proved).nonzero().squeeze(1).tolist(), key=lambda r: float(slack[r]))
    others = [j for j in range(query.classes) if j != query.label]

    chain = bound.chain
    ties = {others[r]: bool(bound.lower_index[r]) for r in rows}

    def counterexample(centred: np.ndarray, j: int, level: str) -> torch.Tensor | None:
        """A MILP point's pixels if the executor misclassifies them, else what a short
        descent from them finds (a relaxation's point is often a few pixels off one), else,
        for a point with the rounding codes integer, what the exact MILP finds on the box
        with the point's whole-valued inputs fixed (:func:`_fixed_box`)."""
        pixels = _pixels(query, torch.from_numpy(np.rint(centred)).long(), exact=False)
        end = min(deadline, time.perf_counter() + DESCENT_SECONDS)
        found = descend(query, pixels, end, chain, steps=DESCENT_STEPS)
        if found is not None or level != "codes":
            return found
        return solve_fixed(query, bound, centred, j, ties[j], deadline)

    status, found = milp.search(chain, lin.values, query.label, [others[r] for r in rows],
                                [ties[others[r]] for r in rows], deadline, counterexample)
    if status == "infeasible":
        return "robust", None
    if status == "vulnerable":
        return "vulnerable", found
    return None, None


def verify(program_or_integer_model, image_codes: torch.Tensor, label: int, eps: int,
           timeout: float = 60.0, *, batch: int = 64, seed: int = 0,
           attack_share: float = 0.2, bab_share: float = 0.1, use_milp: bool = True,
           max_nodes: int | None = None, ties: Ties = "first") -> Verdict:
    """Decide whether every integer input within ``eps`` pixel codes (L-infinity, clipped to
    0..255) of ``image_codes`` (C, H, W) keeps the prediction ``label``.

    ``program_or_integer_model``: a lowered :class:`Program` or a ReferenceIntegerModel.
    ``timeout``: wall-clock seconds for the whole query. The bounds of the whole box come
    first (a proof there ends the query), then the attack gets ``attack_share`` of the time (0
    skips it), then input-splitting branch and bound; for fixed-point MLP programs with one
    output scale (``use_milp``; not imported files, :func:`exact_milp`) the branch and bound
    stops after ``bab_share`` of the time and the exact MILP (:mod:`qrobust.verify.milp`)
    gets the rest, then branch and bound again if the MILP could not decide. ``seed`` seeds
    the attack's torch.Generator; ``ties``: 'first' (the executor's argmax, ties to the
    lowest index) or 'label' (the label wins ties). Raises ConfigError for bad input."""
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    start = time.perf_counter()
    deadline = start + timeout
    query = make_query(program_or_integer_model, image_codes, label, eps, ties)
    gen = torch.Generator().manual_seed(seed)
    method: Method | None = None
    with torch.no_grad():
        bound = Bounder.of(query)
        # the root box first: certified-trained models are mostly proved there, in one pass
        if bool(bound(query.lo[None], query.hi[None])[0][0]):
            return Verdict("robust", time.perf_counter() - start, 1, None, "branch-and-bound")
        found = attack(query, gen, start + attack_share * timeout) if attack_share > 0 else None
        status, nodes = "vulnerable", 1
        if found is not None:
            method = "attack"
        else:
            milp_ok = use_milp and exact_milp(query.program, bound.chain) and bound.integer
            first = min(deadline, time.perf_counter() + bab_share * timeout) if milp_ok else deadline
            status, nodes, found = branch_and_bound(query, first, batch, max_nodes)
            method = "branch-and-bound"
            if status == "timeout" and milp_ok and time.perf_counter() < deadline:
                decided, found = milp_stage(query, bound, deadline)
                if decided is not None:
                    status, method = decided, "milp"
                elif time.perf_counter() < deadline:
                    status, more, found = branch_and_bound(query, deadline, batch, max_nodes)
                    nodes += more
    if found is not None:
        found = found.clone()
        inside = bool(((found >= query.lo) & (found <= query.hi)).all())
        if not inside or not bool(margins(query.program, found[None], label, query.ties)[1][0]):
            raise AssertionError("a counterexample failed its re-check")  # a bug guard
    seconds = time.perf_counter() - start
    if status == "timeout":
        method = None
    log.debug("verify: %s by %s after %.2fs, %d nodes", status, method, seconds, nodes)
    return Verdict(status, seconds, nodes, found, method)  # type: ignore[arg-type]
