"""No client mistake gets a 500: generated garbage bodies, wrong types and odd headers all get a 4xx
(or, when the mutation happens to be valid, a 200), always in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xpuflow.serving.app import create_app
from xpuflow.serving.settings import GatewaySettings
from xpuflow.testing.fake_engine import FakeEngine

KEY = "sk-test-0123456789"
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": "chat",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 4,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["x"],
        "stream": False,
        "seed": 1,
    },
    "/v1/completions": {"model": "chat", "prompt": "hello there", "max_tokens": 4, "stream": False},
    "/v1/embeddings": {"model": "embed", "input": ["hello", "there"], "encoding_format": "float"},
}
FIELDS = sorted(
    {
        *(f for body in VALID.values() for f in body),
        "n",
        "stream_options",
        "max_completion_tokens",
        "tools",
        "response_format",
        "logprobs",
        "echo",
        "best_of",
        "suffix",
        "dimensions",
    }
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def app() -> Any:
    return create_app(
        FakeEngine(),
        GatewaySettings(api_keys={KEY: "fuzz"}, admin_keys={"adm-0123456789": "ops"}, max_body_bytes=4096),
    )


async def _call(app: Any, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """One request straight through the ASGI interface; the body arrives in two pieces."""
    pieces = [body[: len(body) // 2], body[len(body) // 2 :]]
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        if pieces:
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
        await asyncio.sleep(3600)  # the client stays connected until the test ends
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            chunks.append(message.get("body", b""))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"authorization", f"Bearer {KEY}".encode()),
            (b"content-type", b"application/json"),
            *headers,
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return status, b"".join(chunks)


def post(
    loop: asyncio.AbstractEventLoop, app: Any, path: str, body: bytes, **headers: str
) -> tuple[int, bytes]:
    raw = [(k.replace("_", "-").encode(), v.encode("latin-1")) for k, v in headers.items()]
    return loop.run_until_complete(_call(app, path, body, raw))


def check(status: int, body: bytes) -> None:
    assert status < 500, body
    if status >= 400:
        error = json.loads(body)["error"]
        assert error["message"]
        assert error["type"]
        if status == 422:
            assert error["param"], error  # a schema error names its field


@SETTINGS
@given(path=st.sampled_from(PATHS), body=st.binary(max_size=300))
def test_random_bytes_get_4xx(loop: asyncio.AbstractEventLoop, app: Any, path: str, body: bytes) -> None:
    status, answer = post(loop, app, path, body)
    check(status, answer)
    assert status >= 400


@SETTINGS
@given(path=st.sampled_from(PATHS), value=json_values)
def test_any_json_value_gets_a_clear_answer(
    loop: asyncio.AbstractEventLoop, app: Any, path: str, value: Any
) -> None:
    check(*post(loop, app, path, json.dumps(value).encode()))


@SETTINGS
@given(path=st.sampled_from(PATHS), field=st.sampled_from(FIELDS), value=json_values)
def test_one_field_with_a_wrong_type_or_value(
    loop: asyncio.AbstractEventLoop, app: Any, path: str, field: str, value: Any
) -> None:
    body = {**VALID[path], field: value}
    check(*post(loop, app, path, json.dumps(body).encode()))


@SETTINGS
@given(
    message=st.dictionaries(
        st.sampled_from(["role", "content", "name", "tool_calls"]), json_values, max_size=3
    ),
    position=st.integers(min_value=0, max_value=2),
)
def test_odd_chat_messages(
    loop: asyncio.AbstractEventLoop, app: Any, message: dict[str, Any], position: int
) -> None:
    messages: list[Any] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    messages.insert(position, message)
    body = {"model": "chat", "messages": messages, "stream": position == 1}
    check(*post(loop, app, "/v1/chat/completions", json.dumps(body).encode()))


@SETTINGS
@given(
    name=st.sampled_from(["x-priority", "x-qos-class", "x-xpuflow-tier", "authorization", "content-length"]),
    value=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=80),
)
def test_odd_header_values(loop: asyncio.AbstractEventLoop, app: Any, name: str, value: str) -> None:
    body = json.dumps(VALID["/v1/chat/completions"]).encode()
    status, answer = post(loop, app, "/v1/chat/completions", body, **{name.replace("-", "_"): value})
    check(status, answer)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "chat", "messages": [{"role": "user", "content": "\\udfff"}]}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "ok"}], "max_tokens": NaN}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "ok"}], "temperature": Infinity}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "ok"}], "seed": 1e400}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "ok"}], "max_tokens": 2.5}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "ok"}], "stop": {"a": 1}}',
        b'{"model": ["chat"], "messages": []}',
        b'{"model": "chat", "messages": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
        b"\xef\xbb\xbf{}",
        b"null",
        b'"a string"',
    ],
)
def test_known_awkward_bodies(loop: asyncio.AbstractEventLoop, app: Any, body: bytes) -> None:
    status, answer = post(loop, app, "/v1/chat/completions", body)
    check(status, answer)
    assert 400 <= status < 500
