"""The verifier on imported programs (ONNX files quantized by ONNX Runtime, TFLite fixtures):
their requantizations ("float32", "tflite", "ruy") and float average pool are non-decreasing
(properties against the executor), every relaxation line holds at every integer point (exact
rationals), intervals and linear bounds contain every value the executor computes, and every
verdict equals exhaustive enumeration of the box (oracle): tiny ONNX programs over whole boxes
of 4 pixels, TFLite fixtures over sub-boxes where 2-4 pixels vary and the rest stay fixed."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qrobust.integer.program import FloatAvgPoolOp, RequantOp, Term
from qrobust.integer.reference import execute
from qrobust.verify import interval_bounds, linear_bounds, mlp_chain, verify
from qrobust.verify.bounds import requantize_exact, step_of_requant
from qrobust.verify.search import Bounder, attack, branch_and_bound, make_query, margins

from .test_verify import assert_lines_hold

FIXTURES = Path(__file__).parents[1] / "integer" / "fixtures"


def _int(gen, lo, hi, shape=()):
    return torch.randint(lo, hi + 1, shape, generator=gen)


# ---- the roundings of imported files: monotone, and relaxed soundly -------------------------
def imported_requant(gen: torch.Generator, rounding: str, n: int, terms: int = 1) -> RequantOp:
    """A requantization as the importers make them: "float32" with float32 multipliers 2^-12..1
    (ONNX Runtime); "tflite" / "ruy" with one multiplier in [2^30, 2^31) for all terms, shifts
    21..45 and, for "tflite", sometimes ADD's left shift of 20 bits (TFLite)."""
    lo, hi = sorted(int(v) for v in _int(gen, -128, 127, (2,)))
    zp = int(_int(gen, lo, hi))
    left = 20 if rounding == "tflite" and bool(_int(gen, 0, 1)) else 0
    shift = _int(gen, 31 if left else 21, 45 if left else 40, (n,))
    mult = _int(gen, 2**30, 2**31 - 1, (n,))
    real = torch.pow(2.0, -12 * torch.rand(terms, n, generator=gen, dtype=torch.float64))
    real = real.float().double()  # float32 values, as the ONNX importer stores them
    tm = [Term(f"a{i}", int(_int(gen, -5, 5)), mult, real[i]) for i in range(terms)]
    return RequantOp("q", tuple(tm), shift, zp, lo, hi, rounding=rounding, left_shift=left)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rounding=st.sampled_from(["float32", "tflite", "ruy"]),
       terms=st.integers(1, 2))
def test_requantizations_are_non_decreasing_in_each_term(seed, rounding, terms):
    """The executor's requantization at a <= b (each term, elementwise; steps of 0-3 hit ties)
    gives codes q(a) <= q(b): the fact interval propagation rests on, checked, not assumed."""
    gen = torch.Generator().manual_seed(seed)
    op = imported_requant(gen, rounding, 4, terms)
    left = op.left_shift + max(0, 31 - int(op.shift.min()))  # int64 holds the shifted sum
    reach = min(2**20, 2**(27 - left))
    a = [_int(gen, -reach, reach, (500, 4)) for _ in range(terms)]
    steps = [torch.where(_int(gen, 0, 1, (500, 4)) == 0, _int(gen, 0, 3, (500, 4)),
                         _int(gen, 0, reach, (500, 4))) for _ in range(terms)]
    for i in range(terms):  # one term moves, the others stay
        b = [v + s if j == i else v for j, (v, s) in enumerate(zip(a, steps, strict=True))]
        assert bool((requantize_exact(a, op) <= requantize_exact(b, op)).all())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), include_pad=st.booleans())
