"""A minimal, very fast mock OpenAI server for gateway benchmarks: HTTP/1.1 keep-alive on raw asyncio.

Every ``POST`` gets the same chat completion (a ``"stream": true`` request gets it as SSE events), every
``GET`` a one-model list (so a router's ``GET /health`` probe finds it healthy), so what a benchmark
measures is the client and the gateway in between, not this server. Runs on uvloop when it is installed::

    python benchmarks/mock_upstream.py --port 9100      # prints "ready <port>" when listening

With no options every answer goes out at once, from a precomputed buffer. Options make it a slow or
faulty model server (``benchmarks/reliability.py`` drives these):

- ``--delay-s D``: every ``POST`` waits D seconds before its response head (a queue or a prefill);
- ``--stream-tokens N --token-delay-s T``: a stream sends N token events T seconds apart, in chunked
  encoding as each is due; a non-streamed answer waits N x T (it generates the same tokens);
- ``POST /admin/fail`` with ``{"seconds": S}``: every request but ``/admin/*`` gets a 500 for the next
  S seconds (``{"seconds": 0}`` heals at once), as a server whose engine died does; the answer says
  until when, in ``time.monotonic()`` (one clock for every process on Linux);
- ``GET /admin/stats``: requests answered, by kind and status, and the most in flight at once.

Each instance is one process, so a benchmark can SIGSTOP, SIGCONT or kill -9 it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "mock",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
    },
    separators=(",", ":"),
).encode()

_CHUNK = '{"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1700000000,"model":"mock",'


def _event(word: str | None) -> bytes:
    delta = (
        '{"content":"' + word + '"},"finish_reason":null' if word is not None else '{},"finish_reason":"stop"'
    )
    return b"data: " + (_CHUNK + '"choices":[{"index":0,"delta":' + delta + "}]}").encode() + b"\n\n"


WORDS = ("Hello!", " How", " can", " I", " help?")
STREAM_END_EVENTS = _event(None) + b"data: [DONE]\n\n"
STREAM = b"".join(_event(word) for word in WORDS) + STREAM_END_EVENTS
MODELS = json.dumps(
    {"object": "list", "data": [{"id": "mock", "object": "model", "owned_by": "mock"}]}
).encode()
FAILURE = json.dumps(
    {"error": {"message": "mock upstream: failing on purpose", "type": "server_error", "code": 500}}
).encode()


def _response(body: bytes, content_type: bytes = b"application/json", status: bytes = b"200 OK") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: keep-alive\r\n\r\n"
        + body
    )


POST_RESPONSE = _response(COMPLETION)
STREAM_RESPONSE = _response(STREAM, b"text/event-stream")
GET_RESPONSE = _response(MODELS)
FAIL_RESPONSE = _response(FAILURE, status=b"500 Internal Server Error")
CHUNKED_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
    b"connection: keep-alive\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Behaviour:
    """What the server does: its delays, its failure window and what it has counted."""

    def __init__(self, delay_s: float, stream_tokens: int, token_delay_s: float) -> None:
        self.delay_s = delay_s
        self.stream_tokens = stream_tokens
        self.token_delay_s = token_delay_s
        self.fail_until = 0.0
        self.counts: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.started = time.time()

    @property
    def slow(self) -> bool:
        return self.delay_s > 0 or self.token_delay_s > 0 or self.stream_tokens != len(WORDS)

    def failing(self) -> bool:
        return time.monotonic() < self.fail_until

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def stats(self) -> bytes:
        return json.dumps(
            {
                "counts": self.counts,
                "max_in_flight": self.max_in_flight,
                "in_flight": self.in_flight,
                "failing_for_s": max(0.0, self.fail_until - time.monotonic()),
                "uptime_s": time.time() - self.started,
            }
        ).encode()


class MockOpenAI(asyncio.Protocol):
    """Parses just enough HTTP/1.1: the request line, Content-Length, the body; pipelining works
    (a slow answer holds the ones behind it on the same connection, in order)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.buffer = b""
        self.transport: Any = None
        self.pending: asyncio.Queue[tuple[bytes, bytes]] | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = self.buffer[end + 4 : total]
            self.buffer = self.buffer[total:]
            self._handle(head, body)

    def _handle(self, head: bytes, body: bytes) -> None:
        behaviour = self.behaviour
        target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
        if self.pending is None and not target.startswith(b"/admin"):
            if behaviour.failing():
                behaviour.count("500")
                self.transport.write(FAIL_RESPONSE)
                return
            if not head.startswith(b"POST"):
                behaviour.count("get")
                self.transport.write(GET_RESPONSE)
                return
            if not behaviour.slow:  # the fast path: one precomputed write
                streaming = b'"stream":true' in body.replace(b" ", b"")
                behaviour.count("stream" if streaming else "completion")
                self.transport.write(STREAM_RESPONSE if streaming else POST_RESPONSE)
                return
        if self.pending is None:
            self.pending = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._answer_in_order())
        self.pending.put_nowait((head, body))

    async def _answer_in_order(self) -> None:
        assert self.pending is not None
        while True:
            head, body = await self.pending.get()
            await self._answer(head, body)

    async def _answer(self, head: bytes, body: bytes) -> None:
        behaviour = self.behaviour
        target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
        if target.startswith(b"/admin/fail"):
            seconds = float(json.loads(body or b"{}").get("seconds", 0))
            behaviour.fail_until = time.monotonic() + seconds
            answer = {"failing_for_s": seconds, "until_monotonic": behaviour.fail_until}
            self.transport.write(_response(json.dumps(answer).encode()))
            return
        if target.startswith(b"/admin/stats"):
            self.transport.write(_response(behaviour.stats()))
            return
        if behaviour.failing():
            behaviour.count("500")
            self.transport.write(FAIL_RESPONSE)
            return
        if not head.startswith(b"POST"):
            behaviour.count("get")
            self.transport.write(GET_RESPONSE)
            return
        streaming = b'"stream":true' in body.replace(b" ", b"")
        behaviour.in_flight += 1
        behaviour.max_in_flight = max(behaviour.max_in_flight, behaviour.in_flight)
        try:
            if behaviour.delay_s > 0:
                await asyncio.sleep(behaviour.delay_s)
            if not streaming:
                await asyncio.sleep(behaviour.stream_tokens * behaviour.token_delay_s)
                self.transport.write(POST_RESPONSE)
                behaviour.count("completion")
                return
            self.transport.write(CHUNKED_STREAM_HEAD)
            for index in range(behaviour.stream_tokens):
                if index and behaviour.token_delay_s > 0:
                    await asyncio.sleep(behaviour.token_delay_s)
                if self.transport.is_closing():
                    behaviour.count("stream_abandoned")
                    return
                self.transport.write(_chunk(_event(WORDS[index % len(WORDS)])))
            self.transport.write(_chunk(STREAM_END_EVENTS) + b"0\r\n\r\n")
            behaviour.count("stream")
        finally:
            behaviour.in_flight -= 1


async def serve(host: str, port: int, behaviour: Behaviour) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: MockOpenAI(behaviour), host, port, backlog=1024)
    print(f"ready {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--delay-s", type=float, default=0.0, help="wait before every POST's answer")
    parser.add_argument("--stream-tokens", type=int, default=len(WORDS), help="token events per stream")
    parser.add_argument("--token-delay-s", type=float, default=0.0, help="seconds between token events")
    args = parser.parse_args()
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    run(serve(args.host, args.port, Behaviour(args.delay_s, args.stream_tokens, args.token_delay_s)))


if __name__ == "__main__":
    main()
