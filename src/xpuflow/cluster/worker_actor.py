"""The Ray actor beside a device: a session with its queue, batcher, health and metrics (a ``Worker``).

The gateway creates one per replica (``runtime``) and talks to it through ``ray_worker.RayWorker``::

    actor = ray.remote(WorkerActor).options(max_restarts=-1, ...).remote(spec)
    await actor.submit.remote(wire_request)          # ("ok", result, {"queue_ms": ...}) or ("err", WireError)
    async for ref in actor.stream.options(num_returns="streaming").remote(wire_request):
        kind, value = await ref                                 # ("chunk", StreamChunk) / ("err", ...)
    await actor.state.remote()                                  # snapshot, metrics, health, node

With a ``channel_token`` in its spec (``cluster.transport: direct``, the default), ``ready`` also opens
the actor's ``cluster.channel`` on its node and reports its address; the gateway then sends requests
over that connection rather than as actor calls (same handlers, same answers, without Ray's per-call cost).

Everything is built lazily by the first call, so an actor that Ray restarts (after a crash or on a node
that joined in place of a lost one) rebuilds its session by itself from the same ``WorkerSpec``: Ray
re-runs ``__init__`` and nothing else. Builds run on the node, against the node's artifact store.
Requests are withdrawn from the queue when their call is cancelled (``ray.cancel``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xpuflow.cluster.channel import ChannelServer
from xpuflow.cluster.device_gate import RemoteComputeGate
from xpuflow.cluster.messages import error_to_wire, request_from_wire, resource_from_wire
from xpuflow.cluster.tasks import Once
from xpuflow.config import DeploymentConfig
from xpuflow.scheduling.worker import Worker

__all__ = ["WorkerActor", "WorkerSpec"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker actor needs to (re)build its worker, as plain data."""

    worker_id: str
    deployment: Mapping[str, Any]  # DeploymentConfig.model_dump()
    device: Mapping[str, Any]  # the placed device, messages.resource_to_wire (local id)
    base_dir: str | None = None
    artifact_dir: str | None = None
    node_label: str = "xpuflow-node"
    channel_token: str = ""  # set: requests come over cluster.channel, opened on the node's address
    partition: str | None = None  # qos partition: a token of it on ``gate`` around every batch
    gate: Any = None  # the device's DeviceGateActor (a Ray actor handle)
    gate_token: str = ""  # what the gate's channel asks
    compute_tokens: int = 1  # the device's tokens (qos.compute_tokens)
    extra: Mapping[str, Any] = field(default_factory=dict)


