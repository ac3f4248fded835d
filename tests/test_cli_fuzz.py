"""The CLI's numeric options, fuzzed: every value is either accepted within its rule or refused
with argparse's error type (one line), never anything else."""
from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixkv.cli import args as a

RULES = {  # validator -> the rule an accepted value must satisfy (written here, not taken from the code)
    a.positive_int: lambda v: type(v) is int and v >= 1,
    a.count: lambda v: type(v) is int and v >= 0,
    a.port: lambda v: type(v) is int and 1 <= v <= 65535,
    a.unit_interval: lambda v: type(v) is float and 0 <= v <= 1,
    a.non_negative: lambda v: type(v) is float and math.isfinite(v) and v >= 0,
    a.keep_fraction: lambda v: type(v) is float and 0 < v <= 1,
    a.keep_fractions: lambda v: isinstance(v, tuple) and v and all(type(x) is float and 0 < x <= 1 for x in v),
}

numbers = st.one_of(st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True)).map(repr)
texts = st.one_of(numbers, st.text(max_size=30), st.lists(numbers, max_size=4).map(",".join),
                  st.sampled_from(["", " ", "1e309", "-0", "0x10", "1_000", "nan", "inf", "+1", "0.2,", ",0.2", "1,,2"]))


@pytest.mark.parametrize("validator", list(RULES), ids=lambda f: f.__name__)
@settings(max_examples=1000, deadline=None, database=None)
@given(text=texts)
def test_numeric_options_accept_only_valid_values(validator, text):
    try:
        value = validator(text)
    except argparse.ArgumentTypeError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert RULES[validator](value), (text, value)
