"""The official ``openai`` Python client, unchanged, against the gateway on a real socket (uvicorn with
uvloop and httptools on 127.0.0.1, in a thread, stopped at teardown), over the fake engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from gateway_server import Server

from xpuflow.errors import AdmissionRejected
from xpuflow.serving.settings import GatewaySettings
from xpuflow.testing.fake_engine import FakeEngine

pytestmark = pytest.mark.e2e

KEY = "sk-test-0123456789"
MAX_BODY_BYTES = 64 * 1024
SETTINGS = GatewaySettings(api_keys={KEY: "tests"}, max_body_bytes=MAX_BODY_BYTES, request_timeout_s=30)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server(FakeEngine(chunk_interval_s=0.001), SETTINGS)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=10) as client:
        yield client


MESSAGES: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three four"}]


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=16, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "four three two one"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 4


def test_chat_response_headers_say_where_it_ran(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, extra_headers={"x-xpuflow-tier": "tier_low", "x-priority": "low"}
    )
    assert raw.headers["x-xpuflow-tier"] == "tier_low"
    assert raw.headers["x-xpuflow-worker"] == "chat/tier_low/0"
    assert raw.headers["x-xpuflow-device"] == "cpu"
    assert raw.headers["x-xpuflow-route-reason"].startswith("override:")
    assert raw.parse().choices[0].message.content == "four three two one"


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "four three two one"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_async_client_streams_too(server: Server) -> None:
    async def main() -> str:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key=KEY, max_retries=0, timeout=10
        ) as client:
            stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(asyncio.wait_for(main(), timeout=20)) == "four three two one"


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="chat", prompt="alpha beta gamma", max_tokens=2)
    assert reply.choices[0].text == "gamma beta"
    assert reply.choices[0].finish_reason == "length"
    streamed = client.completions.create(model="chat", prompt="alpha beta", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == "beta alpha"


def test_embeddings_default_base64_and_float(client: openai.OpenAI) -> None:
    packed = client.embeddings.create(model="embed", input=["hello", "world"])  # the client asks for base64
    floats = client.embeddings.create(model="embed", input=["hello", "world"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert len(floats.data[0].embedding) == 8
    for a, b in zip(packed.data, floats.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, rel=1e-6)
    assert floats.data[0].embedding != floats.data[1].embedding


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["chat", "embed"]
    assert client.models.retrieve("embed").id == "embed"


def test_wrong_key_is_401(server: Server) -> None:
    with (
        openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0) as client,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        client.models.list()
    assert info.value.status_code == 401


def test_unknown_model_is_404_listing_the_models(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert "chat, embed" in info.value.message
    assert info.value.body["param"] == "model"  # type: ignore[index]


def test_bad_field_is_422_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="chat", messages=MESSAGES, temperature=5)
    assert info.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="chat", messages=MESSAGES, n=3)
    assert info.value.body["param"] == "n"  # type: ignore[index]


def test_bad_header_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", messages=MESSAGES, extra_headers={"x-priority": "asap"})
    assert info.value.body["param"] == "x-priority"  # type: ignore[index]


def test_body_over_the_limit_is_413(client: openai.OpenAI) -> None:
    huge = [{"role": "user", "content": "word " * (MAX_BODY_BYTES // 4)}]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="chat", messages=huge)  # type: ignore[arg-type]
    assert info.value.status_code == 413


def test_admission_rejection_is_429_with_retry_after(server: Server, client: openai.OpenAI) -> None:
    server.engine.fail_next(AdmissionRejected("qos class 'batch' is over its share", retry_after_s=2.5))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="chat", messages=MESSAGES)
    assert info.value.response.headers["retry-after"] == "3"
    assert "over its share" in info.value.message


def test_closing_a_stream_cancels_the_call(server: Server) -> None:
    slow = FakeEngine(chunk_interval_s=0.05)
    gateway = Server(slow, SETTINGS)
    gateway.start()
    try:
        with openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0, timeout=10) as client:
            words = " ".join(f"w{i}" for i in range(200))  # 200 chunks, 10 s if nobody stops it
            stream = client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": words}], stream=True, max_tokens=500
            )
            for seen, _ in enumerate(stream):
                if seen == 3:
                    break
            stream.close()
        deadline = time.monotonic() + 5
        while not slow.calls[-1].cancelled.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slow.calls[-1].cancelled.is_set()
        assert slow.workers["chat/tier_high/0"].in_flight == 0
    finally:
        gateway.stop()
