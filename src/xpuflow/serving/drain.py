"""Graceful drain: the requests a gateway is answering, and the refusal of new ones while it stops.

``Drain`` is both the count and an ASGI middleware around the app. On SIGTERM (``serving.server``)
the gateway turns ``/ready`` to 503 at once, so load balancers stop sending; requests already in flight
(queued on a worker or running) finish; new ones get 503 with ``Retry-After`` and a JSON body that says
the server is shutting down, and ``Connection: close``; once nothing is in flight, or the drain timeout
has passed, the server closes its listener::

    drain = Drain()
    app = drain.wrap(app)          # counts requests, refuses new ones once drain.begin() is called
    drain.begin()                  # e.g. from a signal handler: plain attribute writes only
    drain.in_flight, drain.draining

Probes (``/health``, ``/ready``, ``/metrics``) are neither counted nor refused, so monitoring keeps seeing
the server while it drains; the dashboard's event stream, which never ends by itself, is not counted.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from xpuflow.serving.openai_schema import error_body

__all__ = ["DRAIN_RETRY_AFTER_S", "Drain", "DrainMiddleware"]

#: ``Retry-After`` (seconds) on requests refused while draining: enough for a replacement to start.
DRAIN_RETRY_AFTER_S = 5

# Answered while draining, not counted: liveness, readiness (503 once draining) and scrapes.
_PROBES = frozenset({"/health", "/ready", "/metrics"})
# Long-lived reads that end only when the client leaves: a drain must not wait for them.
_UNCOUNTED_PREFIX = "/dashboard"


class Drain:
    """The in-flight request count and the draining flag of one gateway. Used from its event loop;
    ``begin()`` may also be called from a signal handler."""

    __slots__ = ("draining", "in_flight")

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False

    def begin(self) -> None:
        """Refuse new requests from now on; those in flight go on."""
        self.draining = True

    @property
    def idle(self) -> bool:
        """No request is being answered."""
        return self.in_flight == 0

    def wrap(self, app: ASGIApp) -> DrainMiddleware:
        return DrainMiddleware(app, self)

    async def refuse(self, send: Send) -> None:
        """The answer to a request that arrives while draining (503, ``Retry-After``, ``Connection:
        close``)."""
        await _refuse(send)

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run a counted request through ``app``, or refuse it while draining (503, ``Retry-After``,
        ``Connection: close``)."""
        if self.draining:
            await _refuse(send)
            return
        self.in_flight += 1
        try:
            await app(scope, receive, send)
        finally:
            self.in_flight -= 1


_REFUSAL = error_body(
    "the server is shutting down and takes no new requests; retry in a few seconds (another replica "
    "answers if there is one)",
    "service_unavailable_error",
    None,
    "shutting_down",
)
_REFUSAL_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_REFUSAL)).encode()),
    (b"retry-after", str(DRAIN_RETRY_AFTER_S).encode()),
    (b"connection", b"close"),
]


class DrainMiddleware:
    """ASGI middleware that counts the requests of ``drain`` and refuses new ones while it drains."""

    __slots__ = ("app", "drain")

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in _PROBES or path.startswith(_UNCOUNTED_PREFIX):
            if self.drain.draining and path not in _PROBES:
                await _refuse(send)
                return
            await self.app(scope, receive, send)
            return
        await self.drain.run(self.app, scope, receive, send)


async def _refuse(send: Send) -> None:
    await send({"type": "http.response.start", "status": 503, "headers": _REFUSAL_HEADERS})
    await send({"type": "http.response.body", "body": _REFUSAL})