def test_float_average_pool_is_non_decreasing(seed, include_pad):
    """ONNX Runtime's float average pool (FloatAvgPoolOp, the executor's float32 steps) at
    codes a <= b gives codes pool(a) <= pool(b)."""
    from qrobust.verify.bounds import _float_avg_pool_exact

    gen = torch.Generator().manual_seed(seed)
    scale = float(torch.rand(1, generator=gen).float() * 0.1 + 1e-3)
    op = FloatAvgPoolOp("p", "x", int(_int(gen, -3, 3)), scale,
                        float(torch.rand(1, generator=gen).float() * 0.1 + 1e-3),
                        int(_int(gen, -3, 3)), (2, 3), (1, 2), (1, 1), include_pad, -128, 127)
    a = _int(gen, -128, 127, (200, 2, 5, 6))
    b = (a + torch.where(_int(gen, 0, 1, a.shape) == 0, _int(gen, 0, 1, a.shape),
                         _int(gen, 0, 50, a.shape))).clamp(max=127)
    assert bool((_float_avg_pool_exact(op, a) <= _float_avg_pool_exact(op, b)).all())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rounding=st.sampled_from(["float32", "tflite", "ruy"]),
       large=st.booleans())
def test_relaxation_lines_hold_for_imported_roundings(seed, rounding, large):
    """Each neuron's lines ``k_l a + b_l <= x(a) <= k_u a + b_u`` in exact rational arithmetic
    at every integer a of its box, x(a) the executor's requantization in the file's rounding
    (the band 1/2 + float32 error or + the second rounding of step_of_requant)."""
    gen = torch.Generator().manual_seed(seed)
    n = 6
    op = imported_requant(gen, rounding, n)
    step = step_of_requant(op)
    # boxes around where the codes cross the clamp range: a centre of about zp_code / rate
    rate = step.rate
    target = _int(gen, op.lo - op.zero_point - 3, op.hi - op.zero_point + 3, (n,)).double()
    centre = torch.round(target / rate).clamp(-2**24, 2**24).long().view(1, n)
    if op.left_shift:
        centre = centre.clamp(-250, 250)
    width = _int(gen, 0, 300 if large else 20, (1, n))
    lo, hi = centre - width, centre + width
    assert_lines_hold(step, lo, hi, lambda column: requantize_exact([column], op))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 700))
def test_table_hulls_are_exact(seed, n):
    """The range minimum and maximum of a table (input tables, lookup tables; any shape, not
    monotone) over [a, b] equal brute force."""
    from qrobust.verify.bounds import _range_hull

    gen = torch.Generator().manual_seed(seed)
    table = _int(gen, -128, 127, (3, n))
    row = _int(gen, 0, 2, (200,))
    a, b = _int(gen, 0, n - 1, (200,)), _int(gen, 0, n - 1, (200,))
    a, b = torch.minimum(a, b), torch.maximum(a, b)
    low, high = _range_hull(table, row, a, b)
    for r, i, j, lo_, hi_ in zip(row, a, b, low, high, strict=True):
        window = table[r, i:j + 1]
        assert (int(lo_), int(hi_)) == (int(window.min()), int(window.max()))


# ---- tiny ONNX files quantized by ONNX Runtime ----------------------------------------------
class Tiny(nn.Module):
    """(1, 2, 2) pixels -> conv 2x2 (padding 1) to 3 channels + ReLU -> a block -> linear (3)."""

    def __init__(self, block: str):
        super().__init__()
        self.block = block
        self.stem = nn.Conv2d(1, 3, 2, padding=1)
        self.side = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear({"avgpool": 12, "maxpool": 12, "gap": 3, "concat": 54}.get(block, 27),
                            3)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        if self.block == "add":
            y = y + self.side(y)
        elif self.block == "mul":
            y = y * torch.sigmoid(self.side(y))
        elif self.block == "avgpool":
            y = nn.functional.avg_pool2d(y, 2, 1)
        elif self.block == "maxpool":
            y = nn.functional.max_pool2d(y, 2, 1)
        elif self.block == "gap":
            y = nn.functional.adaptive_avg_pool2d(y, 1)
        elif self.block == "concat":
            y = torch.cat([y, self.side(y)], 1)
        return self.fc(y.flatten(1))


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x.flatten(1))))


