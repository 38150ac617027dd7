"""The graceful drain in-process (the gateway's count and refusals) and the server's signal handling and
listening socket. ``tests/test_serve_gateway.py`` drives the same through ``xpuflow serve``."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Any

import pytest
import uvicorn
from test_app import AUTH, CHAT, error_of, gateway

from xpuflow.serving.app import create_app
from xpuflow.serving.drain import DRAIN_RETRY_AFTER_S, Drain
from xpuflow.serving.server import GatewayServer, listen_socket
from xpuflow.testing.fake_engine import FakeEngine
from xpuflow.testing.run_async import run_async


@run_async
async def test_draining_turns_ready_to_503_and_refuses_new_requests_only() -> None:
    engine = FakeEngine(service_time_s=0.3)
    async with gateway(engine) as client:
        drain = client._transport.app.state.gateway.drain  # type: ignore[attr-defined]
        slow = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT, headers=AUTH))
        while drain.in_flight == 0:
            await asyncio.sleep(0.005)
        assert (await client.get("/ready")).status_code == 200
        drain.begin()
        ready = await client.get("/ready")
        refused = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        models = await client.get("/v1/models", headers=AUTH)
        health = await client.get("/health")
        metrics = await client.get("/metrics")
        finished = await slow
    assert ready.status_code == 503
    assert ready.json() == {"status": "draining"}
    for response in (refused, models):
        assert response.status_code == 503
        assert response.headers["retry-after"] == str(DRAIN_RETRY_AFTER_S)
        assert response.headers["connection"] == "close"
        error = error_of(response)
        assert error["code"] == "shutting_down"
        assert "shutting down" in error["message"]
    assert health.status_code == 200
    assert metrics.status_code == 200
    assert finished.status_code == 200  # in flight before the drain: it finishes
    assert drain.in_flight == 0


@run_async
async def test_probes_and_the_dashboard_are_not_counted() -> None:
    drain = Drain()
    app = drain.wrap(create_app(FakeEngine()))
    seen: list[int] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(drain.in_flight)

    app.app = inner
    for path in ("/health", "/ready", "/metrics", "/dashboard/events", "/v1/models"):
        await app({"type": "http", "path": path}, None, None)  # type: ignore[arg-type]
    assert seen == [0, 0, 0, 0, 1]
    assert drain.idle


def _server(drain: Drain, now: list[float], started: list[tuple[int, float]]) -> GatewayServer:
    return GatewayServer(
        uvicorn.Config(create_app(FakeEngine()), lifespan="off"),
        drain,
        drain_timeout_s=10.0,
        on_drain_start=lambda n, t: started.append((n, t)),
        clock=lambda: now[0],
    )


@run_async
async def test_a_signal_drains_until_idle_then_stops() -> None:
    drain, now, started = Drain(), [100.0], []
    server = _server(drain, now, started)
    drain.in_flight = 2
    assert await server.on_tick(1) is False
    server.handle_exit(signal.SIGTERM, None)
    assert drain.draining
    assert server.should_exit is False  # not yet: requests are in flight
    assert await server.on_tick(2) is False
    assert started == [(2, 10.0)]
    now[0] += 9.0
    drain.in_flight = 0
    assert await server.on_tick(3) is True
    assert server.drained_in_time is True
    assert server._captured_signals == []  # not re-raised after serve(): the caller's cleanup runs


@run_async
async def test_the_drain_timeout_cuts_off_what_is_left() -> None:
    drain, now, started = Drain(), [0.0], []
    server = _server(drain, now, started)
    drain.in_flight = 1
    server.handle_exit(signal.SIGINT, None)
    assert await server.on_tick(1) is False
    now[0] = 10.5
    assert await server.on_tick(2) is True
    assert server.drained_in_time is False


def test_a_second_signal_stops_at_once() -> None:
    drain, now, started = Drain(), [0.0], []
    server = _server(drain, now, started)
    drain.in_flight = 3
    server.handle_exit(signal.SIGTERM, None)
    assert not server.should_exit
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit
    assert server.force_exit


def test_the_listening_socket_is_tcp_without_nagle() -> None:
    sock = listen_socket("127.0.0.1", 0)
    try:
        # asyncio sets TCP_NODELAY on accepted sockets only when the listener says IPPROTO_TCP
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
    finally:
        sock.close()


def _accepted_nodelay(loop: asyncio.AbstractEventLoop) -> int:
    async def main() -> int:
        accepted: asyncio.Future[int] = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                option = transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                accepted.set_result(option)
                transport.close()

        sock = listen_socket("127.0.0.1", 0)
        server = await loop.create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        try:
            return await asyncio.wait_for(accepted, 5)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_accepted_connections_have_nagle_off(kind: str) -> None:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    assert _accepted_nodelay(loop) != 0
