"""``load_json`` reads a client's body with orjson where that gives what the standard library gives, and
with the standard library otherwise: the same values (integers past 64 bits exact), the same 400s."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpuflow.serving.openai_schema import APIError, load_json

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()  # past 64 bits too
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()  # lone surrogates too
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)
)


def reference(body: bytes) -> Any:
    """What the standard library alone gave (load_json before orjson)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return ("error", f"the request body is not valid JSON: {exc}")
    return data


def same(a: Any, b: Any) -> bool:
    # NaN is not equal to itself: compare the documents as the standard library writes them back
    return type(a) is type(b) and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(), VALUES, max_size=6), st.booleans())
def test_objects_read_as_the_standard_library_reads_them(document: dict[str, Any], ascii_only: bool) -> None:
    body = json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    expected = reference(body)
    refused: APIError | None = None
    got: Any = None
    try:
        got = load_json(body)
    except APIError as exc:
        refused = exc
    if refused is not None:
        # the only refusals here: invalid UTF-8 (a lone surrogate written raw) and the surrogate check
        assert isinstance(expected, tuple) or "surrogate" in refused.message
        return
    assert not isinstance(expected, tuple)
    assert same(got, expected)
    assert json.dumps(got) == json.dumps(expected)  # ints stay ints, at their exact value


@pytest.mark.parametrize(
    "body",
    [
        b'{"seed": 123456789012345678901234567890}',
        b'{"seed": -9223372036854775809, "max_tokens": 18446744073709551616}',
        b'{"temperature": NaN, "top_p": Infinity}',
        b'{"a": 1e400}',
        b'\xef\xbb\xbf{"model": "m"}',
        b'{"a": "\\ud83d\\ude00"}',
    ],
)
def test_what_orjson_reads_otherwise_or_refuses_goes_to_the_standard_library(body: bytes) -> None:
    got = load_json(body)
    assert same(got, json.loads(body))
    assert json.dumps(got) == json.dumps(json.loads(body))


@pytest.mark.parametrize(
    "body", [b"{", b'{"a": 1,}', b"[1, 2]", b'"text"', b'{"a": tru}', b"{'a': 1}", b'{"a": "\xff"}']
)
def test_what_is_no_json_object_gets_the_same_400(body: bytes) -> None:
    with pytest.raises(APIError) as caught:
        load_json(body)
    assert caught.value.status == 400
    expected = reference(body)
    if isinstance(expected, tuple):
        assert caught.value.message == expected[1]
    else:
        assert "must be a JSON object" in caught.value.message


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"max_tokens": 16, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["x"], "user": "u"},
        {"max_completion_tokens": 8.0, "max_tokens": None, "stop": "end", "stream": True},
        {"temperature": None, "top_p": None, "seed": None, "stop": None, "n": 1, "user": ""},
    ],
)
def test_parsed_params_equal_the_constructors(extra: dict[str, Any]) -> None:
    import dataclasses

    from xpuflow.backends.base import GenerationParams
    from xpuflow.serving.openai_schema import parse_chat
    from xpuflow.serving.settings import GatewaySettings

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    params = parse_chat(body, GatewaySettings()).params
    names = [f.name for f in dataclasses.fields(GenerationParams)]
    assert sorted(vars(params)) == sorted(names)
    assert params == GenerationParams(**{name: getattr(params, name) for name in names})
    assert isinstance(params.stop, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_tokens = 1  # type: ignore[misc]
