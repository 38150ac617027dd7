"""The OpenAI wire helpers: request bodies, response parsing and the incremental SSE decoder."""

from __future__ import annotations

import json

import pytest

from xpuflow.backends.base import GenerationParams, StreamChunk
from xpuflow.backends.remote.openai_wire import (
    DONE,
    SSEDecoder,
    chat_request,
    completion_from_response,
    completion_request,
    embeddings_from_response,
    error_message,
    stream_chunk,
)


def test_request_bodies_carry_sampling_fields() -> None:
    params = GenerationParams(max_tokens=5, temperature=0.5, top_p=0.9, stop=("\n",), seed=3)
    body = chat_request("m", [{"role": "user", "content": "hi"}], params, stream=True)
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 5,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["\n"],
        "seed": 3,
    }
    plain = completion_request("m", "Once", GenerationParams(max_tokens=2))
    assert plain["prompt"] == "Once"
    assert plain["stream"] is False
    assert "stop" not in plain
    assert "seed" not in plain
    json.dumps(body)  # serialisable as it is


def test_completion_from_chat_and_text_responses() -> None:
    chat = {
        "model": "srv",
        "choices": [{"message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1},
    }
    reply = completion_from_response(chat)
    assert (reply.text, reply.prompt_tokens, reply.completion_tokens, reply.model) == ("Paris", 9, 1, "srv")
    text = {"choices": [{"text": "abc", "finish_reason": "length"}]}
    reply = completion_from_response(text, default_model="fallback")
    assert (reply.text, reply.finish_reason, reply.model, reply.prompt_tokens) == (
        "abc",
        "length",
        "fallback",
        0,
    )
    assert (
        completion_from_response({"choices": [{"text": "x", "finish_reason": "eos"}]}).finish_reason == "stop"
    )
    with pytest.raises(ValueError, match="no choices"):
        completion_from_response({"object": "error"})


def test_stream_chunks_skip_empty_events() -> None:
    assert stream_chunk({"choices": [{"delta": {"role": "assistant"}}]}) is None
    # a usage-only event (stream_options.include_usage) carries the token counts
    usage = stream_chunk({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})
    assert usage == StreamChunk("", None, prompt_tokens=5, completion_tokens=3)
    assert stream_chunk({"choices": [], "usage": {"completion_tokens": "x", "prompt_tokens": -1}}) is None
    chunk = stream_chunk({"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]})
    assert chunk is not None
    assert (chunk.text, chunk.finish_reason) == ("Hi", None)
    last = stream_chunk({"choices": [{"text": "", "finish_reason": "length"}]})
    assert last is not None
    assert last.finish_reason == "length"


def test_embeddings_come_back_in_input_order() -> None:
    body = {"data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1, 0]}]}
    assert embeddings_from_response(body, 2) == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="1 vectors for 2 inputs"):
        embeddings_from_response({"data": [{"index": 0, "embedding": [1.0]}]}, 2)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"error": {"message": "model x not found", "type": "invalid_request_error"}}', "model x not found"),
        ('{"detail": "Not Found"}', "Not Found"),
        ('{"error": "Input validation error"}', "Input validation error"),
        ("<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
        ("", "(empty body)"),
    ],
)
def test_error_message_finds_the_server_text(body: str, message: str) -> None:
    assert error_message(body) == message


def test_error_message_is_shortened() -> None:
    assert len(error_message("x" * 10_000)) < 600


def test_sse_decoder_handles_any_split() -> None:
    stream = (
        b": keep-alive comment\r\n\r\n"
        b'data: {"t": "caf\xc3\xa9"}\r\n\r\n'
        b"event: message\ndata: line one\ndata: line two\n\n"
        b"data:nospace\r\rdata: [DONE]\n\n"
    )
    expected = ['{"t": "café"}', "line one\nline two", "nospace", DONE]
    for size in range(1, len(stream) + 1):  # every way of cutting the stream into equal reads
        decoder = SSEDecoder()
        events: list[str] = []
        for start in range(0, len(stream), size):
            events.extend(decoder.feed(stream[start : start + size]))
        events.extend(decoder.flush())
        assert events == expected, f"read size {size}"


def test_sse_decoder_returns_each_event_as_soon_as_it_ends() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\n") == ["a"]
    assert decoder.feed(b"data: b") == []
    assert decoder.flush() == ["b"]  # a stream cut without its final blank line