def spread(model: nn.Module) -> None:
    """Last layer without bias and with unit weights: random tiny models then predict every
    class on some inputs instead of one class everywhere."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.normal_()
        last.bias.zero_()


# (block, format, per-channel weights, seed: one whose random model predicts 2-3 classes)
ONNX_CASES = [("mlp", "qdq", True, 0), ("mlp", "qoperator", False, 1), ("add", "qdq", True, 2),
              ("mul", "qoperator", True, 3), ("avgpool", "qoperator", False, 4),
              ("maxpool", "qdq", False, 5), ("gap", "qdq", True, 0),
              ("concat", "qoperator", True, 7)]


@pytest.fixture(scope="module")
def onnx_programs(tmp_path_factory):
    """case -> imported Program of a tiny file (random weights, ORT's quantize_static)."""
    pytest.importorskip("onnxruntime.quantization")
    from qrobust.integer.imports import import_file
    from tests.integer.test_import_onnx import make_file

    tmp = tmp_path_factory.mktemp("tiny-onnx")
    out = {}
    for block, fmt, per_channel, seed in ONNX_CASES:
        torch.manual_seed(seed)
        model = TinyMLP() if block == "mlp" else Tiny(block)
        spread(model)
        path = make_file(tmp, model, shape=(1, 2, 2), fmt=fmt, per_channel=per_channel,
                         name=f"{block}-{fmt}")
        out[(block, fmt)] = import_file(path, mean=(0.5,), std=(0.25,)).program
    return out


def test_onnx_programs_are_imported_programs(onnx_programs):
    """The cases exercise what the verifier used to refuse: an input table, float32
    requantization (one and two terms), products, float average pools; the MLP is a chain."""
    from qrobust.integer.program import MulOp

    for program in onnx_programs.values():
        assert program.input_op.table is not None
        assert any(isinstance(op, RequantOp) and op.rounding == "float32" for op in program.ops)
        table = program.input_op.table
        assert bool((table[:, 1:] >= table[:, :-1]).all())  # monotone here; not relied upon
    kinds = {type(op) for p in onnx_programs.values() for op in p.ops}
    assert {MulOp, FloatAvgPoolOp} <= kinds
    assert any(len(op.terms) == 2 for op in onnx_programs[("add", "qdq")].ops
               if isinstance(op, RequantOp))
    assert mlp_chain(onnx_programs[("mlp", "qdq")]) is not None


def enumerate_box(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    axes = [torch.arange(int(a), int(b) + 1) for a, b in zip(lo.flatten(), hi.flatten(), strict=True)]
    return torch.cartesian_prod(*axes).view(-1, *lo.shape)


def misclassified(program, points, label):
    return execute(program, points)["logits"].argmax(1) != label


def near_boundary(program, gen: torch.Generator, n: int) -> torch.Tensor:
    """n random images (N, C, H, W) of smallest logit margin among 16 n: boxes around them
    hold both robust and vulnerable queries."""
    images = _int(gen, 0, 255, (16 * n, *program.input_shape))
    logits = execute(program, images)["logits"]
    margin = logits.max(1).values - logits.topk(2, 1).values[:, 1]
    return images[margin.argsort()[:n]]


def check_bounds_hold(program, lo, hi, points):
    """Intervals (and, for chains, linear bounds) contain every value the executor holds."""
    values = execute(program, points, keep=True)
    env = interval_bounds(program, lo[None], hi[None])
    for slot, v in values.items():
        if slot != "logits":
            assert bool((env[slot][0] <= v).all() and (v <= env[slot][1]).all()), slot
    chain = mlp_chain(program)
    if chain is None:
        return
    objective = torch.randn(3, env["output"][0].shape[1], dtype=torch.float64)
    lin = linear_bounds(chain, env[chain.input_slot][0].flatten(1),
                        env[chain.input_slot][1].flatten(1), objective)
    slots = [chain.input_slot, *(s.slot for s in chain.stages)]
    for slot, (v_lo, v_hi) in zip(slots, lin.values, strict=True):
        v = values[slot].flatten(1)
        assert bool((v_lo <= v).all() and (v <= v_hi).all()), slot
    assert bool((lin.lower <= values[slots[-1]].double() @ objective.t()).all())


@pytest.mark.parametrize("case", [c[:2] for c in ONNX_CASES], ids=lambda c: "-".join(c))
def test_onnx_verdicts_match_exhaustive_enumeration(onnx_programs, case):
    """Whole boxes of 4 pixels (eps 1-6: up to 13^4 points, pixels near 0 and 255 included):
    every verdict equals enumeration, counterexamples are misclassified points of the box, and
    the bounds hold every value the executor computes on the box."""
    program = onnx_programs[case]
    gen = torch.Generator().manual_seed(sum(map(ord, "".join(case))))
    counts = {"robust": 0, "vulnerable": 0}
    for k, image in enumerate(near_boundary(program, gen, 12)):
        if k % 4 == 0:
            image[0, 0, 0] = 255 if k % 8 else 0
        eps = [1, 2, 4, 6][k % 4]
        lo, hi = (image - eps).clamp(0, 255), (image + eps).clamp(0, 255)
        points = enumerate_box(lo, hi)
        label = int(execute(program, image[None])["logits"].argmax(1))
        verdict = verify(program, image, label, eps, timeout=60.0, attack_share=0.2 * (k % 2))
        truth = bool(misclassified(program, points, label).any())
        assert verdict.status == ("vulnerable" if truth else "robust"), (k, verdict)
        counts[verdict.status] += 1
        if truth:
            cex = verdict.counterexample
            assert bool(((cex >= lo) & (cex <= hi)).all())
            assert bool(misclassified(program, cex[None], label).all())
        check_bounds_hold(program, lo, hi, points[_int(gen, 0, len(points) - 1, (64,))])
    assert min(counts.values()) >= 1, counts


@pytest.mark.parametrize("ties", ["first", "label"])
def test_onnx_mlp_uses_linear_bounds(onnx_programs, ties):
    """The imported MLP gets the linear relaxation (not intervals alone) and no MILP stage:
    the whole box's bounds prove what intervals cannot on some queries; verdicts still match
    enumeration under both tie rules."""
    program = onnx_programs[("mlp", "qdq")]
    gen = torch.Generator().manual_seed(5)
    gained = 0
    for _ in range(30):
        image, eps = _int(gen, 0, 255, (1, 2, 2)), int(_int(gen, 1, 8))
        label = int(execute(program, image[None])["logits"].argmax(1))
        query = make_query(program, image, label, eps, ties)
        bound = Bounder.of(query)
        assert bound.chain is not None
        env = interval_bounds(program, query.lo[None], query.hi[None])
        by_intervals = bool(bound.interval_rows(*env["output"]).all())
        gained += int(bool(bound(query.lo[None], query.hi[None])[0][0]) and not by_intervals)
        verdict = verify(program, image, label, eps, timeout=60.0, ties=ties)
        assert verdict.method != "milp"
        points = enumerate_box(query.lo, query.hi)
        truth = bool(margins(program, points, label, ties)[1].any())
        assert verdict.status == ("vulnerable" if truth else "robust")
    assert gained >= 1


# ---- TFLite fixtures: sub-boxes of real images ----------------------------------------------
TFLITE = ["mlp_digits_int8", "cnn_digits_int8", "se_block_int8", "cnn_float_io", "gap_int8"]


def decide(query, seconds: float = 60.0) -> tuple[str, torch.Tensor | None]:
    """The verifier's steps on a hand-made query (a sub-box): attack, then branch and bound."""
    found = attack(query, torch.Generator().manual_seed(0), time.perf_counter() + 1.0)
    if found is not None:
        return "vulnerable", found
    status, _, found = branch_and_bound(query, time.perf_counter() + seconds)
    return status, found


def influential(program, image: torch.Tensor, label: int, eps: int) -> torch.Tensor:
    """The flat indices of the pixels, most influential first: by how much their move by eps
    (down or up) lowers the label's margin (ties: the first)."""
    n = image.numel()
    moves = image.flatten().repeat(2 * n, 1)
    moves[torch.arange(n), torch.arange(n)] -= eps
    moves[torch.arange(n, 2 * n), torch.arange(n)] += eps
    margin, _ = margins(program, moves.clamp(0, 255).view(-1, *image.shape), label)
    return margin.view(2, n).amin(0).argsort(stable=True)


@pytest.mark.parametrize("name", TFLITE)
def test_tflite_sub_boxes_match_exhaustive_enumeration(name):
    """A few pixels vary (4 by 2 codes, 3 by 10 or 2 by 60: at most 121^2 points), the others
    stay fixed, around images near the decision boundary and random ones: the verdict
    of attack + branch and bound on that box equals enumeration; the bounds hold every value."""
    pytest.importorskip("ai_edge_litert")
    from qrobust.integer.imports import import_file

    program = import_file(str(FIXTURES / f"{name}.tflite")).program
    gen = torch.Generator().manual_seed(len(name))
    shape = program.input_shape
    counts = {"robust": 0, "vulnerable": 0}
    images = torch.cat([near_boundary(program, gen, 3), _int(gen, 0, 255, (3, *shape))])
    for k, image in enumerate(images):
        label = int(execute(program, image[None])["logits"].argmax(1))
        query = make_query(program, image, label, 0)
        pixels, eps = [(4, 2), (3, 10), (2, 60)][k % 3]
        free = influential(program, image, label, eps)[:pixels]
        lo, hi = query.lo.flatten().clone(), query.hi.flatten().clone()
        lo[free], hi[free] = (lo[free] - eps).clamp(min=0), (hi[free] + eps).clamp(max=255)
        query = dataclasses.replace(query, lo=lo.view(shape), hi=hi.view(shape))
        status, found = decide(query)
        points = enumerate_box(query.lo, query.hi)
        truth = bool(misclassified(program, points, label).any())
        assert status == ("vulnerable" if truth else "robust"), (k, status)
        counts[status] += 1
        if truth:
            assert bool(((found >= query.lo) & (found <= query.hi)).all())
            assert bool(misclassified(program, found[None], label).all())
        check_bounds_hold(program, query.lo, query.hi,
                          points[_int(gen, 0, len(points) - 1, (64,))])
    # the other fixtures (random weights) predict one class on random images: robust there
    assert counts["robust"] >= 1 and (counts["vulnerable"] >= 1 or "digits" not in name), counts


def test_tflite_mlp_whole_box_bounds_hold():
    """The TFLite MLP (input QUANTIZE table, "ruy" requantization) is a chain; over whole boxes
    (eps 3 on all 64 pixels) intervals and linear bounds hold every value at random points."""
    pytest.importorskip("ai_edge_litert")
    from qrobust.integer.imports import import_file

    program = import_file(str(FIXTURES / "mlp_digits_int8.tflite")).program
    assert mlp_chain(program) is not None
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        image = _int(gen, 0, 255, program.input_shape)
        lo, hi = (image - 3).clamp(0, 255), (image + 3).clamp(0, 255)
        u = torch.rand((64, *lo.shape), generator=gen, dtype=torch.float64)
        points = (lo + torch.floor(u * (hi - lo + 1).double()).long()).clamp(max=hi)
        check_bounds_hold(program, lo, hi, torch.cat([points, lo[None], hi[None]]))
