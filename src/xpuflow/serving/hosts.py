"""The Host header allowlist: a gateway on 127.0.0.1 answers only requests addressed to it by name.

A web page can make a browser resolve its own domain to 127.0.0.1 (DNS rebinding) and then read any
local server as same-origin: the browser still sends ``Host: attacker.example``. Checking the Host
header closes that door, as Django's ``ALLOWED_HOSTS`` and Starlette's ``TrustedHostMiddleware`` do;
this one answers in the gateway's OpenAI-shaped JSON::

    app = HostFilter(app, ("localhost", "127.0.0.1", "[::1]"))   # any port; 400 for other hosts
    HostFilter(app, ("api.example.com", "*.internal.example.com"))

``xpuflow serve`` installs it with ``LOOPBACK_HOSTS`` when it listens on a loopback address and
``gateway.allowed_hosts`` is not set; ``["*"]`` turns it off.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from xpuflow.serving.openai_schema import error_body

__all__ = ["HostFilter", "host_name", "host_of", "is_loopback_address"]


def is_loopback_address(host: str) -> bool:
    """Whether a listening address (``127.0.0.1``, ``::1``, ``localhost``) is reachable only locally."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_SEEN_MAX = 256


def host_name(header: str) -> str:
    """The host of a Host header, lower case, without its port: ``[::1]:8000`` -> ``[::1]``."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end > 0 else header
    name, _, _ = header.partition(":")
    return name.rstrip(".")  # "localhost." names the same host


def host_of(scope: Scope) -> str:
    """The request's ``Host`` header ("" when it has none)."""
    for key, value in scope["headers"]:
        if key == b"host":
            return str(value.decode("latin-1"))
    return ""


class HostFilter:
    """ASGI middleware: requests whose Host is not allowed get 400 with a message that says how to
    allow it. ``allowed`` holds names (``localhost``, ``[::1]``) and ``*.domain`` suffixes."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        names = [host_name(h) if not h.startswith("*.") else h.lower() for h in allowed]
        self.exact = frozenset(n for n in names if not n.startswith("*."))
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))  # "*.a.b" -> ".a.b"
        self.listed = ", ".join(sorted(self.exact) + [f"*{s}" for s in self.suffixes])
        self._seen: set[str] = set()  # Host headers allowed already, as sent (clients send a few)

    def allows(self, host: str) -> bool:
        if host in self._seen:
            return True
        name = host_name(host)
        allowed = name in self.exact or (bool(self.suffixes) and name.endswith(self.suffixes))
        if allowed and len(self._seen) < _SEEN_MAX:
            self._seen.add(host)
        return allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = host_of(scope)
        if self.allows(host):
            await self.app(scope, receive, send)
            return
        await self.refuse(scope, send, host)

    async def refuse(self, scope: Scope, send: Send, host: str) -> None:
        """Answer a request whose ``host`` is not allowed (400, or a refused WebSocket handshake)."""
        shown = host[:100] if host else "(none)"
        body = error_body(
            f"Host header {shown!r} is not allowed: this gateway answers to {self.listed}; add the "
            "name to gateway.allowed_hosts (or ['*'] to answer any) when it is reached by another name",
            "invalid_request_error",
            None,
            "host_not_allowed",
        )
        if scope["type"] == "websocket":  # a close before accept refuses the handshake (HTTP 403)
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})
