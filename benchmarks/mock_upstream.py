"""A minimal, very fast mock OpenAI server for gateway benchmarks: HTTP/1.1 keep-alive on raw asyncio.

Every ``POST`` gets the same chat completion at once (a ``"stream": true`` request gets it as SSE
events), every ``GET`` a one-model list, so what a benchmark measures is the client and the gateway in
between, not this server. Runs on uvloop when it is installed::

    python benchmarks/mock_upstream.py --port 9100      # prints "ready <port>" when listening
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
STREAM = b"".join(
    [
        b"data: "
        + (
            _CHUNK + '"choices":[{"index":0,"delta":{"content":"' + word + '"},"finish_reason":null}]}'
        ).encode()
        + b"\n\n"
        for word in ("Hello!", " How", " can", " I", " help?")
    ]
    + [
        b"data: "
        + (_CHUNK + '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}').encode()
        + b"\n\n",
        b"data: [DONE]\n\n",
    ]
)
MODELS = json.dumps(
    {"object": "list", "data": [{"id": "mock", "object": "model", "owned_by": "mock"}]}
).encode()


def _response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: keep-alive\r\n\r\n"
        + body
    )


POST_RESPONSE = _response(COMPLETION)
STREAM_RESPONSE = _response(STREAM, b"text/event-stream")
GET_RESPONSE = _response(MODELS)


class MockOpenAI(asyncio.Protocol):
    """Parses just enough HTTP/1.1: the request line, Content-Length, the body; pipelining works."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses

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
            if head.startswith(b"POST"):
                streaming = b'"stream":true' in body.replace(b" ", b"")
                self.transport.write(STREAM_RESPONSE if streaming else POST_RESPONSE)
            else:
                self.transport.write(GET_RESPONSE)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MockOpenAI, host, port, backlog=1024)
    print(f"ready {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
