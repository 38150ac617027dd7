"""The floor of a reverse proxy in Python, for ``gateway_overhead.py``: what one Python process on uvloop
costs per request before any gateway feature.

Per request it does what every router has to: parse the client's HTTP/1.1 request (httptools), read the
JSON body's ``model`` (``json.loads``), send the request on a kept-open upstream connection, and pass the
answer's bytes back as they arrive (streams included), ending when the upstream's parser says the answer
is whole. No auth, validation, routing choice, retries, metrics, queues or timeouts: callbacks only, no
task or future per request. It is an anchor, never a product::

    python benchmarks/python_floor_proxy.py --upstream http://127.0.0.1:9100 --port 9300  # "ready <port>"

One request at a time per client connection (the benchmark's clients do not pipeline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import httptools


class Upstream(asyncio.Protocol):
    """One kept-open connection to the upstream; relays one answer at a time to ``client``."""

    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.transport.close()
            self.client = None

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None:
            client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.client = None
        self.pool.append(self)


class Client(asyncio.Protocol):
    """One client connection: parses its requests and hands each to an upstream connection."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.raw: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.raw.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        request, self.raw = b"".join(self.raw), []
        body, self.body = b"".join(self.body), []
        if body:
            json.loads(body).get("model")  # what a router reads to choose where the request goes
        self.proxy.forward(self, request)


class Proxy:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.pool: list[Upstream] = []

    def forward(self, client: Client, request: bytes) -> None:
        if self.pool:
            upstream = self.pool.pop()
            upstream.client = client
            upstream.transport.write(request)
            return
        asyncio.get_running_loop().create_task(self._connect_and_send(client, request))

    async def _connect_and_send(self, client: Client, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: Upstream(self.pool), self.host, self.port)
        upstream.client = client
        upstream.transport.write(request)


async def serve(upstream: str, host: str, port: int) -> None:
    target = urlsplit(upstream)
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 80)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(proxy), host, port, backlog=1024)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the benchmark environment has it
        asyncio.run(serve(args.upstream, args.host, args.port))
    else:
        uvloop.run(serve(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
