"""Exactness: the requantization roundings of imported files ("tflite", "ruy") against
plain-Python transcriptions of the integer formulas (gemmlowp / TFLite common.h, ruy), ties
included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qrobust.errors import ConfigError
from qrobust.integer.program import RequantOp, Term
from qrobust.integer.reference import requantize

WIDE = (-(2**40), 2**40)


def srdhm(a: int, b: int) -> int:
    """SaturatingRoundingDoublingHighMul (no saturation case: b > 0)."""
    ab = a * b
    q = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
    return q // 2**31 if q >= 0 else -((-q) // 2**31)  # C++ division truncates toward zero


def rdbpot(x: int, e: int) -> int:
    """RoundingDivideByPOT: half away from zero."""
    mask = (1 << e) - 1
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if (x & mask) > threshold else 0)


def tflite(x: int, m: int, exponent: int, left: int = 0) -> int:
    """MultiplyByQuantizedMultiplier((x << left), m, exponent)."""
    return rdbpot(srdhm(x * 2 ** (left + max(exponent, 0)), m), max(-exponent, 0))


def ruy(x: int, m: int, exponent: int) -> int:
    """ruy: sqrdmulh-like high product and rounding shift, both rounding half up."""
    h = (x * 2 ** max(exponent, 0) * m + (1 << 30)) >> 31
    right = max(-exponent, 0)
    return (h + ((1 << right) >> 1)) >> right


def run(rounding: str, xs: list[int], m: int, shift: int, left_shift: int = 0) -> list[int]:
    op = RequantOp("y", (Term("x", 0, torch.tensor([m]), torch.tensor([0.0])),),
                   torch.tensor([shift]), 0, *WIDE, rounding=rounding, left_shift=left_shift)
    out = requantize([torch.tensor(xs, dtype=torch.float64).view(-1, 1)], op)
    return [int(v) for v in out.view(-1)]


@pytest.mark.parametrize("exponent", [-12, -5, -1, 0, 2])
def test_tflite_and_ruy_match_the_formulas(exponent):
    rng = np.random.default_rng(exponent + 20)
    m = int(rng.integers(2**30, 2**31))
    xs = [int(v) for v in rng.integers(-(2**20), 2**20, size=2000)]
    assert run("tflite", xs, m, 31 - exponent) == [tflite(x, m, exponent) for x in xs]
    assert run("ruy", xs, m, 31 - exponent) == [ruy(x, m, exponent) for x in xs]


def test_ties_each_way():
    # m = 2^30 (one half), exponent -1: x / 4; the high product x / 2 ties for odd x (up), the
    # shift ties for x = +-2 mod 4 (TFLite: away from zero; ruy: up)
    xs = [-6, -5, -2, 2, 5, 6]
    assert run("tflite", xs, 2**30, 32) == [tflite(x, 2**30, -1) for x in xs] == [-2, -1, -1, 1, 2, 2]
    assert run("ruy", xs, 2**30, 32) == [ruy(x, 2**30, -1) for x in xs] == [-1, -1, 0, 1, 2, 2]
    assert run("fixed", xs, 2**30, 32) == [-1, -1, 0, 1, 1, 2]  # one rounding, half up


def test_add_left_shift():
    rng = np.random.default_rng(1)
    xs = [int(v) for v in rng.integers(-255, 256, size=500)]
    m = 1518500250  # ~ 2^30.5
    assert run("tflite", xs, m, 31 + 3, left_shift=20) == [tflite(x, m, -3, left=20) for x in xs]


def test_tflite_terms_need_one_multiplier():
    terms = tuple(Term(s, 0, torch.tensor([m]), torch.tensor([0.0]))
                  for s, m in (("a", 2**30), ("b", 2**30 + 1)))
    op = RequantOp("y", terms, torch.tensor([31]), 0, *WIDE, rounding="tflite")
    with pytest.raises(ConfigError, match="one multiplier"):
        requantize([torch.zeros(1, 1), torch.zeros(1, 1)], op)


def test_unknown_rounding():
    with pytest.raises(ConfigError, match="unknown requantization rounding 'even'; valid: fixed"):
        RequantOp("y", (), torch.tensor([31]), 0, 0, 1, rounding="even")
