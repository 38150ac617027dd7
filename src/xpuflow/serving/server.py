"""The HTTP server ``xpuflow serve`` runs: its listening socket, and uvicorn with a graceful drain.

    sock = listen_socket("127.0.0.1", 8000)
    server = GatewayServer(uvicorn.Config(app, lifespan="off"), drain, drain_timeout_s=120.0)
    await server.serve(sockets=[sock])     # returns after SIGTERM/SIGINT and the drain

The listening socket is created as a TCP socket (``IPPROTO_TCP``) with ``TCP_NODELAY``: asyncio turns
Nagle's algorithm off only on accepted sockets whose listener says ``proto == IPPROTO_TCP``, and a
response written in two parts (headers, then body) would otherwise wait for the client's delayed ACK,
about 40 ms per keep-alive request. Linux accepted sockets inherit the option from the listener too.

Before it serves, ``settle_heap`` collects the start-up garbage, moves every object left (modules, the
config, the models' Python objects) out of the collector's sight (``gc.freeze``) and raises the youngest
generation's threshold from 700 to ``GC_YOUNG_THRESHOLD``. Requests allocate and free many small
containers; with the default threshold the collector ran about once per 13 requests at 3,700 requests a
second, each time walking the objects of every request in flight, which cost about a fifth of the
gateway's CPU per request (docs/api.md, "Overhead"). Garbage with reference cycles (a failed request's
exception and its frames) waits a little longer before it is freed.

On the first SIGTERM or SIGINT the server drains (``serving.drain``): ``/ready`` answers 503, new
requests get 503 with ``Retry-After``, requests in flight finish; the server stops once none is left or
``drain_timeout_s`` has passed. A second signal stops it at once.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from xpuflow.serving.drain import Drain

__all__ = ["GC_YOUNG_THRESHOLD", "GatewayServer", "listen_socket", "settle_heap"]

log = logging.getLogger(__name__)


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket for ``host:port`` (IPv6 when ``host`` has a colon), with
    ``SO_REUSEADDR`` and ``TCP_NODELAY``. Raises OSError when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
    except BaseException:
        sock.close()
        raise
    return sock


#: Net new container objects between two collections of the youngest generation (Python's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Collect, freeze what survives start-up, and let the youngest generation grow to
    ``GC_YOUNG_THRESHOLD`` objects between collections (the older generations keep their thresholds)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


class GatewayServer(uvicorn.Server):
    """uvicorn's server with a drain on SIGTERM and SIGINT instead of an immediate stop.

    ``on_drain_start(in_flight, drain_timeout_s)`` is called once, on the event loop, when the drain
    begins (to tell the operator); ``drained_in_time`` says afterwards whether it ended before its
    timeout. The clock is injectable for tests."""

    def __init__(
        self,
        config: uvicorn.Config,
        drain: Drain,
        *,
        drain_timeout_s: float,
        on_drain_start: Callable[[int, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self.on_drain_start = on_drain_start
        self.clock = clock
        self.drain_deadline_s: float | None = None
        self.drained_in_time: bool | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in a signal handler: plain attribute writes only; on_tick does the rest. Not recording
        # the signal keeps uvicorn from re-raising it after serve() returns, so the caller's cleanup
        # (the orchestrator's stop) runs.
        if self.drain.draining or self.should_exit:
            self.should_exit = True  # a second signal: stop now, cutting off what is left
            self.force_exit = sig == signal.SIGINT
            return
        self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            now = self.clock()
            if self.drain_deadline_s is None:
                self.drain_deadline_s = now + self.drain_timeout_s
                if self.on_drain_start is not None:
                    self.on_drain_start(self.drain.in_flight, self.drain_timeout_s)
            if self.drain.idle:
                self.drained_in_time = True
                self.should_exit = True
            elif now >= self.drain_deadline_s:
                log.warning(
                    "drain timeout (%g s) passed with %d request(s) in flight; they are cut off",
                    self.drain_timeout_s,
                    self.drain.in_flight,
                )
                self.drained_in_time = False
                self.should_exit = True
        return await super().on_tick(counter)
