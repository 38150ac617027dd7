"""The request path between the gateway and a worker actor: one TCP connection, frames both ways.

Ray places, restarts and watches the worker actors; requests take this channel instead of an actor
call, because a Ray call costs about 2 ms here (core worker to core worker, its thread hops on both
sides) against about 0.1 ms for a frame on a kept-open connection. The actor opens the channel on its
node (``ChannelServer``, on the actor's event loop) and reports ``host:port`` in its state; the
gateway's ``RayWorker`` connects once and multiplexes every request over it (``ChannelClient``)::

    server = await ChannelServer.start(handler, host="10.0.0.5", token=token)   # in the actor
    client = ChannelClient("10.0.0.5", server.port, token)                    # in the gateway
    kind, value = await client.call(wire_request)           # ("ok", result) or ("err", WireError)
    stream = await client.stream(wire_request)
    async for kind, value in stream:                        # ("chunk", StreamChunk) ... or ("err", ...)
        ...                                                 # stream.close() early: cancelled there
    await client.aclose()

Frames are a 4-byte big-endian length and a pickle. Pickles are only read from a peer that first sent
the token the gateway gave the actor at creation (a secret that travels inside Ray), so the port takes
nothing from anyone else; like Ray's own traffic, the channel is not encrypted (docs/cluster.md).
Cancelling a call or leaving a stream early sends a cancel frame: the actor cancels the task, which
withdraws the request from the worker's queue. When the gateway's connection closes, the actor cancels
everything it was doing for that connection; when the actor's side closes, every open call fails with
``ChannelClosed`` at once (the ``RayWorker`` retries them elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import pickle
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from xpuflow.cluster.messages import error_to_wire

__all__ = ["ChannelClient", "ChannelClosed", "ChannelServer", "ChannelStream", "Handler"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
_MAX_FRAME_BYTES = 256 * 1024 * 1024  # a frame announcing more is a broken or hostile peer
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_END = ("end", None)

#: The actor's side: ``call(wire)`` answers one ``(kind, value, ...)`` tuple (passed through whole);
#: ``stream(wire)`` yields ``(kind, value)`` pairs. Errors
#: are answers (``("err", WireError)``); a handler that raises all the same is answered so.
Handler = tuple[
    Callable[[Any], Awaitable[tuple[Any, ...]]],
    Callable[[Any], AsyncIterator[tuple[str, Any]]],
]


class ChannelClosed(ConnectionError):
    """The channel's connection closed or could not be opened; the request did not get its answer."""


def _frame(message: Any) -> bytes:
    body = pickle.dumps(message, _PROTOCOL)
    return _HEADER.pack(len(body)) + body


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Frames(asyncio.Protocol):
    """Splits the byte stream into frames; a subclass decides what a frame means."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= 4:
            (size,) = _HEADER.unpack_from(buffer, offset)
            if size > _MAX_FRAME_BYTES:
                self.fail(f"frame of {size} bytes")
                return
            if len(buffer) - offset - 4 < size:
                break
            body = bytes(buffer[offset + 4 : offset + 4 + size])
            offset += 4 + size
            self.frame(body)
            if self.transport is None or self.transport.is_closing():
                return
        if offset:
            del buffer[:offset]

    def send(self, message: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame(message))

    def fail(self, why: str) -> None:
        log.warning("closing a cluster channel connection: %s", why)
        if self.transport is not None:
            self.transport.abort()

    def frame(self, body: bytes) -> None:
        raise NotImplementedError


class _ServerConnection(_Frames):
    """One gateway's connection to the actor: the token first, then requests it runs as tasks."""

    def __init__(self, handler: Handler, token: bytes, open_connections: set[_ServerConnection]) -> None:
        super().__init__()
        self._call, self._stream = handler
        self._open = open_connections
        self._token = token
        self._trusted = False
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def frame(self, body: bytes) -> None:
        if not self._trusted:
            # the first frame is the raw token: nothing is unpickled before it matches
            if not hmac.compare_digest(body, self._token):
                self.fail("wrong token")
                return
            self._trusted = True
            return
        op, request_id, wire = pickle.loads(body)
        if op == "cancel":
            task = self._tasks.get(request_id)
            if task is not None:
                task.cancel()
            return
        run = self._run_call(request_id, wire) if op == "call" else self._run_stream(request_id, wire)
        task = asyncio.ensure_future(run)
        self._tasks[request_id] = task
        task.add_done_callback(functools.partial(self._done, request_id))

    def _done(self, request_id: int, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(request_id, None)

    async def _run_call(self, request_id: int, wire: Any) -> None:
        try:
            answer = await self._call(wire)
        except Exception as exc:  # handlers answer errors themselves; this is the safety net
            log.exception("cluster channel handler failed")
            answer = ("err", error_to_wire(exc))
        try:
            self.send((request_id, *answer))
        except Exception as exc:  # an answer that does not pickle: say so rather than never answer
            log.exception("cluster channel: the answer to request %d cannot be sent", request_id)
            self.send((request_id, "err", error_to_wire(exc)))

    async def _run_stream(self, request_id: int, wire: Any) -> None:
        try:
            async for kind, value in self._stream(wire):
                self.send((request_id, kind, value))
        except Exception as exc:
            log.exception("cluster channel stream handler failed")
            self.send((request_id, "err", error_to_wire(exc)))
        self.send((request_id, *_END))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._open.discard(self)
        for task in list(self._tasks.values()):
            task.cancel()  # the gateway is gone: nobody waits for these answers


class ChannelServer:
    """The actor's listening socket (see the module docstring)."""

    def __init__(
        self, server: asyncio.AbstractServer, host: str, port: int, connections: set[_ServerConnection]
    ) -> None:
        self._server = server
        self.host = host
        self.port = port
        self._connections = connections

    @classmethod
    async def start(cls, handler: Handler, *, host: str, token: str, port: int = 0) -> ChannelServer:
        secret = token.encode()
        connections: set[_ServerConnection] = set()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _ServerConnection(handler, secret, connections), host=host, port=port
        )
        bound = server.sockets[0].getsockname()
        return cls(server, host, int(bound[1]), connections)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def aclose(self) -> None:
        """Stop listening and close every connection (their calls fail at the gateway at once)."""
        self._server.close()
        for connection in list(self._connections):
            if connection.transport is not None:
                connection.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5.0)


