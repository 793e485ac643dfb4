"""Recipes and QuantSpec: parsing, validation, ranges, round trips."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrobust.errors import ConfigError
from qrobust.quant import QuantSpec, Recipe, parse_recipe


@pytest.mark.parametrize("text", ["w0a8", "w33", "w8a0", "a", "", "x4a4", "w4a4,nonsense",
                                  "w4a4,first=w0", "w4a4,obs=median", "w4a4,clip=abc",
                                  "w4a8,bias", "w17a8"])
def test_invalid_recipes_raise_config_error(text):
    with pytest.raises(ConfigError):
        parse_recipe(text)


def test_basic_recipes():
    r = parse_recipe("w4a8")
    assert (r.weight.bits, r.act.bits) == (4, 8)
    assert r.weight.signed and r.weight.symmetric and r.weight.granularity == "channel"
    assert not r.act.signed and r.act.granularity == "tensor"
    w3 = parse_recipe("w3")
    assert w3.weight.bits == 3 and w3.act is None
    assert parse_recipe("w8a8,pt").weight.granularity == "tensor"
    assert parse_recipe("w2a2,obs=percentile").act.observer == "percentile"
    assert parse_recipe("w4a4,relu6").act.clip == 6.0
    assert parse_recipe("w4a4,stochastic").weight.rounding == "stochastic"


def test_gorsline_setting():
    r = parse_recipe("gorsline3")
    assert r.act is None and r.quantize_bias
    assert r.weight == QuantSpec(3, granularity="tensor", clip=1.0)


def test_overrides_first_last():
    r = parse_recipe("w4a4,first=8,last=w8a8,4.conv1=w2")
    assert r.weight_spec("3", ("first",)).bits == 8
    assert r.act_spec("12", ("last",)).bits == 8
    assert r.weight_spec("4.conv1").bits == 2 and r.act_spec("4.conv1").bits == 4
    assert r.weight_spec("6").bits == 4


@given(st.integers(1, 16), st.booleans(), st.booleans())
def test_code_ranges(bits, signed, symmetric):
    s = QuantSpec(bits, signed=signed, symmetric=symmetric)
    levels = s.qmax - s.qmin + 1
    if not signed:
        assert (s.qmin, levels) == (0, 2**bits)
    elif bits == 1:
        assert (s.qmin, s.qmax) == (-1, 1)  # the sign quantizer: codes -1, +1
    elif symmetric:
        assert s.qmin == -s.qmax and levels == 2**bits - 1
    else:
        assert levels == 2**bits


@given(st.integers(1, 16), st.integers(1, 16), st.sampled_from(["", ",pt", ",asym", ",relu6"]))
def test_recipe_dict_round_trip(wb, ab, opt):
    r = parse_recipe(f"w{wb}a{ab},first=8{opt}")
    assert Recipe.from_dict(r.to_dict()) == r
