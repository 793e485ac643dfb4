"""The verifier against exhaustive enumeration on random tiny integer programs (oracle), its
bounds against the values the reference executor computes and its relaxation lines against
exact rational arithmetic (properties), programs lowered from twins, and its input checks.

Programs are built directly as :class:`Program` objects: MLPs with 2-4 bit weights, 2-4 bit
activations, one or two hidden layers, and small convolutional programs; boxes of at most a
few thousand points, so that every verdict can be checked point by point."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qrobust.errors import ConfigError
from qrobust.integer import to_integer
from qrobust.integer.base import pixel_codes
from qrobust.integer.program import (
    ClampOp,
    ConcatOp,
    FlattenOp,
    GroupConvOp,
    InputOp,
    LinearOp,
    LookupOp,
    MaxPoolOp,
    OutputOp,
    Program,
    ReluOp,
    RequantOp,
    Term,
    WindowSumPoolOp,
)
from qrobust.integer.reference import execute
from qrobust.models import ModelSpec, build_model
from qrobust.quant import quantize
from qrobust.verify import interval_bounds, linear_bounds, mlp_chain, verify
from qrobust.verify.bounds import (
    Step,
    relax,
    requantize_exact,
    step_of_relu,
    step_of_requant,
)
from qrobust.verify.search import Bounder, box_bounds, make_query

MAX_POINTS = 4096
INPUT_STD = 1.0  # the input spread the first requantization is sized for (pixel codes)


def _int(gen, lo, hi, shape=()):
    return torch.randint(lo, hi + 1, shape, generator=gen)


def _requant(gen, name, inp, n, acc_std, bits, signed, relu):
    """A one-term requantization mapping accumulators of about ``acc_std`` onto ``bits``-bit
    codes: multipliers of 6-8 bits (ties of the rounding happen) or, as lowering makes them,
    in [2^30, 2^31)."""
    mult = _int(gen, 40, 255, (n,)) if bool(_int(gen, 0, 1)) else _int(gen, 2**30, 2**31 - 1, (n,))
    target = (2**bits) / (4 * max(acc_std, 1.0))
    shift = torch.clamp(torch.round(torch.log2(mult.double() / target)), 1, 62).long()
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    zp = int(_int(gen, lo, hi)) if not relu else (lo if not signed else int(_int(gen, lo, 0)))
    if relu and signed:
        lo = max(lo, zp)
    term = Term(inp, 0, mult, torch.zeros(n, dtype=torch.float64))
    return RequantOp(name, (term,), shift, zp, lo, hi), zp


def random_program(gen: torch.Generator, n_in: int, hidden: list[int], classes: int,
                   w_bits: int, a_bits: int, clamp_output: bool, uniform_scale: bool,
                   centre: torch.Tensor | None = None) -> Program:
    """A random MLP program on images (1, 1, n_in); its first bias cancels the accumulator at
    pixel codes ``centre`` (n_in,) up to noise, so that boxes around it cross many codes."""
    zp_in = _int(gen, 0, 255, (1,))
    ops: list = [InputOp("x", zp_in, 1, torch.zeros(1, dtype=torch.long)), FlattenOp("f", "x")]
    prev, width, in_zp, code_std = "f", n_in, 0, INPUT_STD
    w_lo, w_hi = -(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1
    for k, h in enumerate([*hidden, classes]):
        weight = _int(gen, w_lo, w_hi, (h, width))
        acc_std = code_std * math.sqrt(width) * 2 ** (w_bits - 1)
        bias = _int(gen, -int(acc_std), int(acc_std), (h,))
        if k == 0 and centre is not None:
            bias = bias - weight @ (centre - zp_in)
        ops.append(LinearOp(f"l{k}", prev, in_zp, weight, bias, torch.ones(h, dtype=torch.float64)))
        prev = f"l{k}"
        last = k == len(hidden)
        if last and not clamp_output:
            break
        signed = bool(_int(gen, 0, 1)) or last
        op, zp = _requant(gen, f"q{k}", prev, h, acc_std, a_bits, signed, relu=not last)
        ops.append(op)
        prev, in_zp, code_std, width = op.out, zp, 2.0 ** (a_bits - 2), h
        if not last and bool(_int(gen, 0, 3) == 0):
            ops.append(ReluOp(f"r{k}", prev, zp))
            prev = f"r{k}"
    scale = (torch.tensor(1.0, dtype=torch.float64) if uniform_scale else
             torch.rand(classes, generator=gen, dtype=torch.float64) + 0.5)
    ops.append(OutputOp(prev, scale, 0))
    return Program(tuple(ops), (1, 1, n_in), {})


def random_query(gen: torch.Generator):
    """(program, image (1, 1, n), label, eps) with at most MAX_POINTS points in the box."""
    n_in = int(_int(gen, 4, 12))
    hidden = [int(_int(gen, 2, 8)) for _ in range(int(_int(gen, 1, 2)))]
    eps = int(_int(gen, 1, 3))
    while True:  # pixels at 0 or 255 have eps + 1 values, others 2 eps + 1
        kind = _int(gen, 0, 2, (n_in,))
        image = torch.where(kind == 0, 0, torch.where(kind == 1, 255, _int(gen, 0, 255, (n_in,))))
        widths = (image + eps).clamp(max=255) - (image - eps).clamp(min=0) + 1
        if int(widths.prod()) <= MAX_POINTS:
            break
        eps = max(1, eps - 1) if bool(_int(gen, 0, 1)) else eps
    program = random_program(gen, n_in, hidden, int(_int(gen, 2, 4)), int(_int(gen, 2, 4)),
                             int(_int(gen, 2, 4)), bool(_int(gen, 0, 1)), bool(_int(gen, 0, 3) > 0),
                             centre=image)
    image = image.view(1, 1, n_in)
    logits = execute(program, image[None])["logits"]
    label = int(logits.argmax(1))
    if bool(_int(gen, 0, 4) == 0):  # sometimes a label the centre does not have
        label = int(_int(gen, 0, logits.shape[1] - 1))
    return program, image, label, eps


def enumerate_box(image: torch.Tensor, eps: int) -> torch.Tensor:
    lo, hi = (image - eps).clamp(0, 255).flatten(), (image + eps).clamp(0, 255).flatten()
    axes = [torch.arange(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True)]
    return torch.cartesian_prod(*axes).view(-1, *image.shape)


def misclassified(program, points, label, ties="first"):
    logits = execute(program, points)["logits"]
    if ties == "first":
        return logits.argmax(1) != label
    return (logits > logits[:, label:label + 1]).any(1)


@pytest.mark.parametrize("attack_share, ties", [(0.2, "first"), (0.0, "first"), (0.0, "label")])
def test_verdicts_match_exhaustive_enumeration(attack_share, ties):
    """Robust iff no point of the box is misclassified (ties to the lowest index, or won by the
    label), on 120 random programs per case; counterexamples lie in the box."""
    gen = torch.Generator().manual_seed(15 + int(attack_share * 10) + len(ties))
    counts = {"robust": 0, "vulnerable": 0}
    for _ in range(120):
        program, image, label, eps = random_query(gen)
        verdict = verify(program, image, label, eps, timeout=30.0, attack_share=attack_share,
                         ties=ties)
        points = enumerate_box(image, eps)
        truth = bool(misclassified(program, points, label, ties).any())
        assert verdict.status == ("vulnerable" if truth else "robust")
        counts[verdict.status] += 1
        if truth:
            cex = verdict.counterexample
            assert cex is not None and cex.shape == image.shape
            assert bool(((cex - image).abs() <= eps).all()) and int(cex.min()) >= 0
            assert int(cex.max()) <= 255
            assert bool(misclassified(program, cex[None], label, ties).all())
        else:
            assert verdict.counterexample is None
    assert min(counts.values()) >= 20, counts  # both outcomes are exercised


def test_linear_bounds_prove_what_intervals_cannot():
    """The linear relaxation proves boxes that intervals leave open, in both margin modes
    (one output scale: integer margins; per-class scales: real margins)."""
    gen = torch.Generator().manual_seed(3)
    gained = {True: 0, False: 0}
    for _ in range(200):
        program, image, label, eps = random_query(gen)
        query = make_query(program, image, label, eps)
        bound = Bounder.of(query)
        env = interval_bounds(program, query.lo[None], query.hi[None])
        by_intervals = bool(bound.interval_rows(*env["output"]).all())
        proved, _ = bound(query.lo[None], query.hi[None])
        gained[bound.integer] += int(bool(proved[0]) and not by_intervals)
        assert by_intervals <= bool(proved[0])
    assert min(gained.values()) >= 1, gained


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), points=st.integers(1, 16))
def test_bounds_contain_every_intermediate_value(seed, points):
    gen = torch.Generator().manual_seed(seed)
    program, image, label, eps = random_query(gen)
    lo, hi = (image - eps).clamp(0, 255), (image + eps).clamp(0, 255)
    u = torch.rand((points, *image.shape), generator=gen, dtype=torch.float64)
    x = (lo + torch.floor(u * (hi - lo + 1).double()).long()).clamp(max=hi)
    values = execute(program, x, keep=True)
    env = interval_bounds(program, lo[None], hi[None])
    for slot, v in values.items():
        if slot == "logits":
            continue
        assert bool((env[slot][0] <= v).all() and (v <= env[slot][1]).all()), slot
    chain = mlp_chain(program)
    if chain is None:
        return
    objective = torch.randn(3, env["output"][0].shape[1], generator=gen, dtype=torch.float64)
    lin = linear_bounds(chain, env[chain.input_slot][0].flatten(1),
                        env[chain.input_slot][1].flatten(1), objective)
    slots = [chain.input_slot, *(s.slot for s in chain.stages)]
    for slot, (v_lo, v_hi) in zip(slots, lin.values, strict=True):
        v = values[slot].flatten(1)
        assert bool((v_lo <= v).all() and (v <= v_hi).all()), slot
    exact = values[slots[-1]].double() @ objective.t()  # (points, 3)
    assert bool((lin.lower <= exact).all())


def test_tie_goes_to_the_lower_index():
    """Outputs clamped to one code tie: the lowest index wins, as torch.argmax decides."""
    w = torch.tensor([[0], [0], [0]])
    ops = (InputOp("x", torch.tensor([0]), 1, torch.tensor([0])), FlattenOp("f", "x"),
           LinearOp("l", "f", 0, w, torch.tensor([5, 5, 5]), torch.ones(3, dtype=torch.float64)),
           OutputOp("l", torch.tensor(1.0, dtype=torch.float64), 0))
    program = Program(ops, (1, 1, 1), {})
    image = torch.tensor([[[7]]])
    assert verify(program, image, 0, 3).status == "robust"
    assert verify(program, image, 2, 3).status == "vulnerable"
    assert verify(program, image, 2, 3, ties="label").status == "robust"
    # per-class scales: outputs 2 and 4 with scales 1 and 1/2 give equal float32 logits
    ops = ops[:2] + (LinearOp("l", "f", 0, torch.zeros(2, 1, dtype=torch.long),
                              torch.tensor([2, 4]), torch.ones(2, dtype=torch.float64)),
                     OutputOp("l", torch.tensor([1.0, 0.5], dtype=torch.float64), 0))
    program = Program(ops, (1, 1, 1), {})
    assert verify(program, image, 0, 3).status == "robust"
    assert verify(program, image, 1, 3).status == "vulnerable"
    assert verify(program, image, 1, 3, ties="label").status == "robust"


@pytest.fixture(scope="module")
def tiny():
    gen = torch.Generator().manual_seed(0)
    return random_program(gen, 4, [3], 3, 3, 3, True, True)


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": -1}, "eps"), ({"eps": 256}, "eps"), ({"eps": 1.5}, "eps"),
    ({"timeout": 0}, "timeout"), ({"timeout": -2.0}, "timeout"),
    ({"image": torch.zeros(1, 2, 2, dtype=torch.long)}, "shape"),
    ({"image": torch.full((1, 1, 4), 300)}, "0..255"),
    ({"label": 3}, "label"), ({"model": torch.nn.Linear(4, 3)}, "Program"),
    ({"ties": "last"}, "tie rule"),
])
def test_bad_input_is_a_config_error(tiny, kwargs, match):
    args = {"model": tiny, "image": torch.zeros(1, 1, 4, dtype=torch.long), "label": 0, "eps": 1,
            "timeout": 5.0, "ties": "first"} | kwargs
    with pytest.raises(ConfigError, match=match):
        verify(args["model"], args["image"], args["label"], args["eps"], args["timeout"],
               ties=args["ties"])


@pytest.mark.parametrize("arch", ["mlp", "small-cnn"])
def test_lowered_twins(digits, arch):
    """Programs lowered from twins (per-channel scales, conv, pooling): intervals hold the
    executor's values; at eps 0 (one point, where intervals are exact) a ReferenceIntegerModel
    and its program are verified robust for their prediction and vulnerable for any other
    label."""
    gen = torch.Generator().manual_seed(1)
    model = build_model(ModelSpec(arch, (1, 8, 8)))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    x, y = digits.test.tensors()
    twin = quantize(model.eval(), "w4a4", calib=x[:64])
    integer = to_integer(twin, "reference")
    program = integer.program((1, 8, 8))
    codes = pixel_codes(x[:3])
    for i in range(3):
        lo, hi = (codes[i] - 3).clamp(0, 255), (codes[i] + 3).clamp(0, 255)
        u = torch.rand((8, *lo.shape), generator=gen, dtype=torch.float64)
        points = (lo + torch.floor(u * (hi - lo + 1).double()).long()).clamp(max=hi)
        env = interval_bounds(program, lo[None], hi[None])
        for slot, v in execute(program, points, keep=True).items():
            if slot != "logits":
                assert bool((env[slot][0] <= v).all() and (v <= env[slot][1]).all()), slot
        pred = int(execute(program, codes[i:i + 1])["logits"].argmax(1))
        for model_or_program in (integer, program):
            assert verify(model_or_program, codes[i], pred, 0, timeout=5.0).status == "robust"
            other = verify(model_or_program, codes[i], (pred + 1) % 10, 0, timeout=5.0,
                           attack_share=0.0)
            assert other.status == "vulnerable" and bool((other.counterexample == codes[i]).all())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), large=st.booleans(), relu=st.booleans())
def test_relaxation_lines_hold_at_every_integer_point(seed, large, relu):
    """Each neuron's lines ``k_l a + b_l <= x(a) <= k_u a + b_u`` checked in exact rational
    arithmetic at every integer a of its box, x(a) the exact requantization (or ReLU);
    multipliers of 8 bits or, as lowering makes them, in [2^30, 2^31) with shifts up to 62."""
    gen = torch.Generator().manual_seed(seed)
    n = 6
    if relu:
        op = ReluOp("r", "a", int(_int(gen, -5, 5)))
        step = step_of_relu(op, n)
    else:
        mult = _int(gen, 2**30, 2**31 - 1, (n,)) if large else _int(gen, 1, 255, (n,))
        shift = (torch.log2(mult.double()).floor().long() + _int(gen, -3, 8, (n,))).clamp(1, 62)
        lo_code, hi_code = sorted(int(v) for v in _int(gen, -40, 40, (2,)))
        term = Term("a", int(_int(gen, -4, 4)), mult, torch.zeros(n, dtype=torch.float64))
        op = RequantOp("q", (term,), shift, int(_int(gen, lo_code, hi_code)), lo_code, hi_code)
        step = step_of_requant(op)
    centre = _int(gen, -2**20, 2**20, (1, n)) if large else _int(gen, -300, 300, (1, n))
    width = _int(gen, 0, 200, (1, n))
    lo, hi = centre - width, centre + width
    assert_lines_hold(step, lo, hi, lambda column: column.clamp(min=op.zero_point) if relu
                      else requantize_exact([column], op))


def assert_lines_hold(step, lo: torch.Tensor, hi: torch.Tensor, exact) -> None:
    """Each neuron i's lines of ``relax(step)`` over the boxes [lo, hi] (1, n), checked in
    exact rational arithmetic at every integer a of its box against ``exact`` (a function of
    an (len, n) accumulator batch with a in column i, returning the true values)."""
    k_l, b_l, k_u, b_u = relax(step, lo.double(), hi.double())
    n = lo.shape[1]
    for i in range(n):
        a = torch.arange(int(lo[0, i]), int(hi[0, i]) + 1)
        column = torch.zeros(len(a), n, dtype=torch.long)
        column[:, i] = a
        x = exact(column)[:, i]
        kl, bl, ku, bu = (Fraction(float(t[0, i])) for t in (k_l, b_l, k_u, b_u))
        for ai, xi in zip(a.tolist(), x.tolist(), strict=True):
            assert kl * ai + bl <= xi <= ku * ai + bu, (i, ai, xi)


def random_conv_program(gen: torch.Generator, image: torch.Tensor) -> Program:
    """Input (2, 2, 2) -> grouped conv -> requant -> window-sum pool -> requant -> lookup table
    -> clamp, joined with a max pool of the first codes -> flatten -> linear (3 classes); the
    input zero points are pixels of ``image``, so that its box crosses many codes."""
    codes = lambda lo, hi, shape=(): _int(gen, lo, hi, shape)  # noqa: E731
    zp = image[:, 0, 0].clone()
    ops: list = [InputOp("x", zp, 1, torch.zeros(2, dtype=torch.long)),
                 GroupConvOp("g", "x", 0, codes(-4, 3, (4, 1, 2, 2)), codes(-60, 60, (4,)), (1, 1),
                             (1, 1), torch.ones(4, dtype=torch.float64), 2)]
    q1, z1 = _requant(gen, "q", "g", 4, 6.0, 3, True, False)
    ops += [q1, WindowSumPoolOp("w", "q", z1, (2, 2), (1, 1), (0, 0))]
    q2, _ = _requant(gen, "q2", "w", 4, 6.0, 3, True, False)
    table = codes(-8, 7, (q2.hi - q2.lo + 1,))
    ops += [q2, LookupOp("t", "q2", q2.lo, table), ClampOp("c", "t", -4, 5),
            MaxPoolOp("m", "q", (2, 2), (1, 1)), ConcatOp("cat", ("c", "m")), FlattenOp("f", "cat"),
            LinearOp("l", "f", int(codes(-2, 2)), codes(-4, 3, (3, 32)), codes(-20, 20, (3,)),
                     torch.ones(3, dtype=torch.float64)),
            OutputOp("l", torch.tensor(1.0, dtype=torch.float64), 0)]
    return Program(tuple(ops), (2, 2, 2), {})


def test_conv_programs_match_enumeration():
    """Intervals alone (no MLP chain) through grouped convolution, window sums, lookup tables,
    clamps, max pools and concatenation: verdicts equal enumeration, intervals hold values."""
    gen = torch.Generator().manual_seed(7)
    counts = {"robust": 0, "vulnerable": 0}
    for k in range(25):
        image = torch.where(_int(gen, 0, 1, (2, 2, 2)) == 0, _int(gen, 0, 255, (2, 2, 2)), 0)
        program = random_conv_program(gen, image)
        assert mlp_chain(program) is None
        points = enumerate_box(image, 1)
        label = int(execute(program, image[None])["logits"].argmax(1))
        if bool(_int(gen, 0, 3) == 0):
            label = int(_int(gen, 0, 2))
        verdict = verify(program, image, label, 1, timeout=30.0, attack_share=0.2 * (k % 2))
        truth = bool(misclassified(program, points, label).any())
        assert verdict.status == ("vulnerable" if truth else "robust")
        counts[verdict.status] += 1
        env = interval_bounds(program, (image - 1).clamp(0, 255)[None], (image + 1)[None])
        for slot, v in execute(program, points, keep=True).items():
            if slot != "logits":
                assert bool((env[slot][0] <= v).all() and (v <= env[slot][1]).all()), slot
    assert min(counts.values()) >= 3, counts


@pytest.mark.parametrize("ties", ["first", "label"])
def test_milp_stage_matches_exhaustive_enumeration(ties):
    """The MILP stage alone (no attack, no input splitting) on random MLP programs with one
    output scale: 'robust' only where no point of the box is misclassified, 'vulnerable' with a
    counterexample the enumeration confirms; undecided (a candidate of the loosened program
    that the executor rejects) at most rarely."""
    from qrobust.verify.search import milp_stage

    gen = torch.Generator().manual_seed(71 + len(ties))
    counts = {"robust": 0, "vulnerable": 0, None: 0}
    while counts["robust"] + counts["vulnerable"] + counts[None] < 150:
        program, image, label, eps = random_query(gen)
        query = make_query(program, image, label, eps, ties)
        bound = Bounder.of(query)
        if bound.chain is None or not bound.integer:
            continue
        status, cex = milp_stage(query, bound, deadline=math.inf)
        counts[status] += 1
        truth = bool(misclassified(program, enumerate_box(image, eps), label, ties).any())
        if status == "robust":
            assert not truth
        elif status == "vulnerable":
            assert truth and bool(misclassified(program, cex[None], label, ties).all())
            assert bool(((cex - image).abs() <= eps).all())
    assert counts[None] <= 2 and min(counts["robust"], counts["vulnerable"]) >= 20, counts


@pytest.mark.parametrize("level", ["switches", "codes", "inputs"])
def test_each_milp_level_alone_is_sound(level):
    """Each level of integrality of :mod:`qrobust.verify.milp` on its own (no candidate
    accepted, so only proofs end it): 'infeasible' only where no point of the box is
    misclassified. The loose levels relax the exact program, so they may prove less, never
    more. Only the two output neurons a margin needs are encoded."""
    from qrobust.verify import milp

    gen = torch.Generator().manual_seed(97 + len(level))
    counts = {"infeasible": 0, "unknown": 0}
    while sum(counts.values()) < 100:
        program, image, label, eps = random_query(gen)
        query = make_query(program, image, label, eps, "first")
        bound = Bounder.of(query)
        if bound.chain is None or not bound.integer:
            continue
        lin = box_bounds(query, bound)[1]
        others = [j for j in range(query.classes) if j != label]
        status, _ = milp.search(bound.chain, lin.values, label, others,
                                [j < label for j in others], math.inf, lambda *_: None,
                                schedule=((level, math.inf),))
        counts[status] += 1
        if status == "infeasible":
            assert not bool(misclassified(program, enumerate_box(image, eps), label).any())
        if isinstance(bound.chain.stages[-1], Step):  # else the output is an expression
            part = milp.encode(bound.chain, lin.values, [others[0], label])[2]
            assert all((e is None) == (k not in (others[0], label)) for k, e in enumerate(part))
    assert min(counts.values()) >= 15, counts


def test_the_fixed_box_search_is_exact_on_its_sub_box(monkeypatch):
    """The neighbourhood search of the MILP stage (:func:`solve_fixed`): from a point with
    fractional inputs, the sub-box keeps the fractional pixels free and fixes the others;
    the dive inside it ends with the exact MILP on that sub-box, so it returns a
    misclassified point of the sub-box whenever enumeration of the sub-box finds a point
    where class j beats the label, and None only when there is none."""
    from qrobust.verify import search
    from qrobust.verify.search import _fixed_box, solve_fixed

    boxes = []  # the sub-boxes the dive makes: more than one per search shows a dive
    fixed_box = search._fixed_box
    monkeypatch.setattr(search, "_fixed_box", lambda q, c: boxes.append(1) or fixed_box(q, c))
    gen = torch.Generator().manual_seed(211)
    counts = {"found": 0, "none": 0, "dived": 0}
    for _ in range(400):
        if min(counts.values()) >= 10 and sum(counts.values()) >= 40:
            break
        program, image, label, eps = random_query(gen)
        query = make_query(program, image, label, eps, "first")
        bound = Bounder.of(query)
        if bound.chain is None or not bound.integer:
            continue
        lo, hi = (v[0].numpy().astype(float) for v in box_bounds(query, bound)[1].values[0])
        centred = lo + torch.rand(len(lo), generator=gen, dtype=torch.float64).numpy() * (hi - lo)
        box = _fixed_box(query, centred)
        if box is None:
            continue
        assert bool(((box[0] >= query.lo) & (box[1] <= query.hi) & (box[0] <= box[1])).all())
        j = int(_int(gen, 0, query.classes - 1))
        if j == label:
            continue
        made = len(boxes)
        found = solve_fixed(query, bound, centred, j, j < label, math.inf)
        counts["dived"] += len(boxes) - made > 1
        points = enumerate_box(image, eps).view(-1, *image.shape)
        inside = ((points >= box[0]) & (points <= box[1])).flatten(1).all(1)
        logits = execute(program, points[inside])["logits"]
        # class j beats the label (ties to the lowest index, as the executor's argmax)
        wins = logits[:, j] >= logits[:, label] if j < label else logits[:, j] > logits[:, label]
        if found is None:
            counts["none"] += 1
            assert not bool(wins.any())
        else:  # a rounded relaxed point of the dive may lose to a class other than j
            counts["found"] += 1
            assert bool(((found >= box[0]) & (found <= box[1])).all())
            assert bool(misclassified(program, found[None], label).all())
    assert min(counts.values()) >= 10, counts
