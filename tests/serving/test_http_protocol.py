"""The gateway's HTTP protocol (``serving/http_protocol.py``) over real sockets on 127.0.0.1: one write per
content-length response, every uvicorn behaviour kept, and the ``xpuflow.disconnect`` scope extension.

The server records what each connection writes to its socket (``RecordingProtocol``), keyed by the
client's port, so a test asserts on the writes themselves rather than on how TCP happened to segment
them."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from xpuflow.serving.app import create_app
from xpuflow.serving.http_protocol import DISCONNECT_EXTENSION, RESPOND_EXTENSION, GatewayHttpProtocol
from xpuflow.serving.settings import GatewaySettings
from xpuflow.testing.fake_engine import FakeEngine
from xpuflow.testing.live_server import live_server

pytestmark = pytest.mark.e2e

KEY = "sk-test-0123456789abcdef"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8}
TIMEOUT_S = 5.0


# -- the server side: a recording protocol and a raw ASGI app ------------------------------------------


class _RecordingTransport:
    """The connection's transport, recording each write call (a ``writelines`` is one call)."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self.writes = writes

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self._transport.write(data)

    def writelines(self, parts: Any) -> None:
        parts = list(parts)
        self.writes.append(b"".join(parts))
        self._transport.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


WRITES: dict[int, list[bytes]] = {}  # client port -> the server's writes on that connection


