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
- No TLS, proxies, cookies or redirects: ``remote_openai`` uses this only for ``http://`` servers and
  sends streams and health checks through aiohttp as before. ``available()`` is false without httptools.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

__all__ = ["Http1ConnectError", "Http1Error", "Http1Pool", "available"]


class Http1Error(Exception):
    """The server closed the connection before its answer was whole, or answered with what is not HTTP."""


class Http1ConnectError(Http1Error):
    """The connection could not be opened (refused, unreachable, or slower than the connect timeout)."""


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
        self.closed = False
        self.reusable = False
        self._waiter: asyncio.Future[None] | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._headers_done = False
        self._delimited = False  # Content-Length or chunked: the body ends by itself, not at close

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is no subclass)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except self._error_type as exc:
            self._finish(Http1Error(f"the server's answer is not valid HTTP/1.1: {exc}"))
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done and not self._delimited:  # the body ran to the close: it is whole
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
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                self._delimited = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.reusable = bool(self._parser.should_keep_alive()) and not self.closed
        self._finish(None)

    # -- requests ----------------------------------------------------------------------------------

    def _finish(self, error: Exception | None) -> None:
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

    async def request(self, data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        assert self.transport is not None
        self.reusable = False
        self._status, self._headers, self._body = 0, [], []
        self._headers_done = self._delimited = False
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            await self._waiter
        finally:
            self._waiter = None
        return self._status, self._headers, b"".join(self._body)


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
        self._slots = asyncio.Semaphore(limit)
        authority = f"[{host}]" if ":" in host else host
        default_port = port == 80
        lines = [f"Host: {authority}" + ("" if default_port else f":{port}")]
        lines += [f"{name}: {value}" for name, value in headers.items() if name.lower() != "host"]
        self._head_tail = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._closed = False

    async def post(
        self, path: str, body: bytes, content_type: str = "application/json"
    ) -> tuple[int, Mapping[str, str], bytes]:
        """Send ``POST path`` with ``body``; the status, the headers (lower-case names; the last of a
        repeated one) and the whole body. Raises as the module docstring says."""
        head = (
            f"POST {path} HTTP/1.1\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        ).encode("latin-1")
        data = head + self._head_tail + b"\r\n" + body
        async with self._slots:
            connection = await self._connection()
            try:
                status, raw_headers, content = await connection.request(data)
            except BaseException:
                self._discard(connection)
                raise
            if connection.reusable and not self._closed:
                self._idle.append(connection)
            else:
                self._discard(connection)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw_headers}
        return status, headers, content

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
            self._all.discard(connection)
        if self._closed:
            raise Http1Error("the client is closed")
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port), self.connect_timeout_s
            )
        except asyncio.TimeoutError as exc:
            raise Http1ConnectError(
                f"no connection to {self.host}:{self.port} within {self.connect_timeout_s:g} s"
            ) from exc
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
