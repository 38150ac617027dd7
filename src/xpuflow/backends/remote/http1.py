"""A lean HTTP/1.1 client for the hot path of a remote model server: JSON ``POST``s to a plain ``http://``
origin over kept-open connections, with responses parsed by httptools (llhttp, C).

A gateway in front of a model server pays its HTTP client on every request; a general client (aiohttp)
builds a request object, merges header maps, runs a writer task and a stream reader per call. Here a
request is one prepared byte string and one ``write``, and the answer is collected by parser callbacks::

    pool = Http1Pool("127.0.0.1", 8000, limit=64, connect_timeout_s=2.0,
                     headers={"Accept": "application/json"})
    status, headers, body = await pool.post("/v1/chat/completions", b'{"model": ...}')
    await pool.close()

The contract:

- At most ``limit`` connections, reused most-recently-idle first; callers beyond that wait their turn.
- A response ends at its ``Content-Length``, at the end of a chunked body, or, without either, when the
  server closes the connection; a connection the server asks to close (or HTTP/1.0) is not reused.
- Failures: ``Http1ConnectError`` (the connection could not be opened, within ``connect_timeout_s``),
  ``Http1Error`` (the server closed the connection or sent what is not HTTP), ``TimeoutError`` from the
  caller's own deadline. The connection of a failed or cancelled request is closed, never reused.
- Streams (``stream()``): the answer's headers, then its body bytes as they arrive, each wait bounded
  by a read timeout and the whole by a total one.
- No TLS, proxies, cookies or redirects: ``remote_openai`` uses this only for ``http://`` servers and
  sends health checks through aiohttp as before. ``available()`` is false without httptools.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from xpuflow import deadlines

__all__ = ["Http1ConnectError", "Http1Error", "Http1Pool", "Http1Stream", "ResponseHeaders", "available"]


class Http1Error(Exception):
    """The server closed the connection before its answer was whole, or answered with what is not HTTP."""


class Http1ConnectError(Http1Error):
    """The connection could not be opened (refused, unreachable, or slower than the connect timeout)."""


class ResponseHeaders(Mapping[str, str]):
    """An answer's headers as a read-only mapping: lower-case names, the last of a repeated one. Decoded
    when asked for: ``get`` of one name looks through the raw pairs (a caller asks for one or two of an
    answer's few headers); iterating decodes them all, once."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        decoded = self._decoded
        if decoded is not None:
            return decoded.get(key, default)
        wanted = key.lower().encode("latin-1")
        found = None
        for name, value in self._raw:
            if len(name) == len(wanted) and name.lower() == wanted:
                found = value
        return default if found is None else found.decode("latin-1")

    def _all(self) -> dict[str, str]:
        decoded = self._decoded
        if decoded is None:
            decoded = self._decoded = {
                name.decode("latin-1").lower(): value.decode("latin-1") for name, value in self._raw
            }
        return decoded

    def __getitem__(self, key: str) -> str:
        return self._all()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return f"ResponseHeaders({self._all()!r})"


def available() -> bool:
    """Whether httptools (the response parser) can be imported."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


class _Connection(asyncio.Protocol):
    """One kept-open connection; answers one request at a time."""

    def __init__(self) -> None:
        import httptools

        self._parser = httptools.HttpResponseParser(self)
        self._error_type: type[Exception] = httptools.HttpParserError
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.reusable = False
        self._waiter: asyncio.Future[None] | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._headers_done = False
        self._streaming = False  # a stream: wake the reader at the headers and at each body piece
        self.complete = False  # the whole answer has arrived
        self.error: Exception | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is no subclass)
        # the connection's loop, once (on Python 3.11 each get_running_loop() is a getpid system call)
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except self._error_type as exc:
            self._finish(Http1Error(f"the server's answer is not valid HTTP/1.1: {exc}"))
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done and not self._delimited():  # the body ran to the close: it is whole
            self._finish(None)
        else:
            why = f": {exc}" if exc is not None else ""
            self._finish(Http1Error(f"the server closed the connection before its answer was whole{why}"))

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True
        if self._streaming:
            self._finish(None)

    def _delimited(self) -> bool:
        """Whether the answer's body ends by itself (Content-Length or chunked), not at the close: asked
        only when the connection closes, not for every answer."""
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                return True
        return False

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        if self._streaming:
            self._finish(None)

    def on_message_complete(self) -> None:
        self.complete = True
        self.reusable = bool(self._parser.should_keep_alive()) and not self.closed
        self._finish(None)

    # -- requests ----------------------------------------------------------------------------------

    def _finish(self, error: Exception | None) -> None:
        if error is not None:
            self.error = error
        elif self.closed and self._headers_done and not self._delimited():
            self.complete = True  # the body ran to the close
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _close(self) -> None:
        self.closed = True
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def _send(self, data: bytes, streaming: bool) -> None:
        assert self.transport is not None
        self.reusable = self.complete = False
        self.error = None
        self._status, self._headers, self._body = 0, [], []
        self._headers_done = False
        self._streaming = streaming
        self.transport.write(data)

    async def _wait(self, timeout_s: float | None = None) -> None:
        """Until the parser has news (or, with ``timeout_s``, TimeoutError past it)."""
        waiter, timer = self._arm(timeout_s)
        try:
            await waiter
        finally:
            self._disarm(timer)

    def _arm(self, timeout_s: float | None) -> tuple[asyncio.Future[None], deadlines.Cancellable | None]:
        """The future the parser's news resolves, and the timer that fails it past ``timeout_s``."""
        loop = self._loop or asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout_s is None else deadlines.call_later_on(loop, timeout_s, _expire, waiter)
        return waiter, timer

    def _disarm(self, timer: deadlines.Cancellable | None) -> None:
        self._waiter = None
        if timer is not None:
            timer.cancel()

    async def request(
        self, data: bytes, timeout_s: float | None = None
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        self._send(data, streaming=False)
        waiter, timer = self._arm(timeout_s)  # _wait's, without a coroutine of its own
        try:
            await waiter
        finally:
            self._disarm(timer)
        parts = self._body
        return self._status, self._headers, parts[0] if len(parts) == 1 else b"".join(parts)

    async def open(self, data: bytes, timeout_s: float) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Send a request whose answer is read as it arrives; returns at its headers."""
        self._send(data, streaming=True)
        while not self._headers_done:
            if self.error is not None:
                raise self.error
            if self.closed:
                raise Http1Error("the server closed the connection before it answered")
            await self._wait(timeout_s)
        return self._status, self._headers

    async def read(self, timeout_s: float) -> bytes:
        """The body bytes that arrived since the last read (waiting up to ``timeout_s`` for some);
        ``b""`` once the answer is whole."""
        while not self._body:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            if self.closed:
                raise Http1Error("the server closed the connection before its answer was whole")
            await self._wait(timeout_s)
        data = b"".join(self._body) if len(self._body) > 1 else self._body[0]
        self._body = []
        return data


def _close_made(connect: asyncio.Future[tuple[asyncio.Transport, _Connection]]) -> None:
    """A connection attempt nobody waits for any more: close the connection if it was made after all."""
    if not connect.cancelled() and connect.exception() is None:
        connect.result()[0].close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())  # the builtin one from Python 3.11


class Http1Stream:
    """An answer being read: ``status``, ``headers`` (lower-case names) and ``read()`` (the bytes that
    arrived since the last call, ``b""`` at the end)."""

    __slots__ = ("_connection", "_deadline", "_loop", "_timeout_s", "headers", "status")

    def __init__(
        self,
        connection: _Connection,
        status: int,
        headers: Mapping[str, str],
        timeout_s: float,
        deadline: float,
    ) -> None:
        self._connection = connection
        self._timeout_s = timeout_s
        self._deadline = deadline
        self._loop = asyncio.get_running_loop()
        self.status = status
        self.headers = headers

    async def read(self) -> bytes:
        left = self._deadline - self._loop.time()
        if left <= 0:
            raise asyncio.TimeoutError()
        return await self._connection.read(min(self._timeout_s, left))

    async def read_all(self) -> bytes:
        parts = []
        while data := await self.read():
            parts.append(data)
        return b"".join(parts)


class Http1Pool:
    """Kept-open HTTP/1.1 connections to one ``host:port``; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        limit: int,
        connect_timeout_s: float,
        headers: Mapping[str, str] = {},
    ) -> None:
        self.host, self.port = host, port
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._free = limit  # requests that may start now (a semaphore without its calls on the hot path)
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        authority = f"[{host}]" if ":" in host else host
        self._host = f"Host: {authority}" + ("" if port == 80 else f":{port}")
        self._headers = {name: value for name, value in headers.items() if name.lower() != "host"}
        self._tails: dict[str | None, bytes] = {}
        self._head_tail = self._tail(None)
        self._closed = False

    def _tail(self, accept: str | None) -> bytes:
        """The request head after its first lines: Host and the pool's headers (``Accept`` replaced)."""
        tail = self._tails.get(accept)
        if tail is None:
            headers = dict(self._headers)
            if accept is not None:
                headers = {k: v for k, v in headers.items() if k.lower() != "accept"}
                headers["Accept"] = accept
            lines = [self._host, *(f"{name}: {value}" for name, value in headers.items())]
            tail = self._tails[accept] = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        return tail

    async def post(
        self,
        path: str,
        body: bytes,
        content_type: str = "application/json",
        *,
        timeout_s: float | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """Send ``POST path`` with ``body``; the status, the headers (lower-case names; the last of a
        repeated one) and the whole body. ``timeout_s`` bounds the wait for the answer once the request
        is sent (TimeoutError past it). Raises as the module docstring says."""
        head = (
            f"POST {path} HTTP/1.1\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        ).encode("latin-1")
        data = head + self._head_tail + b"\r\n" + body
        # _slot's and _connection's ways without a wait, inline (no coroutine for either): a free slot
        # and an idle connection, as most requests find them
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            await self._slot()
        try:
            connection = self._idle_connection()
            if connection is None:
                connection = await self._connect()
            try:
                status, raw_headers, content = await connection.request(data, timeout_s)
            except BaseException:
                self._discard(connection)
                raise
            if connection.reusable and not self._closed:
                self._idle.append(connection)
            else:
                self._discard(connection)
        finally:
            self._release()
        return status, ResponseHeaders(raw_headers), content

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, body: bytes, *, accept: str, read_timeout_s: float, total_timeout_s: float
    ) -> AsyncIterator[Http1Stream]:
        """``POST path`` whose answer is read as it arrives: yields at the answer's headers a
        ``Http1Stream`` (``status``, ``headers``, ``read()``). ``read_timeout_s`` bounds the wait for
        the headers and for each read, ``total_timeout_s`` the whole answer (TimeoutError past either).
        A connection left before its answer was whole is closed."""
        deadline = asyncio.get_running_loop().time() + total_timeout_s
        head = (
            f"POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        ).encode("latin-1")
        await self._slot()
        try:
            connection = await self._connection()
            try:
                status, raw_headers = await connection.open(
                    head + self._tail(accept) + b"\r\n" + body, min(read_timeout_s, total_timeout_s)
                )
                yield Http1Stream(connection, status, ResponseHeaders(raw_headers), read_timeout_s, deadline)
            except BaseException:
                self._discard(connection)
                raise
            if connection.complete and connection.reusable and not self._closed:
                self._idle.append(connection)
            else:
                self._discard(connection)
        finally:
            self._release()

    async def _slot(self) -> None:
        """Take a request slot: a free one at once (a decrement, without suspending), else wait for one in
        turn (``_release`` hands it over by resolving the first waiter's future)."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot came with the cancellation: pass it on
            else:
                self._waiting.remove(waiter)
            raise

    def _release(self) -> None:
        waiting = self._waiting
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the next in line
                return
        self._free += 1

    def _idle_connection(self) -> _Connection | None:
        """The most recently idle open connection, or None."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
            self._all.discard(connection)
        return None

    async def _connection(self) -> _Connection:
        """The most recently idle open connection, else a new one."""
        idle = self._idle_connection()
        return idle if idle is not None else await self._connect()

    async def _connect(self) -> _Connection:
        """A new connection."""
        if self._closed:
            raise Http1Error("the client is closed")
        loop = asyncio.get_running_loop()
        # Not asyncio.wait_for: before Python 3.12 it returns the connection when the caller is cancelled
        # just as the connection is made, and the cancellation is lost (a request given up by its
        # worker, whose upstream hangs, would then wait out its whole timeout). asyncio.wait never
        # swallows the caller's cancellation; a connection made meanwhile is closed.
        connect = loop.create_task(loop.create_connection(_Connection, self.host, self.port))
        try:
            await asyncio.wait({connect}, timeout=self.connect_timeout_s)
        except BaseException:
            connect.cancel()
            connect.add_done_callback(_close_made)
            raise
        if not connect.done():
            connect.cancel()
            connect.add_done_callback(_close_made)
            raise Http1ConnectError(
                f"no connection to {self.host}:{self.port} within {self.connect_timeout_s:g} s"
            )
        try:
            _, connection = connect.result()
        except OSError as exc:
            raise Http1ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._all.add(connection)
        return connection

    def _discard(self, connection: _Connection) -> None:
        self._all.discard(connection)
        connection._close()

    async def close(self) -> None:
        """Close every connection; requests after this fail with ``Http1Error``."""
        self._closed = True
        for connection in list(self._all):
            self._discard(connection)
        self._idle.clear()

    def stats(self) -> dict[str, Any]:
        """Open and idle connections (for tests and debugging)."""
        return {"open": len(self._all), "idle": len(self._idle)}
