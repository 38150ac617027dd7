"""The gateway's side of a worker on another node: the interface the router and scorer use.

``RayWorker`` has what ``routing.dispatch.DispatchTarget`` and the orchestrator read of a local
``Worker`` (``worker_id``, ``device``, ``health``, ``metrics``, ``submit``, ``stream``, ``snapshot``,
``draining``, ``stop``), plus the ``node`` it runs on::

    worker = RayWorker(actor, worker_id="chat/0", deployment="chat", device="cpu@node-a", node="node-a")
    await worker.start()                  # waits for the actor's session, then reads its state
    await worker.submit(request)          # or: async for chunk in worker.stream(request)

Live metrics: the actor's own snapshot, read every ``health_interval_s``; between reads the queue
depth counts what this gateway has sent and not yet had back, so a burst does not herd onto one worker.

Loss: a worker leaves routing as soon as any call to its actor fails with Ray's actor errors
(``ActorUnavailableError``, ``RayActorError``: its process or node is gone, or Ray is restarting it), or
when its actor has not answered for ``unhealthy_after_s`` (a node that vanished without closing its
connections). A failed active check holds it out, and every request it holds fails at once with a
retryable ``SessionError`` so the dispatcher retries them elsewhere; a stream that has already sent
chunks ends with ``StreamInterrupted``. Ray fails calls on a broken connection at once only when the
gateway does not wait for the GCS's death notice (``cluster.connection`` sees to that). When the
actor answers again (Ray restarted it on the same or a like node) it is healthy again and takes
traffic. A client that goes away cancels the remote call (``ray.cancel``), which withdraws the request
from the actor's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from xpuflow.backends.base import StreamChunk
from xpuflow.clock import Clock, SystemClock
from xpuflow.cluster.channel import ChannelClient, ChannelClosed
from xpuflow.cluster.messages import error_from_wire, request_to_wire
from xpuflow.cluster.tasks import cancel_and_wait
from xpuflow.errors import WorkerLost
from xpuflow.scheduling.health import HealthTracker
from xpuflow.scheduling.request import WorkRequest
from xpuflow.types import Resource, WorkerSnapshot

__all__ = ["RayWorker", "RemoteSessionInfo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteSessionInfo:
    """What the gateway knows of a remote worker's session (the dashboard reads ``resources``)."""

    model_id: str
    resources: tuple[Resource, ...] = ()


class _Metrics:
    """The actor's last metrics, with the fields the dispatcher and dashboard read."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.ema_service_ms: float | None = None

    @property
    def in_flight(self) -> int:
        return int(self.data.get("in_flight", 0) or 0)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)


def _actor_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorUnavailableError, RayActorError

    return (RayActorError, ActorUnavailableError)


def _lost_errors() -> tuple[type[BaseException], ...]:
    """What a call raises when its worker is gone: Ray's actor errors, or its channel closing."""
    return (*_actor_errors(), ChannelClosed)


def _connected_ray() -> Any:
    """The ``ray`` module when this process is connected, else None: ``ray.kill`` and ``ray.cancel``
    would start a local Ray instance in a process that is not (a gateway shutting down, a test)."""
    import ray

    return ray if ray.is_initialized() else None


def _cancel(ref: Any) -> None:
    ray = _connected_ray()
    if ray is not None:
        with contextlib.suppress(Exception):
            ray.cancel(ref)