class WorkerActor:
    """Hosts one ``Worker``; see the module docstring. Methods are async: one actor serves many calls."""

    def __init__(self, spec: WorkerSpec) -> None:
        import ray

        self.spec = spec
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        labels = context.get_node_labels() or {}
        label = labels.get(spec.node_label)
        self.node_label = (label[0] if isinstance(label, list) and label else label) or None
        self.node_ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self._built = Once(self._build)  # a failed build is tried again by the next call
        self._draining = False
        self._host_memory: Any = None
        # one listener, however many ready() calls wait for it
        self._opened = Once(
            lambda: ChannelServer.start(
                (self.submit, self.stream), host=self.node_ip, token=spec.channel_token
            )
        )

    @property
    def _worker(self) -> Worker | None:
        return self._built.value

    @property
    def _channel(self) -> ChannelServer | None:
        return self._opened.value

    async def _ready(self) -> Worker:
        return await self._built()

    async def _build(self) -> Worker:
        from xpuflow.artifacts.builder import build_all
        from xpuflow.artifacts.store import ArtifactStore
        from xpuflow.backends.registry import get_backend

        spec = self.spec
        dep = DeploymentConfig.model_validate(dict(spec.deployment))
        resource = resource_from_wire(spec.device)
        plugin = get_backend(dep.backend)
        base_dir = Path(spec.base_dir) if spec.base_dir else None
        model_config = dep.to_model_config(base_dir)
        store = ArtifactStore(Path(spec.artifact_dir) if spec.artifact_dir else None)
        artifacts = await asyncio.to_thread(build_all, plugin, [resource], model_config, store)
        session = await plugin.create_session([resource], model_config, artifacts)
        gate = None
        if spec.partition is not None and spec.gate is not None:
            gate = RemoteComputeGate(spec.gate, spec.partition, spec.gate_token)
        worker = Worker(
            session,
            worker_id=spec.worker_id,
            deployment=dep.name,
            device=resource.id,
            max_batch_size=dep.max_batch_size,
            queue_policy=dep.batching.queue_policy,
            queue_capacity=dep.batching.queue_capacity,
            aging_s=dep.batching.aging_s,
            batch_policy=dep.batching.policy,
            max_wait_s=dep.batching.max_wait_ms / 1000.0,
            device_state=self._device_state(resource.id),
            close_session=True,
            max_in_flight=dep.max_in_flight,
            # as on one machine: a gated worker keeps one batch waiting at the gate beside those running
            max_concurrent_batches=1 if gate is None else spec.compute_tokens + 1,
            compute_gate=gate,
        )
        worker.draining = self._draining
        await worker.start()
        log.info("worker %s ready on node %s (pid %d)", spec.worker_id, self.node_id[:8], os.getpid())
        return worker

    def _device_state(self, device: str) -> Any:
        if device != "cpu":
            return None
        from xpuflow.telemetry.host_memory import HostMemory

        self._host_memory = HostMemory()
        host = self._host_memory

        def read() -> Mapping[str, Any]:
            free, _total = host.read()
            return {} if free is None else {"free_memory_bytes": free}

        return read

    # -- calls from the gateway ---------------------------------------------------------------------

    async def ready(self) -> dict[str, Any]:
        """Build the worker if needed and open its channel; where it runs and where to send requests."""
        await self._ready()
        if self.spec.channel_token:
            await self._opened()
        return self._where()

    def _where(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "node_label": self.node_label,
            "pid": os.getpid(),
            "channel": None if self._channel is None else self._channel.address,
        }

    async def submit(self, wire: Mapping[str, Any]) -> tuple[Any, ...]:
        """``("ok", result, {"queue_ms": ...})`` (the wait in this worker's queue, for the gateway's
        metrics) or ``("err", WireError)``."""
        try:
            worker = await self._ready()
            loop = asyncio.get_running_loop()
            request = request_from_wire(wire, now_s=loop.time())
            result = await worker.submit(request)
            return "ok", result, {"queue_ms": request.metadata.get("queue_ms", 0.0)}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return "err", error_to_wire(exc)

    async def stream(self, wire: Mapping[str, Any]) -> AsyncIterator[tuple[str, Any]]:
        try:
            worker = await self._ready()
            loop = asyncio.get_running_loop()
            async for chunk in worker.stream(request_from_wire(wire, now_s=loop.time())):
                yield "chunk", chunk
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            yield "err", error_to_wire(exc)

    async def state(self) -> dict[str, Any]:
        """The worker's live state: its scorer snapshot, metrics, health and node."""
        worker = self._worker
        if worker is None or (self.spec.channel_token and self._channel is None):
            return {**self._where(), "ready": False}
        snapshot = worker.snapshot()
        return {
            **self._where(),
            "ready": True,
            "snapshot": snapshot,
            "metrics": worker.metrics.to_dict(),
            "ema_service_ms": worker.metrics.ema_service_ms,
            "health": worker.health.state.value,
            "healthy": worker.health.healthy,
            "last_error": worker.health.last_error,
            "memory_bytes": worker.session.resources[0].memory_bytes if worker.session.resources else None,
            "status": worker.to_dict(),
        }

    async def set_draining(self, draining: bool) -> None:
        self._draining = bool(draining)
        if self._worker is not None:
            self._worker.draining = self._draining

    async def stop(self, drain: bool = True) -> None:
        if self._worker is not None:
            await self._worker.stop(drain=drain)
        if self._channel is not None:
            await self._channel.aclose()
            self._opened.reset()
