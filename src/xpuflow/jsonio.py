"""JSON on the request path: orjson (several times faster than the standard library on the small documents
every request carries: the upstream's request body, its answer, every streamed event, the gateway's own
answer), with the standard library for what orjson refuses::

    body = dumps({"model": "m", "messages": messages})   # bytes, compact, UTF-8
    data = loads(raw)                                      # bytes or str

- ``dumps`` writes what ``json.dumps(value, ensure_ascii=False, separators=(",", ":"))`` writes, as
  UTF-8 bytes (floats may be spelled differently, as the same number). What orjson refuses goes through
  the standard library: a string with a lone surrogate (replaced by ``?``, so that a finished answer does
  not become a 500), an integer past 64 bits, a key that is not a string. A NaN or an infinity, which
  ``json`` writes as a bare ``NaN`` (not JSON), orjson writes as ``null``.
- ``loads`` reads what ``json.loads`` reads: what orjson refuses (``NaN``, ``Infinity``) goes through the
  standard library, which also raises the ``ValueError`` for what is not JSON. One difference: an integer
  past 64 bits comes back as the nearest float. That is why only model servers' answers are read here
  (their numbers are counts, timestamps and log-probabilities); a client's request body is read by
  ``serving.openai_schema``, with the standard library's exact integers and its error messages.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dumps", "loads"]

_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON; see the module docstring."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _ENCODE(value).encode("utf-8", "replace")


def loads(data: bytes | str) -> Any:
    """The JSON document ``data``; ValueError when it is not one. See the module docstring."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
