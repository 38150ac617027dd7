"""The gateway's HTTP/1.1 protocol: uvicorn's httptools protocol with two costs taken off each request.

``xpuflow serve`` passes :class:`GatewayHttpProtocol` as ``uvicorn.Config(http=...)``. Everything uvicorn
does stays (keep-alive, pipelining, flow control, 100-continue, HEAD, chunked bodies, its error answers,
the ``date``/``server`` headers, ``connection: close``); what changes:

* **One write per small response.** uvicorn writes a response's head on ``http.response.start`` and its
  body on ``http.response.body``: two ``send()`` calls and two TCP segments. When the start message
  carries ``content-length``, the encoded head is held and goes out in one write with the body's first
  bytes. A response without it (an SSE stream, a chunked body) still has its head written at once, since
  a stream may start long before its first event. A held head is dropped, never sent alone, when the
  connection closes first (the app raised or returned without its body; the client left).
* **Disconnect without a task.** An app learns that the client left by calling ``receive()`` and
  waiting for ``http.disconnect``: a task per request only for that. This protocol offers the ASGI scope
  extension ``xpuflow.disconnect`` instead, whose ``watch`` registers a callback::

      extension = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
      if extension is not None:
          unwatch = extension["watch"](on_client_gone)  # on_client_gone() runs at most once
          ...
          unwatch()  # the answer is out: no longer interested

  The callback runs once, from the event loop, when the connection is lost while the request is in
  flight (its response not complete), or soon after ``watch`` if it already was. ``unwatch`` is
  idempotent. The extension's ``"loop"`` is the event loop the app runs on (a handler finds its task
  with it: on Python 3.11 asking for the running loop is a ``getpid`` system call).
  ``serving/inference.py`` uses it and keeps ``receive()`` for other servers.

* **A whole answer in one call.** The scope extension ``xpuflow.respond`` holds ``respond(status,
  headers, body) -> bool``: the status line, uvicorn's default headers, ``content-length``, the given
  headers and the body, encoded and written at once, with the keep-alive and pipelining bookkeeping of
  uvicorn's own end of a response. It skips the two ASGI messages and uvicorn's per-header checks, so the
  caller must pass headers that are already safe (lower-case names; values without control characters:
  the inference endpoints clean theirs). It answers False, having written nothing, when the ordinary way
  must be taken (the response has begun, the transport is paused or gone, a HEAD request); the caller
  then sends the ASGI messages.

* **Nothing left for the garbage collector.** When the app has ended, the cycle lets go of what ties a
  request's objects into a reference cycle (the scope's extensions hold the cycle's methods; after the
  end they are stand-ins that answer as an ended request would: ``watch`` registers nothing, ``respond``
  is False), so they are freed at once instead of by a collection.

The subclasses lean on uvicorn 0.55's ``httptools_impl`` (``on_headers_complete`` and ``run_asgi`` are
its copies, with the cycle class swapped and the references let go); the tests in
``tests/serving/test_http_protocol.py`` pin the behaviours above. With another uvicorn release
(``supports_installed_uvicorn`` is false) ``xpuflow serve`` runs uvicorn's own protocol.
"""

from __future__ import annotations

import asyncio
import functools
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

import httptools
from uvicorn._types import ASGI3Application, ASGIReceiveEvent, ASGISendEvent, HTTPRequestEvent
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

# the names the inference endpoints look for (defined there, so that they need no httptools)
from xpuflow import deadlines
from xpuflow.events import LightEvent
from xpuflow.serving.inference import DISCONNECT_EXTENSION, RESPOND_EXTENSION

__all__ = [
    "DISCONNECT_EXTENSION",
    "RESPOND_EXTENSION",
    "GatewayHttpProtocol",
    "GatewayRequestCycle",
    "supports_installed_uvicorn",
]

