"""``RayWorker`` against a hand-written fake actor (no Ray cluster): how fast a lost worker leaves
routing, and that the requests it holds are handed back for a retry elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

pytest.importorskip("ray")

from ray.exceptions import ActorUnavailableError

from xpuflow.backends.base import GenerationParams
from xpuflow.cluster.channel import ChannelServer
from xpuflow.cluster.ray_worker import RayWorker
from xpuflow.errors import SessionError, WorkerLost
from xpuflow.scheduling.request import RequestKind, WorkRequest


class _Method:
    def __init__(self, fn: Callable[..., Coroutine[Any, Any, Any]]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Coroutine[Any, Any, Any]:
        return self.fn(*args)


class FakeActor:
    """Answers like a ``WorkerActor`` until ``die()``; then every call fails as Ray fails it once the
    actor's connection resets (``ActorUnavailableError``), or hangs (``hang()``: a silent node)."""

    def __init__(self) -> None:
        self.mode = "alive"
        self.release = asyncio.Event()
        self.ready = _Method(self._ready)
        self.state = _Method(self._state)
        self.submit = _Method(self._submit)

    async def _call(self) -> None:
        if self.mode == "dead":
            raise ActorUnavailableError("connection reset by peer", None)
        if self.mode == "hung":
            await asyncio.Event().wait()

    async def _ready(self) -> dict[str, Any]:
        await self._call()
        return {"node_id": "n1", "node_label": "a"}

    async def _state(self) -> dict[str, Any]:
        await self._call()
        return {"node_id": "n1", "node_label": "a", "ready": True, "metrics": {}, "healthy": True}

    async def _submit(self, wire: dict[str, Any]) -> tuple[str, Any]:
        await self._call()
        await self.release.wait()  # a long request: still running when the actor dies
        if self.mode == "dead":
            raise ActorUnavailableError("connection reset by peer", None)
        return "ok", wire["payload"]


def _request() -> WorkRequest:
    return WorkRequest(RequestKind.CHAT, [{"role": "user", "content": "hi"}], GenerationParams())


def _worker(actor: FakeActor, unhealthy_after_s: float = 5.0) -> RayWorker:
    return RayWorker(
        actor, worker_id="chat/0", deployment="chat", device="cpu@a", node="a",
        health_interval_s=0.01, unhealthy_after_s=unhealthy_after_s,
    )  # fmt: skip


def test_a_failed_call_takes_the_worker_out_at_once_and_hands_its_requests_back() -> None:
    async def go() -> None:
        actor = FakeActor()
        worker = _worker(actor)
        await worker.start()
        try:
            assert worker.health.healthy
            held = asyncio.ensure_future(worker.submit(_request()))
            await asyncio.sleep(0.02)
            actor.mode = "dead"
            # unhealthy_after_s is 5 s: the state read's ActorUnavailableError alone takes it out
            with pytest.raises(WorkerLost) as lost:
                await asyncio.wait_for(held, 1.0)
            assert isinstance(lost.value, SessionError)  # retryable: the dispatcher tries elsewhere
            assert not worker.health.healthy
            assert "unreachable" in (worker.health.last_error or "")

            actor.mode = "alive"  # Ray restarted it: the next answer brings it back
            for _ in range(100):
                if worker.health.healthy:
                    break
                await asyncio.sleep(0.01)
            assert worker.health.healthy
        finally:
            await worker.stop(drain=False)

    asyncio.run(go())


def test_a_silent_actor_stays_in_until_unhealthy_after_s() -> None:
    async def go() -> None:
        actor = FakeActor()
        worker = _worker(actor, unhealthy_after_s=0.3)
        await worker.start()
        try:
            actor.mode = "hung"
            await asyncio.sleep(0.15)
            assert worker.health.healthy  # no error yet, only silence shorter than the limit
            await asyncio.sleep(0.4)
            assert not worker.health.healthy
        finally:
            await worker.stop(drain=False)

    asyncio.run(go())


class ChannelActor(FakeActor):
    """A ``FakeActor`` that, like a ``WorkerActor`` with a channel token, serves requests over a real
    ``cluster.channel`` on loopback and reports its address in ``ready`` and ``state``."""

    def __init__(self) -> None:
        super().__init__()
        self.server: ChannelServer | None = None
        self.served: list[str] = []

    async def open(self) -> None:
        self.server = await ChannelServer.start((self._serve, self._stream), host="127.0.0.1", token="t")

    async def _serve(self, wire: dict[str, Any]) -> tuple[str, Any]:
        self.served.append(wire["request_id"])
        await self.release.wait()
        return "ok", wire["payload"]

    async def _stream(self, wire: dict[str, Any]) -> AsyncIterator[tuple[str, Any]]:
        yield "chunk", wire["payload"]

    def _where(self) -> dict[str, Any]:
        return {"node_id": "n1", "node_label": "a", "channel": self.server.address if self.server else None}

    async def _ready(self) -> dict[str, Any]:
        await self._call()
        return self._where()

    async def _state(self) -> dict[str, Any]:
        await self._call()
        return {**self._where(), "ready": True, "metrics": {}, "healthy": True}

    async def _submit(self, wire: dict[str, Any]) -> tuple[str, Any]:
        raise AssertionError("with a channel, requests do not go as actor calls")


def test_requests_take_the_channel_and_a_closed_channel_hands_them_back_at_once() -> None:
    async def go() -> None:
        actor = ChannelActor()
        await actor.open()
        worker = RayWorker(
            actor, worker_id="chat/0", deployment="chat", device="cpu@a", node="a",
            health_interval_s=0.05, unhealthy_after_s=5.0, channel_token="t",
        )  # fmt: skip
        await worker.start()
        try:
            assert worker.channel is not None
            assert worker.channel.address == actor.server.address  # type: ignore[union-attr]
            held = asyncio.ensure_future(worker.submit(_request()))
            await asyncio.sleep(0.05)
            assert len(actor.served) == 1
            await actor.server.aclose()  # type: ignore[union-attr]  # the actor's process died
            with pytest.raises(WorkerLost):
                await asyncio.wait_for(held, 0.5)  # at once: no wait for unhealthy_after_s
            assert not worker.health.healthy

            await actor.open()  # Ray restarted it; it opened a new channel on another port
            for _ in range(100):
                if worker.health.healthy:
                    break
                await asyncio.sleep(0.02)
            assert worker.health.healthy
            assert worker.channel is not None
            assert worker.channel.address == actor.server.address  # type: ignore[union-attr]
            actor.release.set()
            assert await worker.submit(_request()) == [{"role": "user", "content": "hi"}]
            chunks = [chunk async for chunk in worker.stream(_request())]
            assert chunks == [[{"role": "user", "content": "hi"}]]
        finally:
            await worker.stop(drain=False)
            if actor.server is not None:
                await actor.server.aclose()

    asyncio.run(go())