class _ClientConnection(_Frames):
    """The gateway's end: answers go to the future or queue of the request that they name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
        self.streams: dict[int, asyncio.Queue[tuple[str, Any]]] = {}
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def frame(self, body: bytes) -> None:
        request_id, *answer = pickle.loads(body)
        future = self.calls.pop(request_id, None)
        if future is not None:
            if not future.done():
                future.set_result(tuple(answer))
            return
        queue = self.streams.get(request_id)
        if queue is not None:
            queue.put_nowait((answer[0], answer[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        why = f"the worker's channel closed ({exc or 'by the worker'})"
        if not self.closed.done():
            self.closed.set_result(why)
        for future in self.calls.values():
            if not future.done():
                future.set_exception(ChannelClosed(why))
        self.calls.clear()
        for queue in self.streams.values():
            queue.put_nowait(("closed", why))


class ChannelStream:
    """One streamed request's answers, in order; ``close()`` before the end cancels it on the actor."""

    def __init__(self, connection: _ClientConnection, request_id: int, queue: asyncio.Queue[Any]) -> None:
        self._connection = connection
        self._request_id = request_id
        self._queue = queue
        self._ended = False

    def __aiter__(self) -> ChannelStream:
        return self

    async def __anext__(self) -> tuple[str, Any]:
        return await self.next()

    async def next(self) -> tuple[str, Any]:
        """The next ``(kind, value)``; StopAsyncIteration at the end, ChannelClosed if the link broke."""
        if self._ended:
            raise StopAsyncIteration
        kind, value = await self._queue.get()
        if kind == "end":
            self._end()
            raise StopAsyncIteration
        if kind == "closed":
            self._end()
            raise ChannelClosed(value)
        return kind, value

    def _end(self) -> None:
        self._ended = True
        self._connection.streams.pop(self._request_id, None)

    def close(self) -> None:
        """Stop reading; if the stream has not ended, the actor cancels it (idempotent)."""
        if not self._ended:
            self._end()
            self._connection.send(("cancel", self._request_id, None))


class ChannelClient:
    """The gateway's connection to one worker actor, opened on first use and again after a close."""

    def __init__(self, host: str, port: int, token: str, *, connect_timeout_s: float = 2.0) -> None:
        self.host = host
        self.port = port
        self._token = token.encode()
        self._connect_timeout_s = connect_timeout_s
        self._connection: _ClientConnection | None = None
        self._connecting: asyncio.Future[_ClientConnection] | None = None
        self._next_id = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _open(self) -> _ClientConnection:
        connection = self._connection
        if connection is not None and connection.transport is not None:
            return connection
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        connection = await asyncio.shield(self._connecting)
        if connection.transport is None:  # closed while this call waited for it
            raise ChannelClosed(f"the worker's channel at {self.address} closed as it opened")
        return connection

    async def _connect(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            _transport, connection = await asyncio.wait_for(
                loop.create_connection(_ClientConnection, self.host, self.port), self._connect_timeout_s
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise ChannelClosed(f"cannot open the worker's channel at {self.address}: {exc}") from exc
        if connection.transport is None:
            raise ChannelClosed(f"the worker's channel at {self.address} closed as it opened")
        connection.transport.write(_HEADER.pack(len(self._token)) + self._token)
        self._connection = connection
        return connection

    def _request_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def call(self, wire: Any) -> tuple[Any, ...]:
        """The handler's answer: ``(kind, value, ...)`` as the actor's ``call`` returned it."""
        connection = await self._open()
        request_id = self._request_id()
        future: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        connection.calls[request_id] = future
        connection.send(("call", request_id, wire))
        try:
            return await future
        except asyncio.CancelledError:
            if connection.calls.pop(request_id, None) is not None:
                connection.send(("cancel", request_id, None))
            raise

    async def stream(self, wire: Any) -> ChannelStream:
        """Start a streamed request; read it with ``await stream.next()`` (or ``async for``)."""
        connection = await self._open()
        request_id = self._request_id()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        connection.streams[request_id] = queue
        connection.send(("stream", request_id, wire))
        return ChannelStream(connection, request_id, queue)

    def close(self) -> None:
        """Close the connection; its open calls fail with ChannelClosed and the actor cancels them."""
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            connection.transport.close()

    async def aclose(self) -> None:
        self.close()