#: The uvicorn releases whose ``httptools_impl`` these subclasses were written against and tested with
#: (the lock file's); with another, ``xpuflow serve`` runs uvicorn's own protocol.
UVICORN_SERIES = ("0.55.",)


def supports_installed_uvicorn() -> bool:
    """Whether the installed uvicorn is one these subclasses know the internals of."""
    import uvicorn

    return uvicorn.__version__.startswith(UVICORN_SERIES)


#: Up to this many body bytes are copied behind a held head (one ``write``); a larger body goes out with
#: it in one ``writelines`` instead, which uvloop sends with one ``writev`` and no copy.
_JOIN_MAX_BYTES = 64 * 1024


class _HeadHoldingTransport(asyncio.Transport):
    """The transport a request cycle writes to: the connection's own, except that it can hold the
    response head back so that it leaves with the next write. ``close`` drops a held head, so the client
    never sees a head without its body."""

    __slots__ = ("held", "hold_next", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self.transport = transport
        self.hold_next = False  # the next write is a head to hold
        self.held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.hold_next:
            self.held = bytes(data)
            self.hold_next = False
            return
        held = self.held
        if held is None:
            if data:
                self.transport.write(data)
            return
        self.held = None
        if len(data) <= _JOIN_MAX_BYTES:
            self.transport.write(held + data)
        else:
            self.transport.writelines((held, data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def flush(self) -> None:
        """Write a held head now (a response that has no body to carry it)."""
        held = self.held
        if held is not None:
            self.held = None
            self.transport.write(held)

    def close(self) -> None:
        self.held = None
        self.transport.close()

    def abort(self) -> None:
        self.held = None
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)


# A request cycle's ``message_event``: made once per request and set two or three times, almost always
# with nobody waiting (the body is whole before the app asks for it).
_MessageEvent = LightEvent


def _discard(watchers: list[Callable[[], object]], callback: Callable[[], object]) -> None:
    if callback in watchers:
        watchers.remove(callback)


class GatewayRequestCycle(RequestResponseCycle):
    """uvicorn's request/response cycle that holds a ``content-length`` response's head for its body
    and keeps the callbacks of the ``xpuflow.disconnect`` extension."""

    def __init__(self, protocol: GatewayHttpProtocol, out: _HeadHoldingTransport, keep_alive: bool) -> None:
        # uvicorn 0.55's __init__, its arguments taken from the protocol as its on_headers_complete
        # passes them (a keyword call through super().__init__ cost more than the rest)
        self.scope = protocol.scope
        self.transport = out
        self.flow = protocol.flow
        self.logger = protocol.logger
        self.access_logger = protocol.access_logger
        self.access_log = protocol.access_log
        self.default_headers = protocol.server_state.default_headers
        self.message_event = _MessageEvent()
        self.on_response = protocol.on_response_complete
        self.disconnected = False
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = protocol.expect_100_continue
        self.body = bytearray()
        self.more_body = True
        self.response_started = False
        self.response_complete = False
        self.chunked_encoding = None
        self.expected_content_length = 0
        self.out = out
        self.disconnect_watchers: list[Callable[[], object]] | None = None

    async def receive(self) -> ASGIReceiveEvent:
        # uvicorn 0.55's, without waiting on the message event when it is set already (as it is when the
        # app asks for a body that has arrived whole): no coroutine for the wait
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            flow = self.flow
            if flow.read_paused:
                flow.resume_reading()
            event = self.message_event
            if not event.is_set():
                await event.wait()
            event.clear()
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        message: HTTPRequestEvent = {
            "type": "http.request",
            "body": bytes(self.body),
            "more_body": self.more_body,
        }
        self.body = bytearray()
        return message

    async def send(self, message: ASGISendEvent) -> None:
        if self.response_started:
            await super().send(message)
            return
        # Wait for a paused transport here rather than in uvicorn's send, so that nothing else (a
        # "100 Continue" from receive) can write while the head is being caught.
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()  # pragma: no cover - needs a full socket buffer before any answer
        out = self.out
        out.hold_next = True
        try:
            await super().send(message)  # encodes and validates the head: its one write is held
        finally:
            out.hold_next = False
        # chunked_encoding is False only when the start carried content-length; HEAD has no body bytes
        if self.chunked_encoding is not False or self.scope["method"] == "HEAD":
            out.flush()

    async def run_asgi(self, app: ASGI3Application) -> None:
        # uvicorn 0.55's, ending with the references that make a cycle per request let go: the scope's
        # extensions hold this cycle's methods while the cycle holds the scope, so every request's
        # objects would wait for the garbage collector (on the benchmark, a tenth of the gateway's CPU)
        try:
            result = await app(self.scope, self.receive, self.send)  # type: ignore[func-returns-value]
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        else:
            if result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
                self.transport.close()
            elif not self.response_started and not self.disconnected:
                self.logger.error("ASGI callable returned without starting response.")
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                self.logger.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            self.on_response = _no_op
            self.disconnect_watchers = None
            extensions = self.scope.get("extensions")
            if extensions is not None:  # what each would answer now that the app has ended
                extensions[DISCONNECT_EXTENSION] = _ENDED_DISCONNECT
                extensions[RESPOND_EXTENSION] = _ENDED_RESPOND

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """Write the whole response (``content-length`` added) in one write and end it as uvicorn ends
        one; False, with nothing written, where the ASGI messages must be sent instead. ``headers``
        must be safe already (see the module docstring)."""
        if (
            self.response_started
            or self.disconnected
            or self.flow.write_paused
            or self.scope["method"] == "HEAD"
        ):
            return False
        self.response_started = True
        self.waiting_for_100_continue = False
        if self.access_log:  # the line uvicorn's send logs
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(self.scope),
                self.scope["method"],
                get_path_with_query_string(self.scope),
                self.scope["http_version"],
                status,
            )
        default = self.default_headers
        start = _STARTS.get(status)
        if start is None or start[0] is not default:  # uvicorn makes a new list when the date changes
            lines = b"".join(name + b": " + value + b"\r\n" for name, value in default)
            start = _STARTS[status] = (default, STATUS_LINE[status] + lines)
        parts = [start[1], b"content-length: ", str(len(body)).encode(), b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", body)
        self.out.transport.write(b"".join(parts))
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()
        return True

    def watch_disconnect(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback()`` once if the client leaves before this request's response is complete;
        returns the function that takes the registration back. Never calls it synchronously."""
        if self.disconnected:
            return asyncio.get_running_loop().call_soon(callback).cancel
        if self.response_complete:
            return _no_op
        watchers = self.disconnect_watchers
        if watchers is None:
            watchers = self.disconnect_watchers = []
        watchers.append(callback)
        return functools.partial(_discard, watchers, callback)

    def fire_disconnect(self) -> None:
        """The connection is gone: mark the cycle disconnected, as uvicorn does, and run the callbacks."""
        self.disconnected = True
        self.message_event.set()
        watchers, self.disconnect_watchers = self.disconnect_watchers, None
        for callback in watchers or ():
            try:
                callback()
            except Exception:
                self.logger.exception("a disconnect callback failed")


# status -> (uvicorn's default headers list, the status line and those headers encoded): a response's
# start, made again only when uvicorn replaces the list (once a second, for the date); the list is held,
# so its identity cannot be reused while it is here
_STARTS: dict[int, tuple[list[tuple[bytes, bytes]], bytes]] = {}


def _no_op() -> None:
    return None


def _watch_ended(callback: Callable[[], object]) -> Callable[[], None]:
    return _no_op


def _respond_ended(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
    return False


# the extensions of a request whose app has ended: nothing to watch, nothing more to answer
_ENDED_DISCONNECT = {"watch": _watch_ended}
_ENDED_RESPOND = {"respond": _respond_ended}


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`GatewayRequestCycle` for each request and the
    ``xpuflow.disconnect`` scope extension."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out: _HeadHoldingTransport | None = None
        # the cycle whose app runs; self.cycle is the last one parsed, which differs when pipelining
        self.running_cycle: RequestResponseCycle | None = None
        # the keep-alive timeout: when the connection fell idle (its last answer complete, nothing read
        # since; None while a request is on it), and the one timer that checks it (see _idle_check)
        self.idle_since: float | None = None
        self.idle_timer: deadlines.Cancellable | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.out = _HeadHoldingTransport(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        running = self.running_cycle
        super().connection_lost(exc)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if isinstance(running, GatewayRequestCycle) and not running.response_complete:
            running.fire_disconnect()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self.running_cycle = cycle
        task = self.loop.create_task(cycle.run_asgi(app))  # uvicorn 0.55's, inline
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    # The keep-alive timeout. uvicorn arms a timer after every answer and cancels it at the next bytes
    # read: two timer operations per request, more than the rest of on_response_complete. Here the
    # answer notes the time the connection fell idle and the bytes read clear it; one timer per
    # connection, on the loop's deadline timer (xpuflow.deadlines), checks when it comes due: an idle
    # connection that has been idle for timeout_keep_alive is closed, one idle for less is checked
    # again when its time is up, and a busy one is left to its next answer, which arms the timer again.
    # So a connection is closed at most 50 ms (the deadline timer's resolution) after it has been idle
    # for timeout_keep_alive, never before, as uvicorn's timer closes it.

    def _unset_keepalive_if_required(self) -> None:
        self.idle_since = None  # bytes read: a request is on the connection

    def on_response_complete(self) -> None:
        # uvicorn 0.55's, with the keep-alive timeout above
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self.idle_since = self.loop.time()
            if self.idle_timer is None:
                self.idle_timer = deadlines.call_later_on(
                    self.loop, self.timeout_keep_alive, self._idle_check
                )

    def _idle_check(self) -> None:
        self.idle_timer = None
        since = self.idle_since
        if since is None or self.transport.is_closing():
            return  # busy: its answer arms the timer again
        left = since + self.timeout_keep_alive - self.loop.time()
        if left <= 0:
            self.timeout_keep_alive_handler()
        else:
            self.idle_timer = deadlines.call_later_on(self.loop, left, self._idle_check)

    def on_headers_complete(self) -> None:
        # uvicorn 0.55's on_headers_complete, building a GatewayRequestCycle and adding the extension
        http_version = self.parser.get_http_version()
        method = self.parser.get_method()
        self.scope["method"] = method.decode("ascii")
        if http_version != "1.1":
            self.scope["http_version"] = http_version
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        full_path = self.root_path + path
        full_raw_path = self.root_path.encode("ascii") + raw_path
        self.scope["path"] = full_path
        self.scope["raw_path"] = full_raw_path
        self.scope["query_string"] = parsed_url.query or b""

        # Handle 503 responses when 'limit_concurrency' is exceeded.
        if self.limit_concurrency is not None and (
            len(self.connections) >= self.limit_concurrency or len(self.tasks) >= self.limit_concurrency
        ):
            app = service_unavailable
            message = "Exceeded concurrency limit."
            self.logger.warning(message)
        else:
            app = self.app

        assert self.out is not None  # set by connection_made
        existing_cycle = self.cycle
        cycle = GatewayRequestCycle(self, self.out, http_version != "1.0" and self.parser.should_keep_alive())
        self.cycle = cycle
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[DISCONNECT_EXTENSION] = {"watch": cycle.watch_disconnect, "loop": self.loop}
        extensions[RESPOND_EXTENSION] = {"respond": cycle.respond}
        if existing_cycle is None or existing_cycle.response_complete:
            # Standard case - start processing the request.
            self._start_asgi_task(cycle, app)
        else:
            # Pipelined HTTP requests need to be queued up.
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))