class RayWorker:
    """A worker running in a Ray actor, seen from the gateway. See the module docstring."""

    def __init__(
        self,
        actor: Any,
        *,
        worker_id: str,
        deployment: str,
        device: str,
        node: str,
        max_batch_size: int = 1,
        resources: Sequence[Resource] = (),
        clock: Clock | None = None,
        health_interval_s: float = 0.25,
        unhealthy_after_s: float = 1.0,
        ready_timeout_s: float = 300.0,
        node_name: Callable[[dict[str, Any]], str] | None = None,
        channel_token: str = "",
    ) -> None:
        self.actor = actor
        self.worker_id = worker_id
        self.deployment = deployment
        self.device = device
        self.node = node
        self.node_id = ""
        self.max_batch_size = max_batch_size
        self.session = RemoteSessionInfo(deployment, tuple(resources))
        self.tags: frozenset[str] = frozenset()
        self._clock = clock or SystemClock()
        self.health = HealthTracker(clock=self._clock)
        self.metrics = _Metrics()
        self._interval_s = health_interval_s
        self._unhealthy_after_s = unhealthy_after_s
        self._ready_timeout_s = ready_timeout_s
        self._node_name = node_name
        self._state: dict[str, Any] = {}
        self._state_at_s = 0.0
        self._last_answer_s = self._clock.monotonic()
        self._lost = False
        self._drained = False
        self._outstanding = 0
        self._aborts: set[asyncio.Future[str]] = set()
        self._poller: asyncio.Task[None] | None = None
        self.restarts_seen = 0
        self._channel_token = channel_token
        self.channel: ChannelClient | None = None  # None: requests go as Ray actor calls

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Wait until the actor's session is built (its first build may compile), then watch it."""
        info = await asyncio.wait_for(self.actor.ready.remote(), self._ready_timeout_s)
        self._moved(info)
        await self._poll_once()
        self._poller = asyncio.create_task(self._poll_loop(), name=f"ray-worker-{self.worker_id}")

    async def stop(self, drain: bool = True) -> None:
        """Stop watching, let the actor finish (drain) and end it."""
        if self._poller is not None:
            await cancel_and_wait(self._poller)
            self._poller = None
        if self.channel is not None:
            await self.channel.aclose()
            self.channel = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.actor.stop.remote(drain), 30.0)
        ray = _connected_ray()
        if ray is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.actor, no_restart=True)

    @property
    def running(self) -> bool:
        return self._poller is not None

    @property
    def draining(self) -> bool:
        return self._drained

    @draining.setter
    def draining(self, value: bool) -> None:
        self._drained = bool(value)
        self.actor.set_draining.remote(self._drained)  # the actor also answers its own snapshot

    # -- live state -----------------------------------------------------------------------------------

    def _moved(self, info: dict[str, Any]) -> None:
        self._follow_channel(info.get("channel"))
        node_id = str(info.get("node_id", ""))
        if self.node_id and node_id and node_id != self.node_id:
            self.restarts_seen += 1
            log.warning("worker %s now runs on node %s", self.worker_id, node_id[:8])
        if node_id:
            self.node_id = node_id
            self.node = self._node_name(info) if self._node_name else (info.get("node_label") or node_id[:8])
            local = self.device.split("@", 1)[0]
            self.device = f"{local}@{self.node}"

    def _follow_channel(self, address: Any) -> None:
        """Send requests to the channel the actor reports (a restarted actor opens a new one)."""
        if not self._channel_token or not isinstance(address, str) or not address:
            return
        if self.channel is not None and self.channel.address == address:
            return
        old, (host, _, port) = self.channel, address.rpartition(":")
        self.channel = ChannelClient(host, int(port), self._channel_token)
        if old is not None:
            old.close()

    async def _poll_once(self) -> bool:
        try:
            state = await asyncio.wait_for(self.actor.state.remote(), self._unhealthy_after_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._lost:
                return False
            if isinstance(exc, _actor_errors()):
                # Ray says the actor is gone or restarting: no need to wait for the silence to last
                self._lose(type(exc).__name__)
                return False
            silent_s = self._clock.monotonic() - self._last_answer_s
            if silent_s >= self._unhealthy_after_s:
                self._lose(f"no answer for {silent_s:.1f} s ({type(exc).__name__})")
            return False
        now = self._clock.monotonic()
        self._last_answer_s = now
        channel = self.channel.address if self.channel is not None else None
        if state.get("node_id") != self.node_id or state.get("channel") != channel:
            self._moved(state)
        if not state.get("ready"):
            # restarted and still building its session: answer, but not ready for requests
            with contextlib.suppress(Exception):
                self.actor.ready.remote()
            return False
        self._state, self._state_at_s = state, now
        self.metrics.data = dict(state.get("metrics") or {})
        service = state.get("ema_service_ms")
        self.metrics.ema_service_ms = float(service) if isinstance(service, (int, float)) else None
        if self._lost:
            self._lost = False
            log.info("worker %s answers again on node %s", self.worker_id, self.node)
            self.health.record_check(True)
        elif not state.get("healthy", True):
            pass  # the actor's own health (request failures) shows in its snapshot
        return True

    async def _poll_loop(self) -> None:
        while True:
            await self._poll_once()
            await self._clock.sleep(self._interval_s)

    def _lose(self, why: str) -> None:
        """Out of routing now; the requests it holds fail (retryable) so they go elsewhere."""
        self._lost = True
        reason = f"worker {self.worker_id} on node {self.node} is unreachable: {why}"
        log.warning("%s", reason)
        self.health.record_check(False, reason)
        for abort in list(self._aborts):
            if not abort.done():
                abort.set_result(reason)

    def snapshot(self) -> WorkerSnapshot:
        base: WorkerSnapshot | None = self._state.get("snapshot")
        now = self._clock.monotonic()
        if base is None:
            return WorkerSnapshot(
                worker_id=self.worker_id,
                deployment=self.deployment,
                device=self.device,
                healthy=False,
                draining=self._drained,
                max_batch_size=self.max_batch_size,
                taken_at_s=now,
            )
        in_flight = base.in_flight
        # what this gateway has sent since the last reading and not yet had back counts as queued
        queued = max(base.queue_depth, self._outstanding - in_flight)
        return dataclasses.replace(
            base,
            worker_id=self.worker_id,
            device=self.device,
            healthy=base.healthy and self.health.healthy,
            draining=base.draining or self._drained,
            queue_depth=queued,
            taken_at_s=now,
            latency_sampled_at_s=None,  # a remote clock: the reading's age is taken_at_s's business
            oldest_in_flight_s=None,
        )

    def to_dict(self) -> dict[str, Any]:
        status = dict(self._state.get("status") or {})
        return {**status, "worker_id": self.worker_id, "device": self.device, "node": self.node}

    @property
    def total_memory_bytes(self) -> int | None:
        value = self._state.get("memory_bytes")
        return int(value) if isinstance(value, int) else None

    # -- requests -------------------------------------------------------------------------------------

    async def _await_call(self, call: Any, abort: asyncio.Future[str]) -> Any:
        """The call's value, or ``WorkerLost`` when the worker is lost first."""
        future = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait({future, abort}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            future.cancel()
            raise
        if future in done:
            try:
                return future.result()
            except _lost_errors() as exc:
                self._lose(f"{type(exc).__name__}")
                raise WorkerLost(f"worker {self.worker_id} on node {self.node} was lost: {exc}") from exc
        future.cancel()
        raise WorkerLost(abort.result() + "; retry elsewhere")

    async def submit(self, request: WorkRequest) -> Any:
        abort: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._aborts.add(abort)
        self._outstanding += 1
        now = self._clock.monotonic()
        if request.queued_since_s is None:
            request.queued_since_s = now  # a retry elsewhere keeps its place from here (scheduling.queue)
        wire = request_to_wire(request, now_s=now)
        channel = self.channel
        # over the channel, cancelling the call cancels it on the actor; a Ray call needs ray.cancel
        ref = channel.call(wire) if channel is not None else self.actor.submit.remote(wire)
        try:
            answer = await self._await_call(ref, abort)
        except BaseException:
            if channel is None:
                _cancel(ref)  # withdraws the request from the actor's queue
            raise
        finally:
            self._outstanding -= 1
            self._aborts.discard(abort)
        kind, value = answer[0], answer[1]
        if kind == "err":
            raise error_from_wire(value)
        if len(answer) > 2 and isinstance(answer[2], dict):
            queue_ms = answer[2].get("queue_ms")
            if isinstance(queue_ms, (int, float)):
                request.metadata["queue_ms"] = float(queue_ms)  # xpuflow_queue_time_seconds: the remote wait
        return value

    async def stream(self, request: WorkRequest) -> AsyncIterator[StreamChunk]:
        abort: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._aborts.add(abort)
        self._outstanding += 1
        now = self._clock.monotonic()
        if request.queued_since_s is None:
            request.queued_since_s = now
        wire = request_to_wire(request, now_s=now)
        finished = False
        stop: Callable[[], None] | None = None
        try:
            if self.channel is not None:
                stream = await self._await_call(self.channel.stream(wire), abort)
                stop = stream.close  # over the channel, closing the stream cancels it on the actor

                async def next_answer() -> Any:
                    return await self._await_call(stream.next(), abort)

            else:
                generator = self.actor.stream.options(num_returns="streaming").remote(wire)
                stop = functools.partial(_cancel, generator)

                async def next_answer() -> Any:
                    ref = await self._await_call(generator.__anext__(), abort)
                    return await self._await_call(ref, abort)

            while True:
                try:
                    kind, value = await next_answer()
                except StopAsyncIteration:
                    finished = True
                    return
                if kind == "err":
                    finished = True
                    raise error_from_wire(value)
                yield value
        finally:
            self._outstanding -= 1
            self._aborts.discard(abort)
            if stop is not None and not finished:
                stop()  # the client went away or the stream failed: stop the work
