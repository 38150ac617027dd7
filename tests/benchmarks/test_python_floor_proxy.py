"""benchmarks/python_floor_proxy.py, the bare Python anchor of gateway_overhead.py: it relays a plain and a
streamed answer from the mock upstream whole, over kept-open connections on both sides."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from _common import free_port, start_process, stop_process

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _read_answer(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes]:
    """One HTTP/1.1 answer (content-length or chunked) and what followed it."""
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(65536)
    head, _, rest = buffer.partition(b"\r\n\r\n")
    if b"content-length:" in head.lower():
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += sock.recv(65536)
        return head + b"\r\n\r\n" + rest[:length], rest[length:]
    while b"\r\n0\r\n\r\n" not in rest:
        rest += sock.recv(65536)
    end = rest.index(b"\r\n0\r\n\r\n") + 7
    return head + b"\r\n\r\n" + rest[:end], rest[end:]


def test_the_floor_proxy_relays_plain_and_streamed_answers_on_one_connection() -> None:
    upstream_port, proxy_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    mock = start_process(
        [sys.executable, str(BENCHMARKS / "mock_upstream.py"), "--port", str(upstream_port)],
        f"{upstream}/v1/models",
        30,
    )
    try:
        argv = [sys.executable, str(BENCHMARKS / "python_floor_proxy.py"), "--upstream", upstream]
        proxy = start_process(
            [*argv, "--port", str(proxy_port)], f"http://127.0.0.1:{proxy_port}/v1/models", 30
        )
        try:
            with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
                rest = b""
                for stream in (False, True, False):
                    body = json.dumps({"model": "m", "messages": [], "stream": stream}).encode()
                    head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}"
                    sock.sendall(head.encode() + b"\r\n\r\n" + body)
                    answer, rest = _read_answer(sock, rest)
                    assert answer.startswith(b"HTTP/1.1 200")
                    if stream:
                        assert b"data: [DONE]" in answer
                    else:
                        assert b'"object":"chat.completion"' in answer.replace(b" ", b"")
        finally:
            stop_process(proxy)
    finally:
        stop_process(mock)
