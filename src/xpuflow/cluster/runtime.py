"""What the orchestrator calls in cluster mode: join the cluster, place deployments across its nodes,
start their workers as Ray actors, and keep the node list fresh::

    cluster = ClusterRuntime(config, base_dir=Path("."))
    await cluster.start()                                  # connect + discovery on every node
    placement, workers = await cluster.start_deployment(dep)   # RayWorkers, one per replica
    cluster.inventory                                      # refreshed when nodes join or leave (checked
                                                           # every cluster.refresh_interval_s)
    await cluster.stop()

Nothing here re-implements Ray: actors restart with ``max_restarts=-1`` (Ray re-places them on a like
node after a loss) and placement is Ray's (resources, label selectors, node affinity). Requests go over
each actor's ``cluster.channel`` (``cluster.transport: direct``), or as Ray actor calls, streaming
generators and ``ray.cancel`` (``transport: ray``). The gateway keeps the decisions.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from xpuflow.clock import Clock, SystemClock
from xpuflow.cluster.connection import connect, import_ray
from xpuflow.cluster.device_gate import DeviceGate, DeviceGateActor
from xpuflow.cluster.inventory import NODE_LABEL, ClusterInventory
from xpuflow.cluster.messages import resource_to_wire
from xpuflow.cluster.placement import ClusterPlacement, ReplicaPlacement, place_deployment
from xpuflow.cluster.ray_worker import RayWorker
from xpuflow.cluster.tasks import cancel_and_wait
from xpuflow.cluster.worker_actor import WorkerActor, WorkerSpec
from xpuflow.config import ClusterConfig, DeploymentConfig, XpuflowConfig
from xpuflow.errors import CapabilityError, ConfigError
from xpuflow.scheduling.qos.partitions import check_partition_memory
from xpuflow.types import Resource

__all__ = ["ClusterRuntime", "actor_options"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def actor_options(replica: ReplicaPlacement, ray_resources: dict[str, float]) -> dict[str, Any]:
    """Ray actor options of one replica: restart forever, retry nothing (the gateway retries), reserve
    its device, and stay where placement put it (see ``placement``)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    resources = dict(ray_resources)
    options: dict[str, Any] = {
        "max_restarts": -1,
        "max_task_retries": 0,
        "max_concurrency": 10_000,
        "num_cpus": resources.pop("CPU", 0.0),
        "num_gpus": resources.pop("GPU", 0.0),
    }
    memory = resources.pop("memory", None)
    if memory:
        options["memory"] = memory
    if resources:
        options["resources"] = resources
    scheduling = replica.scheduling
    if "labels" in scheduling:
        options["label_selector"] = dict(scheduling["labels"])
    else:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            scheduling["affinity"], soft=bool(scheduling.get("soft", True))
        )
    return options


def _alive_node_ids() -> set[str]:
    ray = import_ray()
    return {str(n["NodeID"]) for n in ray.nodes() if n.get("Alive") and n.get("NodeID")}