class RecordingProtocol(GatewayHttpProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        writes = WRITES.setdefault(transport.get_extra_info("peername")[1], [])
        super().connection_made(_RecordingTransport(transport, writes))  # type: ignore[arg-type]


class Signals:
    """Thread-safe flags and counters shared by the server thread's app and the test."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self.counts: dict[str, int] = {}

    def event(self, name: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(name, threading.Event())

    def bump(self, name: str) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1
        self.event(name).set()


async def _until(event: threading.Event, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not event.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError("the test never set the event")
        await asyncio.sleep(0.005)


def _start(status: int, length: int | None = None, content_type: bytes = b"text/plain") -> dict[str, Any]:
    headers = [(b"content-type", content_type)]
    if length is not None:
        headers.append((b"content-length", b"%d" % length))
    return {"type": "http.response.start", "status": status, "headers": headers}


def _body(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def make_app(signals: Signals) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path, tag = scope["path"], scope["query_string"].decode()
        watch = scope["extensions"][DISCONNECT_EXTENSION]["watch"]
        if path == "/cl":
            await send(_start(200, 5))
            await send(_body(b"hello"))
        elif path == "/parts":
            await send(_start(200, 10))
            await send(_body(b"hello", more=True))
            await send(_body(b"world"))
        elif path == "/big":
            data = b"x" * (100 * 1024)
            await send(_start(200, len(data)))
            await send(_body(data))
        elif path == "/status":
            await send(_start(int(tag)))
            await send(_body(b""))
        elif path == "/respond":
            respond = scope["extensions"][RESPOND_EXTENSION]["respond"]
            if not respond(201, [(b"content-type", b"text/plain"), (b"x-tag", tag.encode())], b"whole"):
                signals.bump("respond-refused")
                await send(_start(201, 5))
                await send(_body(b"whole"))
        elif path == "/respond-after-start":
            respond = scope["extensions"][RESPOND_EXTENSION]["respond"]
            await send(_start(200, 4))
            if not respond(200, [], b"nope"):  # the response has begun: the ordinary way only
                await send(_body(b"asgi"))
        elif path == "/echo":
            body, more = b"", True
            while more:
                message = await receive()
                body, more = body + message.get("body", b""), message.get("more_body", False)
            await send(_start(200, len(body)))
            await send(_body(body))
        elif path == "/sse":
            await send(_start(200, content_type=b"text/event-stream"))
            await _until(signals.event(tag))
            await send(_body(b"data: 1\n\n", more=True))
            await send(_body(b""))
        elif path == "/raise-before-start":
            raise RuntimeError("a bug before the response")
        elif path == "/raise-after-start":
            await send(_start(200, 5))
            raise RuntimeError("a bug between the head and the body")
        elif path == "/watch":
            unwatch_first = watch(lambda: signals.bump(tag + "-first"))
            watch(lambda: signals.bump(tag))
            if b"unwatch" in scope["query_string"]:
                unwatch_first()
                unwatch_first()  # idempotent
            signals.event(tag + "-ready").set()
            await _until(signals.event(tag))
        elif path == "/watch-late":
            while (await receive())["type"] != "http.disconnect":
                pass
            called: list[bool] = []
            watch(lambda: called.append(True))
            if not called:  # never from inside watch()
                signals.bump(tag + "-deferred")
            await asyncio.sleep(0.05)
            if called == [True]:
                signals.bump(tag)
        elif path == "/loop":
            same = scope["extensions"][DISCONNECT_EXTENSION]["loop"] is asyncio.get_running_loop()
            await send(_start(200, 4))
            await send(_body(b"same" if same else b"else"))
        elif path == "/held":
            await send(_start(200, 5))
            watch(lambda: signals.bump(tag))
            signals.event(tag + "-ready").set()
            await _until(signals.event(tag))
            await send(_body(b"hello"))  # after the client left: dropped, as uvicorn drops it
            signals.bump(tag + "-returned")
        else:
            await send(_start(404, 0))
            await send(_body(b""))

    return app


@pytest.fixture(scope="module")
def signals() -> Signals:
    return Signals()


@pytest.fixture(scope="module")
def server(signals: Signals) -> Iterator[tuple[str, int]]:
    with live_server(make_app(signals), http=RecordingProtocol) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


# -- the client side: raw sockets ----------------------------------------------------------------------


class Client:
    """One HTTP/1.1 connection over a raw socket, reading responses off one buffered file."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=TIMEOUT_S)
        self.file = self.sock.makefile("rb")
        self.port = self.sock.getsockname()[1]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    @property
    def writes(self) -> list[bytes]:
        return WRITES.get(self.port, [])

    def send(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.sock.sendall(request(method, path, body, headers))

    def head(self) -> tuple[int, dict[str, str]]:
        status_line = self.file.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers: dict[str, str] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers

    def response(self, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        status, headers = self.head()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self.file.read(int(headers["content-length"]))
        assert headers.get("transfer-encoding") == "chunked", headers
        body = b""
        while size := int(self.file.readline(), 16):
            body += self.file.read(size)
            assert self.file.read(2) == b"\r\n"
        assert self.file.read(2) == b"\r\n"
        return status, headers, body

    def closed_by_server(self) -> bool:
        return self.file.read(1) == b""


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if (body or method == "POST") and "content-length" not in (headers or {}):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _wait(predicate: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# -- one write per small response -----------------------------------------------------------------------


def test_a_content_length_response_is_one_write(server: tuple[str, int]) -> None:
    with Client(server) as client:
        client.send("GET", "/cl")
        status, headers, body = client.response()
        assert (status, body) == (200, b"hello")
        assert headers["content-length"] == "5"
        assert "date" in headers
        assert headers["server"] == "uvicorn"
        _wait(lambda: len(client.writes) == 1)
        (write,) = client.writes
        assert write.startswith(b"HTTP/1.1 200 OK\r\n")
        assert write.endswith(b"\r\n\r\nhello")


def test_a_body_in_parts_sends_its_head_with_the_first(server: tuple[str, int]) -> None:
    with Client(server) as client:
        client.send("GET", "/parts")
        assert client.response()[2] == b"helloworld"
        _wait(lambda: len(client.writes) == 2)
        assert client.writes[0].endswith(b"\r\n\r\nhello")
        assert client.writes[1] == b"world"


def test_a_large_body_leaves_with_its_head_in_one_call(server: tuple[str, int]) -> None:
    with Client(server) as client:
        client.send("GET", "/big")
        assert client.response()[2] == b"x" * (100 * 1024)
        _wait(lambda: len(client.writes) == 1)


def test_an_event_streams_head_arrives_before_its_first_event(
    server: tuple[str, int], signals: Signals
) -> None:
    with Client(server) as client:
        client.send("GET", "/sse?sse-1")
        status, headers = client.head()  # the app waits for the test before its first event
        assert status == 200
        assert headers["transfer-encoding"] == "chunked"
        assert "content-length" not in headers
        signals.event("sse-1").set()
        assert client.file.readline() == b"9\r\n"
        assert client.file.read(11) == b"data: 1\n\n\r\n"
        assert client.file.read(5) == b"0\r\n\r\n"


def test_keep_alive_serves_several_requests_on_one_connection(server: tuple[str, int]) -> None:
    with Client(server) as client:
        for _ in range(5):
            client.send("GET", "/cl")
            assert client.response()[:1] == (200,)
        _wait(lambda: len(client.writes) == 5)


def test_pipelined_requests_are_answered_in_order(server: tuple[str, int]) -> None:
    with Client(server) as client:
        client.sock.sendall(b"".join(request("POST", "/echo", body) for body in (b"one", b"two", b"three")))
        assert [client.response()[2] for _ in range(3)] == [b"one", b"two", b"three"]
        _wait(lambda: len(client.writes) == 3)


def test_head_answers_the_head_alone(server: tuple[str, int]) -> None:
    with Client(server) as client:
        client.send("HEAD", "/cl")
        status, headers, _ = client.response("HEAD")
        assert status == 200
        assert headers["content-length"] == "5"
        client.send("GET", "/cl")  # no stray body bytes between the two answers
        assert client.response()[2] == b"hello"
        _wait(lambda: len(client.writes) == 2)
        assert client.writes[0].endswith(b"\r\n\r\n")


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses_keep_the_connection(server: tuple[str, int], status: int) -> None:
    with Client(server) as client:
        client.send("GET", f"/status?{status}")
        status_seen, headers, _ = client.response()
        assert status_seen == status
        assert "transfer-encoding" not in headers
        client.send("GET", "/cl")
        assert client.response()[2] == b"hello"


def test_expect_100_continue(server: tuple[str, int]) -> None:
    with Client(server) as client:
        client.sock.sendall(
            request("POST", "/echo", headers={"expect": "100-continue", "content-length": "4"})
        )
        assert client.head()[0] == 100
        client.sock.sendall(b"ping")
        assert client.response()[2] == b"ping"


def test_connection_close_is_kept(server: tuple[str, int]) -> None:
    with Client(server) as client:
        client.send("GET", "/cl", headers={"connection": "close"})
        status, headers, body = client.response()
        assert (status, body, headers["connection"]) == (200, b"hello", "close")
        assert client.closed_by_server()


def test_a_bug_before_the_response_is_a_500_in_one_write(server: tuple[str, int]) -> None:
    with Client(server) as client:
        client.send("GET", "/raise-before-start")
        status, headers, body = client.response()
        assert (status, body, headers["connection"]) == (500, b"Internal Server Error", "close")
        assert client.closed_by_server()
        assert len(client.writes) == 1


def test_a_bug_between_head_and_body_closes_without_a_half_response(server: tuple[str, int]) -> None:
    with Client(server) as client:
        client.send("GET", "/raise-after-start")
        assert client.closed_by_server()  # no byte came: the held head was dropped
        assert client.writes == []


def test_a_client_leaving_after_a_held_head_loses_nothing_twice(
    server: tuple[str, int], signals: Signals
) -> None:
    with Client(server) as client:
        client.send("GET", "/held?held-1")
        assert signals.event("held-1-ready").wait(TIMEOUT_S)
        client.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            client.sock.recv(1)  # the head waits for its body
        port = client.port
    assert signals.event("held-1-returned").wait(TIMEOUT_S)
    assert WRITES[port] == []
    assert signals.counts["held-1"] == 1


# -- the xpuflow.disconnect extension -------------------------------------------------------------------


def test_a_client_leaving_mid_request_fires_the_callback_once(
    server: tuple[str, int], signals: Signals
) -> None:
    with Client(server) as client:
        client.send("GET", "/watch?w-1")
        assert signals.event("w-1-ready").wait(TIMEOUT_S)
    assert signals.event("w-1").wait(TIMEOUT_S)
    time.sleep(0.05)
    assert signals.counts["w-1"] == 1
    assert signals.counts["w-1-first"] == 1


def test_an_unwatched_callback_is_not_called(server: tuple[str, int], signals: Signals) -> None:
    with Client(server) as client:
        client.send("GET", "/watch?w-2&unwatch")
        assert signals.event("w-2&unwatch-ready").wait(TIMEOUT_S)
    assert signals.event("w-2&unwatch").wait(TIMEOUT_S)
    time.sleep(0.05)
    assert "w-2&unwatch-first" not in signals.counts


def test_watching_after_the_client_left_calls_back_soon_not_at_once(
    server: tuple[str, int], signals: Signals
) -> None:
    with Client(server) as client:
        client.send("GET", "/watch-late?late-1")
    assert signals.event("late-1").wait(TIMEOUT_S)
    assert signals.counts["late-1-deferred"] == 1


def test_the_disconnect_extension_names_the_loop_the_app_runs_on(server: tuple[str, int]) -> None:
    with Client(server) as client:
        client.send("GET", "/loop")
        assert client.response()[2] == b"same"


def test_a_client_leaving_cancels_the_engine_call() -> None:
    engine = FakeEngine(service_time_s=10.0)
    body = json.dumps(CHAT).encode()
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    with live_server(create_app(engine, GatewaySettings(api_keys={KEY: "team"}))) as url:
        host, port = url.removeprefix("http://").split(":")
        with Client((host, int(port))) as client:
            client.send("POST", "/v1/chat/completions", body, headers)
            _wait(lambda: bool(engine.calls))
        _wait(engine.calls[-1].cancelled.is_set)


def test_the_inference_guard_takes_the_extension_over_receive() -> None:
    """Under a server with the extension, the endpoint reads its body and never calls receive() again:
    the callback alone cancels the call, and a finished request takes its callback back."""
    engine = FakeEngine(service_time_s=10.0)
    slow, quick = (create_app(e, GatewaySettings(api_keys={KEY: "team"})) for e in (engine, FakeEngine()))
    body = json.dumps(CHAT).encode()
    watching: list[Callable[[], object]] = []
    unwatched: list[bool] = []
    receives: list[int] = []

    def watch(callback: Callable[[], object]) -> Callable[[], None]:
        watching.append(callback)
        return lambda: unwatched.append(True)

    async def receive() -> dict[str, Any]:
        receives.append(1)
        if len(receives) == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        raise AssertionError("receive() called after the body")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    def scope() -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"authorization", f"Bearer {KEY}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
            "extensions": {DISCONNECT_EXTENSION: {"watch": watch}},
        }

    async def main() -> None:
        handler = asyncio.ensure_future(slow(scope(), receive, send))
        while not engine.calls:
            await asyncio.sleep(0.005)
        (callback,) = watching
        callback()
        await asyncio.wait_for(handler, timeout=2)  # at once instead of after 10 s
        assert engine.calls[-1].cancelled.is_set()
        assert sent == []
        assert receives == [1]

        watching.clear()
        receives.clear()
        await asyncio.wait_for(quick(scope(), receive, send), timeout=2)
        assert sent[0]["status"] == 200
        assert len(watching) == 1
        assert unwatched
        assert receives == [1]

    asyncio.run(asyncio.wait_for(main(), timeout=20))


def test_serve_uses_this_protocol_only_with_the_uvicorn_it_was_written_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    from xpuflow.cli.serve import _http_protocol
    from xpuflow.serving.http_protocol import GatewayHttpProtocol

    monkeypatch.setattr(uvicorn, "__version__", "0.55.0")
    assert _http_protocol() is GatewayHttpProtocol
    monkeypatch.setattr(uvicorn, "__version__", "0.56.0")
    assert _http_protocol() == "auto"


# -- xpuflow.respond: a whole answer in one call --------------------------------------------------------


def test_respond_writes_the_whole_answer_once_with_uvicorns_headers(server: tuple[str, int]) -> None:
    with Client(server) as client:
        for tag in ("a", "b"):  # the connection stays open for the next request
            client.send("GET", f"/respond?{tag}")
            status, headers, body = client.response()
            assert (status, body) == (201, b"whole")
            assert headers["content-length"] == "5"
            assert headers["x-tag"] == tag
            assert headers["server"] == "uvicorn"
            assert "date" in headers
            assert "connection" not in headers
        _wait(lambda: len(client.writes) == 2)
        assert all(w.startswith(b"HTTP/1.1 201 Created\r\n") for w in client.writes)


def test_respond_follows_uvicorns_date_as_it_changes(server: tuple[str, int]) -> None:
    """The status line and uvicorn's default headers are encoded once and kept while uvicorn keeps its
    list; when it replaces it (the date moves on each second), answers carry the new one."""
    from email.utils import parsedate_to_datetime

    with Client(server) as client:
        client.send("GET", "/respond?d1")
        first = parsedate_to_datetime(client.response()[1]["date"])
        time.sleep(2.2)
        client.send("GET", "/respond?d2")
        second = parsedate_to_datetime(client.response()[1]["date"])
        assert (second - first).total_seconds() >= 1


def test_respond_to_a_client_that_asked_to_close_closes(server: tuple[str, int]) -> None:
    with Client(server) as client:
        client.send("GET", "/respond?c", headers={"connection": "close"})
        status, headers, body = client.response()
        assert (status, body, headers["connection"]) == (201, b"whole", "close")
        assert client.closed_by_server()


def test_respond_answers_pipelined_requests_in_order(server: tuple[str, int]) -> None:
    with Client(server) as client:
        client.sock.sendall(b"".join(request("GET", f"/respond?{tag}") for tag in ("p1", "p2", "p3")))
        assert [client.response()[1]["x-tag"] for _ in range(3)] == ["p1", "p2", "p3"]


def test_respond_refuses_once_the_response_has_begun_and_for_head(
    server: tuple[str, int], signals: Signals
) -> None:
    with Client(server) as client:
        client.send("GET", "/respond-after-start")
        assert client.response()[2] == b"asgi"
        before = signals.counts.get("respond-refused", 0)
        client.send("HEAD", "/respond?h")
        status, headers, _ = client.response("HEAD")
        assert (status, headers["content-length"]) == (201, "5")
        assert signals.counts["respond-refused"] == before + 1
        client.send("GET", "/respond?after-head")  # no stray body bytes from the HEAD answer
        assert client.response()[2] == b"whole"


def test_an_idle_keep_alive_connection_is_closed_after_timeout_keep_alive(signals: Signals) -> None:
    # the keep-alive timeout runs on the deadline timer (50 ms buckets): never early, a little late
    with live_server(make_app(signals), http=RecordingProtocol, timeout_keep_alive=1) as url:
        host, port = url.removeprefix("http://").split(":")
        with Client((host, int(port))) as client:
            client.send("GET", "/cl")
            assert client.response()[:1] == (200,)
            answered = time.monotonic()
            client.sock.settimeout(TIMEOUT_S)
            assert client.sock.recv(1) == b""  # the server closed it
            idle = time.monotonic() - answered
        assert 0.95 <= idle < 2.0, idle
        # a request before the timeout keeps the connection: the timer starts over after each answer
        with Client((host, int(port))) as client:
            for _ in range(3):
                client.send("GET", "/cl")
                assert client.response()[:1] == (200,)
                time.sleep(0.6)
            client.send("GET", "/cl")
            assert client.response()[:1] == (200,)


def test_a_request_running_past_timeout_keep_alive_keeps_its_connection(signals: Signals) -> None:
    # one timer per connection checks it: busy when it comes due, the connection is left to its answer,
    # and its idle time counts from that answer
    with live_server(make_app(signals), http=RecordingProtocol, timeout_keep_alive=1) as url:
        host, port = url.removeprefix("http://").split(":")
        with Client((host, int(port))) as client:
            client.send("GET", "/cl")
            assert client.response()[:1] == (200,)
            client.send("GET", "/sse?keep-alive-busy")
            assert client.head()[0] == 200
            time.sleep(1.5)  # past the keep-alive timeout armed by the first answer
            signals.event("keep-alive-busy").set()
            assert client.file.readline() == b"9\r\n"  # the event's chunk: the connection is still open
            assert client.file.read(11) == b"data: 1\n\n\r\n"
            assert client.file.read(5) == b"0\r\n\r\n"
            answered = time.monotonic()
            client.sock.settimeout(TIMEOUT_S)
            assert client.file.read(1) == b""  # then closed, once idle for the timeout
            idle = time.monotonic() - answered
        assert 0.95 <= idle < 2.0, idle


# -- nothing left for the garbage collector ---------------------------------------------------------------


def test_answered_requests_leave_no_reference_cycles() -> None:
    """Each request's objects are freed when it ends, not left in reference cycles for the collector
    (which cost the gateway a tenth of its CPU when the scope's extensions and the cycle, and the guard
    and its unwatch callback, held each other)."""
    import gc

    from xpuflow.engine import InferenceCall
    from xpuflow.serving.http_protocol import GatewayRequestCycle
    from xpuflow.serving.inference import _Guard

    ours = (GatewayRequestCycle, _Guard, InferenceCall)
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    requests = [
        ("/v1/chat/completions", CHAT, headers, 200),
        ("/v1/chat/completions", {**CHAT, "stream": True}, headers, 200),
        ("/v1/embeddings", {"model": "embed", "input": ["a", "b"]}, headers, 200),
        ("/v1/chat/completions", CHAT, {**headers, "authorization": "Bearer sk-wrong"}, 401),
        ("/v1/chat/completions", {**CHAT, "model": "nope"}, headers, 404),
        ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, headers, 422),
    ]
    with live_server(create_app(FakeEngine(), GatewaySettings(api_keys={KEY: "team"}))) as url:
        host, port = url.removeprefix("http://").split(":")
        with Client((host, int(port))) as client:
            client.send("POST", requests[0][0], json.dumps(requests[0][1]).encode(), requests[0][2])
            assert client.response()[0] == 200  # the first request's one-time work done
            gc.collect()
            gc.disable()
            try:
                for path, body, sent_headers, status in requests * 3:
                    client.send("POST", path, json.dumps(body).encode(), sent_headers)
                    assert client.response()[0] == status, path
                gc.set_debug(gc.DEBUG_SAVEALL)
                gc.collect()
                left = sorted({type(o).__name__ for o in gc.garbage if isinstance(o, ours)})
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
    assert left == []


# -- the cycle's message event ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", ["asyncio", "cycle"])
def test_the_cycles_message_event_answers_as_asyncio_event_does(make: str) -> None:
    from xpuflow.serving.http_protocol import _MessageEvent

    async def main() -> list[Any]:
        event = asyncio.Event() if make == "asyncio" else _MessageEvent()
        seen: list[Any] = [event.is_set()]
        event.set()
        seen += [event.is_set(), await event.wait()]  # set already: at once
        event.clear()
        waiters = [asyncio.ensure_future(event.wait()) for _ in range(3)]
        await asyncio.sleep(0)
        waiters[0].cancel()  # a cancelled waiter is forgotten, the others still woken
        await asyncio.sleep(0)
        seen.append([w.done() for w in waiters])
        event.set()
        event.set()  # twice: nothing more
        seen.append(await asyncio.gather(*waiters[1:]))
        event.clear()
        late = asyncio.ensure_future(event.wait())
        await asyncio.sleep(0)
        seen.append(late.done())
        event.set()
        seen.append(await late)
        return seen

    assert asyncio.run(main()) == [False, True, True, [True, False, False], [True, True], False, True]
