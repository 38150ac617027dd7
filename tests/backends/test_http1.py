"""The lean HTTP/1.1 client of remote_openai's JSON POSTs, against raw servers that answer in each of the
ways HTTP/1.1 allows (and some it does not)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from xpuflow.backends.base import GenerationParams, ModelConfig
from xpuflow.backends.remote.http1 import Http1ConnectError, Http1Error, Http1Pool
from xpuflow.backends.remote.openai import RemoteOpenAIPlugin, RemoteOpenAISession
from xpuflow.errors import RemoteError

pytest.importorskip("httptools")

Answer = Callable[[bytes], bytes | None]  # the request (head and body) -> raw bytes to send; None: close
REPLY = json.dumps(
    {
        "id": "x",
        "model": "srv",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
).encode()


def ok(body: bytes = REPLY, extra: bytes = b"") -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + extra
    return head + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body


@contextlib.asynccontextmanager
async def raw_server(answer: Answer) -> AsyncIterator[tuple[int, list[bytes], list[int]]]:
    """A server that reads each whole request (Content-Length bodies) and writes ``answer(request)``;
    yields its port, the requests it saw and the number of connections it accepted (a one-item list)."""
    seen: list[bytes] = []
    accepted = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                seen.append(request)
                reply = answer(request)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
                if b"connection: close" in reply.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen, accepted
    finally:
        server.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_connections_are_kept_open_and_reused() -> None:
    async def go() -> tuple[list[Any], list[bytes], int, dict[str, Any]]:
        async with raw_server(lambda _: ok()) as (port, seen, accepted):
            pool = Http1Pool("127.0.0.1", port, limit=4, connect_timeout_s=2.0, headers={"X-Team": "ml"})
            answers = [await pool.post("/v1/chat/completions", b'{"a": 1}') for _ in range(3)]
            stats = pool.stats()
            await pool.close()
            return answers, seen, accepted[0], stats

    answers, seen, accepted, stats = run(go())
    assert [a[0] for a in answers] == [200, 200, 200]
    assert answers[0][1]["content-type"] == "application/json"
    assert answers[0][2] == REPLY
    assert accepted == 1
    assert stats == {"open": 1, "idle": 1}
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nhost: 127.0.0.1:" in head.lower()
    assert b"x-team: ml" in head.lower()
    assert b"content-length: 8" in head.lower()
    assert body == b'{"a": 1}'


def test_chunked_and_close_delimited_bodies() -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end"

    async def go(reply: bytes) -> tuple[bytes, int]:
        async with raw_server(lambda _: reply) as (port, _, accepted):
            pool = Http1Pool("127.0.0.1", port, limit=2, connect_timeout_s=2.0)
            first = await pool.post("/x", b"{}")
            if b"connection: close" in reply:
                await asyncio.sleep(0.05)  # the server closes; the next request opens a new connection
            second = await pool.post("/x", b"{}")
            await pool.close()
            assert first == second
            return first[2], accepted[0]

    assert run(go(chunked)) == (b"hello world", 1)
    assert run(go(closing)) == (b"until the end", 2)


def test_a_server_that_closes_early_or_speaks_garbage_fails_the_request() -> None:
    async def go(answer: Answer) -> BaseException:
        async with raw_server(answer) as (port, _, _):
            pool = Http1Pool("127.0.0.1", port, limit=2, connect_timeout_s=2.0)
            try:
                await pool.post("/x", b"{}")
            except Exception as exc:
                return exc
            finally:
                await pool.close()
        raise AssertionError("the request did not fail")

    assert isinstance(run(go(lambda _: None)), Http1Error)
    half = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 100\r\n\r\nshort"
    assert isinstance(run(go(lambda _: half)), Http1Error)
    assert isinstance(run(go(lambda _: b"SMTP ready\r\n\r\n")), Http1Error)


def test_a_refused_connection_is_a_connect_error() -> None:
    async def go() -> None:
        async with raw_server(lambda _: ok()) as (port, _, _):
            pass  # the port is free again
        pool = Http1Pool("127.0.0.1", port, limit=1, connect_timeout_s=1.0)
        with pytest.raises(Http1ConnectError, match="cannot connect"):
            await pool.post("/x", b"{}")

    run(go())


def test_the_limit_bounds_open_connections() -> None:
    async def go() -> tuple[int, dict[str, Any]]:
        async with raw_server(lambda _: ok()) as (port, _, accepted):
            pool = Http1Pool("127.0.0.1", port, limit=3, connect_timeout_s=2.0)
            await asyncio.gather(*(pool.post("/x", b"{}") for _ in range(20)))
            stats = pool.stats()
            await pool.close()
            return accepted[0], stats

    accepted, stats = run(go())
    assert accepted <= 3
    assert stats["open"] <= 3


async def _session(port: int, **options: Any) -> RemoteOpenAISession:
    config = ModelConfig(
        "chat", options={"base_url": f"http://127.0.0.1:{port}/v1", "model": "srv", **options}
    )
    return await RemoteOpenAIPlugin().create_session([], config, {})


def test_remote_openai_posts_through_it_and_keeps_every_answer_the_same() -> None:
    compressed = gzip.compress(REPLY)

    async def go() -> tuple[list[str], int, list[bytes]]:
        replies = iter([ok(), ok(compressed, b"content-encoding: gzip\r\n")])
        async with raw_server(lambda _: next(replies)) as (port, seen, accepted):
            async with await _session(port, api_key="k1") as session:
                texts = [(await session.chat([{"role": "user", "content": "hi"}], GenerationParams())).text]
                texts.append(
                    (await session.chat([{"role": "user", "content": "hi"}], GenerationParams())).text
                )
                assert isinstance(session._http1, Http1Pool)
            return texts, accepted[0], seen

    texts, accepted, seen = run(go())
    assert texts == ["Paris", "Paris"]
    assert accepted == 1
    head = seen[0].split(b"\r\n\r\n")[0].lower()
    assert b"authorization: bearer k1" in head
    assert b"accept: application/json" in head


def test_remote_openai_maps_its_failures_like_aiohttps() -> None:
    async def go(answer: Answer) -> RemoteError:
        async with raw_server(answer) as (port, _, _), await _session(port) as session:
            with pytest.raises(RemoteError) as info:
                await session.chat([{"role": "user", "content": "hi"}], GenerationParams())
            return info.value

    closed = run(go(lambda _: None))
    assert closed.retryable
    assert "closed the connection" in str(closed)
    limited = run(go(lambda _: b"HTTP/1.1 429 Too Many\r\nretry-after: 7\r\ncontent-length: 2\r\n\r\n{}"))
    assert (limited.status, limited.retry_after_s, limited.retryable) == (429, 7.0, True)
    junk = run(go(lambda _: ok(b"not json")))
    assert not junk.retryable
    assert "malformed" in str(junk)


def test_it_runs_on_uvloop_too() -> None:
    # uvloop's transports are not asyncio.Transport subclasses: nothing here may assume they are
    uvloop = pytest.importorskip("uvloop")

    async def go() -> list[int]:
        async with raw_server(lambda _: ok()) as (port, _, _):
            pool = Http1Pool("127.0.0.1", port, limit=2, connect_timeout_s=2.0)
            answers = [await pool.post("/x", b"{}") for _ in range(2)]
            await pool.close()
            return [a[0] for a in answers]

    assert uvloop.run(go()) == [200, 200]


def test_a_stream_is_read_as_it_arrives_and_its_connection_reused_once_whole() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

    async def go() -> tuple[list[bytes], int, dict[str, Any]]:
        release = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(1)
            while True:
                try:
                    request = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                await reader.readexactly(int(request.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
                writer.write(head + b"6\r\nfirst\n\r\n")
                await writer.drain()
                await release.wait()
                writer.write(b"7\r\nsecond\n\r\n0\r\n\r\n")
                await writer.drain()
            writer.close()

        accepted: list[int] = []
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Http1Pool("127.0.0.1", port, limit=2, connect_timeout_s=2.0)
        pieces = []
        for _ in range(2):
            release.clear()
            async with pool.stream(
                "/s", b"{}", accept="text/event-stream", read_timeout_s=2.0, total_timeout_s=5.0
            ) as answer:
                assert answer.status == 200
                assert answer.headers["content-type"] == "text/event-stream"
                pieces.append(await answer.read())  # before the server sends the rest
                release.set()
                pieces.append(await answer.read_all())
        stats = pool.stats()
        await pool.close()
        await asyncio.sleep(0.05)  # the handler sees the close and closes its side
        server.close()
        return pieces, len(accepted), stats

    pieces, accepted, stats = run(go())
    assert pieces == [b"first\n", b"second\n"] * 2
    assert accepted == 1
    assert stats == {"open": 1, "idle": 1}


def test_a_stalled_stream_times_out_and_its_connection_is_dropped() -> None:
    stalled = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"

    async def read_on(pool: Http1Pool) -> None:
        async with pool.stream(
            "/s", b"{}", accept="text/event-stream", read_timeout_s=0.05, total_timeout_s=5.0
        ) as answer:
            assert await answer.read() == b"abc"
            await answer.read()

    async def go() -> dict[str, Any]:
        async with raw_server(lambda _: stalled) as (port, _, _):
            pool = Http1Pool("127.0.0.1", port, limit=1, connect_timeout_s=2.0)
            with pytest.raises(asyncio.TimeoutError):
                await read_on(pool)
            stats = pool.stats()
            await pool.close()
            await asyncio.sleep(0.05)  # the server sees the close
            return stats

    assert run(go()) == {"open": 0, "idle": 0}


def test_at_most_limit_requests_run_at_once_and_a_cancelled_waiter_loses_no_slot() -> None:
    """Callers past ``limit`` wait in turn; one cancelled while it waits (or just as its slot came)
    neither takes a slot with it nor leaves the others waiting."""

    async def go() -> tuple[int, list[int], int, dict[str, Any]]:
        gate = asyncio.Event()
        running = [0, 0]  # now, peak

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r")[0]))
                    running[0] += 1
                    running[1] = max(running)
                    await gate.wait()
                    running[0] -= 1
                    writer.write(ok())
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Http1Pool("127.0.0.1", port, limit=2, connect_timeout_s=2.0)
        calls = [asyncio.ensure_future(pool.post("/x", b"{}")) for _ in range(5)]
        await asyncio.sleep(0.05)
        calls[2].cancel()  # waiting for a slot
        await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        statuses = [r[0] for r in results if isinstance(r, tuple)]
        cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
        # every slot came back: as many requests as the limit start at once again
        more = await asyncio.gather(*(pool.post("/x", b"{}") for _ in range(2)))
        stats = pool.stats()
        await pool.close()
        server.close()
        return running[1], statuses + [m[0] for m in more], cancelled, {**stats, "free": pool._free}

    peak, statuses, cancelled, stats = run(go())
    assert peak == 2
    assert statuses == [200] * 6
    assert cancelled == 1
    assert stats["free"] == 2
    assert stats["open"] == 2


def test_response_headers_read_as_a_lower_case_mapping_with_the_last_of_a_repeated_name() -> None:
    from xpuflow.backends.remote.http1 import ResponseHeaders

    raw = [
        (b"Content-Type", b"application/json"),
        (b"X-Seen", b"1"),
        (b"x-seen", b"2"),
        (b"Retry-After", b"7"),
    ]
    headers = ResponseHeaders(raw)
    # one name at a time, before anything is decoded as a whole
    assert headers.get("retry-after") == "7"
    assert headers.get("RETRY-AFTER") == "7"
    assert headers.get("x-seen") == "2"
    assert headers.get("content-encoding", "identity") == "identity"
    assert headers.get("content-encoding") is None
    # as a mapping: the same answers
    assert dict(headers) == {"content-type": "application/json", "x-seen": "2", "retry-after": "7"}
    assert headers["x-seen"] == "2"
    assert "content-type" in headers
    assert len(headers) == 3
    assert headers.get("x-seen") == "2"
    assert headers.get("nope", "d") == "d"
    with pytest.raises(KeyError):
        headers["nope"]


def test_a_caller_cancelled_as_its_connection_is_made_stays_cancelled() -> None:
    """A new connection completing in the same turn as the caller's cancellation does not swallow the
    cancellation (``asyncio.wait_for`` did, before Python 3.12: a request its worker gave up behind a
    hung upstream then waited out its whole timeout); the connection made is closed, not left open."""
    from xpuflow.backends.remote.http1 import _Connection

    class Made:
        closed = False

        def close(self) -> None:
            self.closed = True

    async def scenario() -> Made:
        loop = asyncio.get_running_loop()
        made: asyncio.Future[tuple[Made, _Connection]] = loop.create_future()

        async def create_connection(*args: Any) -> tuple[Made, _Connection]:
            return await made

        loop.create_connection = create_connection  # type: ignore[method-assign,assignment]
        pool = Http1Pool("127.0.0.1", 9, limit=1, connect_timeout_s=5.0)
        caller = asyncio.ensure_future(pool._connection())
        await asyncio.sleep(0)  # the caller waits for its connection
        transport = Made()
        made.set_result((transport, _Connection()))  # the attempt completes in the next turn ...
        loop.call_soon(caller.cancel)  # ... and the caller is cancelled in that same turn, after it
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0.01)
        return transport

    assert asyncio.run(scenario()).closed