class ClusterRuntime:
    """See the module docstring."""

    def __init__(
        self,
        config: XpuflowConfig,
        *,
        base_dir: Path | None = None,
        clock: Clock | None = None,
    ) -> None:
        assert config.cluster is not None
        self.config = config
        self.settings: ClusterConfig = config.cluster
        self._base_dir = base_dir or Path.cwd()
        self._clock = clock or SystemClock()
        self.inventory = ClusterInventory(())
        self._connected_here = False
        self._refresher: asyncio.Task[None] | None = None
        self._in_ray: asyncio.Future[Any] | None = None  # a refresh's Ray call, running in a thread
        self.workers: list[RayWorker] = []
        self.gates: dict[str, DeviceGate] = {}  # device -> the gate of its qos partitions
        # the secret a worker's channel asks of the gateway (it travels to the actors inside Ray)
        self._secret = secrets.token_hex(16)
        self._channel_token = self._secret if self.settings.transport == "direct" else ""

    async def start(self) -> None:
        self._connected_here = await asyncio.to_thread(connect, self.settings)
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="cluster-inventory")

    async def refresh(self) -> ClusterInventory:
        """Run discovery on every node again (nodes that joined or left since)."""
        declared = self.config.declared_resources()
        self.inventory = await self._off_loop(lambda: ClusterInventory.detect(declared=declared))
        return self.inventory

    async def _off_loop(self, call: Callable[[], T]) -> T:
        """``call`` in a thread; ``stop`` waits for it, so Ray is not shut down under a running call."""
        self._in_ray = asyncio.ensure_future(asyncio.to_thread(call))
        return cast(T, await asyncio.shield(self._in_ray))

    async def _refresh_loop(self) -> None:
        while True:
            await self._clock.sleep(self.settings.refresh_interval_s)
            try:
                before = {n.node_id for n in self.inventory.alive}
                if await self._off_loop(_alive_node_ids) == before:
                    continue  # discovery runs probes on every node: only when a node joined or left
                after = await self.refresh()
                joined = [n.name for n in after.alive if n.node_id not in before]
                if joined:
                    log.info("node(s) joined the cluster: %s", ", ".join(joined))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("cluster inventory refresh failed; keeping the last one", exc_info=True)

    def node_name(self, info: dict[str, Any]) -> str:
        """The name of the node a worker reports (by the latest inventory, else its label or id)."""
        node_id = str(info.get("node_id", ""))
        for node in self.inventory.nodes:
            if node.node_id == node_id:
                return node.name
        return str(info.get("node_label") or node_id[:8])

    def place(self, dep: DeploymentConfig) -> ClusterPlacement:
        """Place ``dep`` over every node's devices (see ``cluster.placement``)."""
        from xpuflow.backends.registry import get_backend

        plugin = get_backend(dep.backend)
        availability = plugin.availability()
        if not availability.available:
            raise CapabilityError(
                f"deployment '{dep.name}': backend '{dep.backend}' is not usable on the gateway: "
                f"{availability.reason}"
            )
        return place_deployment(
            dep,
            self.inventory,
            usable=plugin.probe,
            advise=self._advisor(dep),
            num_cpus=self.settings.worker_num_cpus,
            spread=self.settings.spread,
        )

    def _advisor(self, dep: DeploymentConfig) -> Any:
        if dep.model is None:
            return None
        from xpuflow.discovery.inventory import Inventory
        from xpuflow.model_files import estimate_params, model_format
        from xpuflow.policy.advisor import advise_workload

        path = Path(dep.model).expanduser()
        path = path if path.is_absolute() else self._base_dir / path

        def advise(devices: list[Resource]) -> tuple[str, str]:
            decision = advise_workload(
                Inventory.of(devices),
                estimate_params(path, model_format(path)),
                batch_size=dep.max_batch_size,
                precision=dep.precision,
            )
            return str(decision.device), decision.reason

        return advise

    async def start_gates(self) -> dict[str, DeviceGate]:
        """One ``DeviceGate`` per device that ``qos.partitions`` divides, on that device's node.
        ConfigError when a partition names a device no node has."""
        ray = import_ray()
        qos = self.config.qos
        shares: dict[str, dict[str, float]] = {}
        for part in qos.partitions:
            shares.setdefault(part.device, {})[part.name] = part.compute_share
        gates: dict[str, DeviceGate] = {}
        devices = {r.id: (node, r) for node in self.inventory.alive for r in node.resources}
        for device, device_shares in shares.items():
            if device not in devices:
                known = ", ".join(sorted(devices)) or "none"
                raise ConfigError(
                    f"a qos partition names device '{device}', which no node of the cluster has; in cluster "
                    f"mode name a node's device (devices: {known})",
                    field="qos.partitions.device",
                )
            node, resource = devices[device]
            check_partition_memory(qos.partitions, device, resource.memory_bytes)
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            actor = (
                ray.remote(DeviceGateActor)
                .options(
                    num_cpus=0,
                    max_restarts=-1,
                    max_concurrency=10_000,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
                )
                .remote(qos.compute_tokens, device_shares, self._secret)
            )
            gate = DeviceGate(
                actor, device=device, num_tokens=qos.compute_tokens, shares=device_shares, clock=self._clock
            )
            gates[device] = gate
        await asyncio.gather(*(g.ready() for g in gates.values()))
        self.gates.update(gates)
        return gates

    async def start_deployment(self, dep: DeploymentConfig) -> tuple[ClusterPlacement, list[RayWorker]]:
        """Place ``dep``, start one actor per replica, and wait until every one is ready."""
        ray = import_ray()
        placement = self.place(dep)
        part = next((p for p in self.config.qos.partitions if dep.name in p.deployments), None)
        if part is not None:
            elsewhere = sorted({r.resource.id for r in placement.replicas} - {part.device})
            if elsewhere:
                raise ConfigError(
                    f"deployment '{dep.name}' is in partition '{part.name}' on '{part.device}' but was "
                    f"placed on {', '.join(elsewhere)}; set the deployment's device: {part.device}",
                    field="qos.partitions.device",
                )
        actor_class = ray.remote(WorkerActor)
        workers = []
        for replica in placement.replicas:
            local = replica.resource.attributes.get("local_id", replica.resource.id.split("@", 1)[0])
            device = Resource(
                str(local),
                replica.resource.type,
                replica.resource.name,
                replica.resource.attributes,
                replica.resource.tags,
                replica.resource.source,
            )
            spec = WorkerSpec(
                worker_id=f"{dep.name}/{replica.index}",
                deployment=dep.model_dump(),
                device=resource_to_wire(device),
                base_dir=str(self._base_dir),
                artifact_dir=self.config.artifact_dir,
                node_label=NODE_LABEL,
                channel_token=self._channel_token,
                partition=None if part is None else part.name,
                gate=None if part is None else self.gates[part.device].actor,
                gate_token=self._secret,
                compute_tokens=self.config.qos.compute_tokens,
            )
            actor = actor_class.options(**actor_options(replica, dict(placement.ray_resources))).remote(spec)
            workers.append(
                RayWorker(
                    actor,
                    worker_id=spec.worker_id,
                    deployment=dep.name,
                    device=replica.resource.id,
                    node=replica.node,
                    max_batch_size=dep.max_batch_size,
                    resources=(replica.resource,),
                    clock=self._clock,
                    health_interval_s=self.settings.health_interval_s,
                    unhealthy_after_s=self.settings.unhealthy_after_s,
                    node_name=self.node_name,
                    channel_token=self._channel_token,
                )
            )
        results = await asyncio.gather(*(w.start() for w in workers), return_exceptions=True)
        failed = [(w, r) for w, r in zip(workers, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(w.stop(drain=False) for w in workers), return_exceptions=True)
            worker, error = failed[0]
            raise CapabilityError(
                f"deployment '{dep.name}': worker {worker.worker_id} on node {worker.node} did not start: "
                f"{type(error).__name__}: {error}"
            ) from error
        self.workers.extend(workers)
        return placement, workers

    async def stop(self) -> None:
        if self._refresher is not None:
            await cancel_and_wait(self._refresher)
            self._refresher = None
        if self._in_ray is not None and not self._in_ray.done():
            await asyncio.wait({self._in_ray}, timeout=65.0)  # discovery gives up after 60 s
        workers, self.workers = self.workers, []
        await asyncio.gather(*(w.stop(drain=True) for w in workers), return_exceptions=True)
        gates, self.gates = list(self.gates.values()), {}
        await asyncio.gather(*(g.stop() for g in gates), return_exceptions=True)
        if self._connected_here:
            ray = import_ray()
            ray.shutdown()
            self._connected_here = False
