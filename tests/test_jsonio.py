"""xpuflow.jsonio: orjson's speed with the standard library's results where they differ."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xpuflow import jsonio

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(_JSON)
def test_dumps_writes_what_the_standard_library_reads_back_the_same(value: object) -> None:
    assert json.loads(jsonio.dumps(value)) == value
    assert jsonio.loads(jsonio.dumps(value)) == value


def test_dumps_is_compact_utf8() -> None:
    assert jsonio.dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()


def test_what_orjson_refuses_to_write_goes_through_the_standard_library() -> None:
    # a lone surrogate in model output is replaced, not a 500
    assert jsonio.dumps({"text": "ok \ud800"}) == b'{"text":"ok ?"}'
    assert jsonio.dumps({"n": 2**70}) == b'{"n":1180591620717411303424}'
    assert jsonio.dumps({1: "one"}) == b'{"1":"one"}'


def test_nan_and_infinity_are_written_as_null_which_is_json() -> None:
    assert jsonio.dumps([math.nan, math.inf]) == b"[null,null]"


def test_what_orjson_refuses_to_read_goes_through_the_standard_library() -> None:
    value = jsonio.loads(b'{"logprob": NaN, "top": -Infinity}')
    assert math.isnan(value["logprob"])
    assert value["top"] == -math.inf
    assert jsonio.loads('{"text": "caf\\u00e9"}') == {"text": "café"}


def test_what_is_not_json_raises_the_standard_librarys_value_error() -> None:
    with pytest.raises(ValueError, match="Expecting value"):
        jsonio.loads(b"not json")
    with pytest.raises(ValueError, match="Expecting value"):
        jsonio.loads(b"")
