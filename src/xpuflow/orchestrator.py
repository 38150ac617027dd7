"""The orchestrator: config -> inventory -> placement -> builds -> workers -> routers, behind the
gateway's ``Engine`` contract.

    orchestrator = Orchestrator(load_config("xpuflow.yaml"))
    await orchestrator.start()                   # places, builds (cached), loads, starts workers
    result = await orchestrator.complete(call)   # tier rule chain -> worker scorer -> retries/failover
    await orchestrator.stop()

Placement: a deployment with ``device: auto`` goes where the workload advisor puts a model of its size
among the devices its backend can use; an explicit device must be one of those, or start-up fails
naming the devices that would work. Every logical model gets an ``AdaptiveRouter`` (tier choice, with
one VRAM monitor shared by all) and the shared ``Dispatcher`` (worker choice, retries, failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpuflow.artifacts.builder import BuildProgress, build_all
from xpuflow.artifacts.store import ArtifactStore
from xpuflow.backends.registry import get_backend, load_target
from xpuflow.clock import Clock, SystemClock
from xpuflow.config import DeploymentConfig, LogicalModelConfig, TierRef, XpuflowConfig
from xpuflow.discovery.inventory import Inventory
from xpuflow.engine import InferenceCall, InferenceResult, ModelInfo, StreamEvent
from xpuflow.errors import (
    CapabilityError,
    ConfigError,
    ModelDoesNotFit,
    ModelNotFound,
    XpuflowError,
)
from xpuflow.model_files import estimate_params, model_format
from xpuflow.policy.placement import Placement, capability_problems, place
from xpuflow.policy.worker_scorer import WorkerScorer
from xpuflow.routing.adaptive import AdaptiveRouter, RoutingConfig, TierConfig
from xpuflow.routing.dispatch import Dispatcher, RetryPolicy, service_time_snapshot
from xpuflow.routing.remote_state import PrometheusLoadProbe, RemoteStatePoller
from xpuflow.routing.router import NO_ADMISSION, RequestLog, Router
from xpuflow.scheduling.qos.admission import AdmissionController, ContextSpec, QoSPolicy
from xpuflow.scheduling.qos.gate import QoSGate
from xpuflow.scheduling.qos.partitions import ComputeTokens, check_partition_memory
from xpuflow.scheduling.qos.residency import ModelResidency
from xpuflow.scheduling.worker import Worker
from xpuflow.telemetry.host_memory import HostMemory, release_freed_memory
from xpuflow.telemetry.vram import VRAMMonitor
from xpuflow.types import Resource, ResourceType, WorkerSnapshot

if TYPE_CHECKING:
    from xpuflow.cluster.device_gate import DeviceGate

__all__ = ["Orchestrator", "Placement"]  # Placement: policy.placement, re-exported

log = logging.getLogger(__name__)

_MODELS_CONTEXT = "models"  # the residency budget's one context: every loaded model of the device


async def _warm_up(session: Any, dep: DeploymentConfig) -> None:
    """One tiny request on a freshly loaded session, so what it holds while serving is in memory when it
    is measured. A session that cannot answer it fails start-up: it would fail every request."""
    from xpuflow.backends.base import GenerationParams

    try:
        if dep.task == "chat":
            await session.chat([{"role": "user", "content": "hi"}], GenerationParams(max_tokens=1))
        elif dep.task == "completion":
            await session.generate("hi", GenerationParams(max_tokens=1))
        elif dep.task == "embedding":
            await session.embed(["hi"])
    except XpuflowError as exc:
        raise ConfigError(
            f"deployment '{dep.name}': its model loaded but failed a first request at start: {exc}",
            field=f"deployments.{dep.name}",
        ) from exc


def _load_rule(ref: str, model: str) -> Any:
    """A custom tier rule named in the config (``package.module:name``): the function or rule object,
    or an instance of a class that takes no arguments. ConfigError naming the rule when it cannot load."""
    import inspect

    field = f"models.{model}.rules"
    try:
        found = load_target(ref)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model '{model}': rule '{ref}' cannot be loaded: {exc}", field=field) from exc
    if inspect.isclass(found):
        try:
            found = found()
        except TypeError as exc:
            raise ConfigError(
                f"model '{model}': rule class '{ref}' must take no arguments: {exc}", field=field
            ) from exc
    if not callable(found) and not callable(getattr(found, "decide", None)):
        raise ConfigError(
            f"model '{model}': rule '{ref}' is neither a function nor an object with decide(ctx)", field=field
        )
    return found


class Orchestrator:
    """Runs a config: implements the gateway's ``Engine`` and ``AdminControl`` contracts."""

    def __init__(
        self,
        config: XpuflowConfig,
        *,
        inventory: Inventory | None = None,
        store: ArtifactStore | None = None,
        progress: BuildProgress | None = None,
        config_path: Path | None = None,
        clock: Clock | None = None,
        monitor: VRAMMonitor | None = None,
    ) -> None:
        self.config = config
        self._config_path = config_path
        self._base_dir = config_path.parent if config_path else Path.cwd()
        self._inventory = inventory
        self._store = store
        self._progress = progress
        self._clock = clock or SystemClock()
        self._monitor = monitor
        self._owns_monitor = monitor is None
        self._host_memory = HostMemory(clock=self._clock)
        self.placements: dict[str, Placement] = {}
        self.workers: dict[str, Worker] = {}
        self._checkers: dict[str, RemoteStatePoller] = {}  # worker id -> its active health checks
        self._managed: dict[str, Any] = {}  # worker id -> the model server it started (managed engines)
        self._cluster: Any = None  # cluster.runtime.ClusterRuntime when the config has a cluster section
        self._routers: dict[str, Router] = {}  # logical model -> the owner of its requests
        self._ready = False
        self._qos: QoSGate | None = None
        self._tokens: dict[str, ComputeTokens] = {}  # device -> its partitions' compute tokens
        self._gates: dict[str, DeviceGate] = {}  # cluster mode: device -> its partitions' gate actor
        self._residency: dict[str, ModelResidency] = {}  # device -> what is loaded there (on_demand)
        self._loaders: dict[str, Any] = {}  # worker id -> coroutine function that loads its session
        self._usage_base: dict[str, int] = {}  # device -> bytes in use that are no model's (after start)
        self._idle_task: asyncio.Task[None] | None = None
        self._log = RequestLog()  # every router's decisions, latencies and counters, for status()
        self._started_s = time.time()

    # -- start-up -----------------------------------------------------------------------------------

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            # torch (seconds and ~150 MB to import) is probed only when a torch backend will run
            needs_torch = any(d.backend == "transformers" for d in self.config.deployments)
            self._inventory = Inventory.detect(
                declared=self.config.declared_resources(), torch=needs_torch or "torch" in sys.modules
            )
        return self._inventory

    def place(self, dep: DeploymentConfig) -> Placement:
        """Choose the resources of one deployment (``policy.placement.place`` over the devices its
        backend can use here). Raises CapabilityError naming the devices that would work."""
        plugin = get_backend(dep.backend)
        availability = plugin.availability()
        if not availability.available:
            raise CapabilityError(
                f"deployment '{dep.name}': backend '{dep.backend}' is not usable here: {availability.reason}"
            )
        usable = plugin.probe(list(self.inventory.resources))
        if (dep.backend == "remote_openai" or getattr(plugin, "remote", False)) and not usable:
            usable = [Resource(f"remote:{dep.name}", ResourceType.REMOTE, dep.name, source="config")]
        if not usable:
            raise CapabilityError(
                f"deployment '{dep.name}': backend '{dep.backend}' can use none of the devices found "
                f"({', '.join(r.id for r in self.inventory.resources)})"
            )
        params = None
        if dep.device == "auto" and len(usable) > 1 and dep.model is not None:
            path = self._model_path(dep)
            params = estimate_params(path, model_format(path))
        return place(dep, usable, params=params)

    def _model_path(self, dep: DeploymentConfig) -> Path:
        assert dep.model is not None
        path = Path(dep.model).expanduser()
        return path if path.is_absolute() else self._base_dir / path

    async def start(self) -> None:
        """Place, build, load and start every deployment, then wire the logical models."""
        self._monitor = self._monitor or VRAMMonitor.auto(clock=self._clock)
        if self._owns_monitor:
            self._monitor.start()
        store = self._store or ArtifactStore(
            (self._base_dir / self.config.artifact_dir) if self.config.artifact_dir else None
        )
        try:
            self._qos = QoSGate(self.config.qos, self.inventory, monitor=self._monitor, clock=self._clock)
            if self.config.cluster is not None:
                from xpuflow.cluster.runtime import ClusterRuntime

                self._cluster = ClusterRuntime(self.config, base_dir=self._base_dir, clock=self._clock)
                await self._cluster.start()
                # a partitioned device's tokens live in a gate actor on its node (cluster.device_gate)
                self._gates = await self._cluster.start_gates()
            else:
                self._tokens = self._partition_tokens()
            self._start_residency()
            for dep in self.config.deployments:
                await self._start_deployment(dep, store)
            for model in self._logical_models():
                self._routers[model.name] = self._wire(model)
        except BaseException:
            await self.stop()
            raise
        if self._residency:
            self._measure_baselines()
            self._idle_task = asyncio.create_task(self._idle_loop(), name="residency-keep-alive")
        self._ready = True

    def _partition_tokens(self) -> dict[str, ComputeTokens]:
        """One ``ComputeTokens`` per partitioned device (``qos.compute_tokens`` tokens, weighted by the
        partitions' ``compute_share``). ConfigError when a partition's device is not here or the
        ``memory_gb`` of a device's partitions exceeds its memory."""
        tokens: dict[str, ComputeTokens] = {}
        for part in self.config.qos.partitions:
            resource = self.inventory.get(part.device)
            if resource is None:
                known = ", ".join(r.id for r in self.inventory.resources) or "none"
                raise ConfigError(
                    f"partition '{part.name}' names device '{part.device}', which is not here; "
                    f"devices: {known}",
                    field="qos.partitions.device",
                )
            device_tokens = tokens.setdefault(part.device, ComputeTokens(self.config.qos.compute_tokens))
            device_tokens.add(part.name, part.compute_share)
            check_partition_memory(self.config.qos.partitions, part.device, resource.memory_bytes)
        return tokens

    def _compute_gate(self, dep: DeploymentConfig, device: str) -> Any:
        """The ``Worker.compute_gate`` of a deployment's workers: its partition's token, or None."""
        part = next((p for p in self.config.qos.partitions if dep.name in p.deployments), None)
        if part is None:
            return None
        if part.device != device:
            raise ConfigError(
                f"deployment '{dep.name}' runs on '{device}' but its partition '{part.name}' is on "
                f"'{part.device}'; set the deployment's device or the partition's",
                field="qos.partitions.device",
            )
        tokens, name = self._tokens[part.device], part.name
        return lambda: tokens.hold(name)

    # -- residency (docs/residency.md) ---------------------------------------------------------------

    def _start_residency(self) -> None:
        """One ``ModelResidency`` per device that has an on_demand deployment or a configured budget."""
        wanted = set(self.config.residency.budget_gb)
        for dep in self.config.deployments:
            if dep.load != "on_demand":
                continue
            if self.config.cluster is not None:
                raise ConfigError(
                    f"deployment '{dep.name}': load: on_demand runs in one process, not in cluster mode "
                    f"yet; use load: pinned (the default) with a cluster section",
                    field=f"deployments.{dep.name}.load",
                )
            if dep.managed is not None or dep.backend in ("remote_openai", "kserve_v2"):
                raise ConfigError(
                    f"deployment '{dep.name}': load: on_demand loads a model into this process, and "
                    f"backend '{dep.backend}' serves it from another server; use load: pinned",
                    field=f"deployments.{dep.name}.load",
                )
            if dep.device == "auto":
                raise ConfigError(
                    f"deployment '{dep.name}': load: on_demand needs an explicit device (its memory "
                    f"budget is per device), e.g. device: cpu",
                    field=f"deployments.{dep.name}.device",
                )
            wanted.add(dep.device)
        for device in sorted(wanted):
            resource = self.inventory.get(device)
            if resource is None:
                known = ", ".join(r.id for r in self.inventory.resources) or "none"
                raise ConfigError(
                    f"residency budget names device '{device}', which is not here; devices: {known}",
                    field="residency.budget_gb",
                )
            budget_gb = self.config.residency.budget_gb.get(device)
            total = resource.memory_bytes or (self._host_memory.read()[1] if device == "cpu" else None)
            if budget_gb is None and not total:
                raise ConfigError(
                    f"device '{device}' reports no memory size; set residency.budget_gb.{device}",
                    field="residency.budget_gb",
                )
            capacity = int(budget_gb * (1 << 30)) if budget_gb is not None else int(total or 0)
            controller = AdmissionController(capacity, retry_after_s=5.0)
            controller.add_context(ContextSpec(_MODELS_CONTEXT, QoSPolicy.BURSTABLE, max_bytes=capacity))
            self._usage_base[device] = self._usage_bytes(device) or 0
            self._residency[device] = ModelResidency(
                controller,
                load=self._load_model,
                unload=self._unload_model,
                free_bytes=functools.partial(self._free_in_budget, device, capacity),
                now_s=self._clock.monotonic,
                wait_for_room_s=self.config.residency.wait_for_room_s,
            )

    def _measure_baselines(self) -> None:
        """What each budgeted device holds that is no model's, measured once everything has started:
        its use now minus the pinned models' sizes (on_demand ones are unloaded by then). The libraries
        the start-up loads imported stay in memory for good; re-measurement after an unload must not
        charge them to the budget as unreclaimed model memory."""
        for device, residency in self._residency.items():
            usage = self._usage_bytes(device)
            if usage is not None:
                self._usage_base[device] = max(0, usage - residency.resident_bytes())

    def _residency_for(self, dep: DeploymentConfig, device: str) -> ModelResidency | None:
        residency = self._residency.get(device)
        if dep.load == "on_demand" and residency is None:  # placement chose another device than asked
            raise ConfigError(f"deployment '{dep.name}': no residency budget for device '{device}'")
        return residency

    def _check_fits(self, dep: DeploymentConfig, device: str, residency: ModelResidency, size: int) -> None:
        capacity = residency.controller.capacity_bytes
        if size > capacity:
            raise ConfigError(
                f"deployment '{dep.name}' needs {size / (1 << 30):.2f} GiB, more than the residency "
                f"budget of '{device}' ({capacity / (1 << 30):.2f} GiB); raise residency.budget_gb."
                f"{device} or set memory_gb if the measured size is wrong",
                field=f"deployments.{dep.name}.memory_gb",
            )

    async def _load_model(self, worker_id: str) -> Any:
        timeout_s = self.config.residency.load_timeout_s
        try:
            return await asyncio.wait_for(self._loaders[worker_id](), timeout_s)
        except asyncio.TimeoutError:
            raise ModelDoesNotFit(
                f"loading the model of worker '{worker_id}' took longer than residency.load_timeout_s "
                f"({timeout_s:g} s)",
                retry_after_s=timeout_s,
            ) from None

    async def _unload_model(self, worker_id: str, session: Any) -> None:
        await session.close()
        release_freed_memory()
        if "torch" in sys.modules:  # give cached CUDA blocks back, so re-measurement sees the room
            with contextlib.suppress(Exception):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _usage_bytes(self, device: str) -> int | None:
        """Bytes in use on ``device`` now: this process's resident memory for the CPU, used VRAM where
        the monitor reads the device, else None (unknown)."""
        if device == "cpu":
            import psutil

            return int(psutil.Process().memory_info().rss)
        reading = self._monitor.snapshot().get(device) if self._monitor is not None else None
        if reading is None or reading.total_bytes is None or reading.free_bytes is None:
            return None
        return int(reading.total_bytes - reading.free_bytes)

    def _free_in_budget(self, device: str, capacity: int) -> int | None:
        """What is left of the budget by measurement: capacity minus what the process (CPU) or device
        (VRAM) holds beyond what it held before any model was loaded."""
        usage = self._usage_bytes(device)
        if usage is None:
            return None
        return capacity - max(0, usage - self._usage_base.get(device, 0))

    def _model_bytes(self, dep: DeploymentConfig, with_model: int | None, without: int | None) -> int:
        """One replica's size: ``memory_gb`` when set, else the measured difference between the device's
        use with the model loaded and without it, but at least the size of its model files."""
        if dep.memory_gb is not None:
            return int(dep.memory_gb * (1 << 30))
        measured = max(0, with_model - without) if with_model is not None and without is not None else 0
        files = 0
        if dep.model is not None:
            path = self._model_path(dep)
            if path.is_file():
                files = path.stat().st_size
            elif path.is_dir():
                files = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return max(measured, files, 1 << 20)

    async def _idle_loop(self) -> None:
        while True:
            await self._clock.sleep(self.config.residency.check_interval_s)
            for device, residency in list(self._residency.items()):
                residency.remeasure()  # memory given back late (allocators, caches) is room again
                try:
                    for name in await residency.idle_out():
                        log.info("unloaded %s from %s: idle for its keep_alive_s", name, device)
                except Exception:  # a failing unload must not stop the sweep
                    log.exception("idle unload on %s failed", device)

    async def load_worker(self, worker_id: str) -> Mapping[str, Any]:
        """Admin: load an on_demand worker's model now (evicting others as needed)."""
        worker = self._worker(worker_id)
        residency = self._residency.get(worker.device)
        if residency is None or worker_id not in self._loaders:
            raise ConfigError(
                f"worker '{worker_id}' is not load: on_demand; it is always loaded", field="worker"
            )
        worker.session = await residency.ensure(worker_id)
        return {"worker": worker_id, "resident": True}

    async def unload_worker(self, worker_id: str) -> Mapping[str, Any]:
        """Admin: unload an on_demand worker's model now (refused while it runs a request)."""
        worker = self._worker(worker_id)
        residency = self._residency.get(worker.device)
        if residency is None or worker_id not in self._loaders:
            raise ConfigError(
                f"worker '{worker_id}' is not load: on_demand; drain it or remove it from the config",
                field="worker_state",
            )
        try:
            unloaded = await residency.evict(worker_id)
        except ConfigError as exc:
            raise ConfigError(str(exc), field="worker_state") from None
        return {"worker": worker_id, "resident": False, "unloaded": unloaded}

    def _residency_status(self) -> list[dict[str, Any]]:
        rows = []
        for device, residency in self._residency.items():
            ctrl = residency.controller
            rows.append(
                {
                    "device": device,
                    "budget_bytes": ctrl.capacity_bytes,
                    "resident_bytes": residency.resident_bytes(),
                    "unaccounted_bytes": ctrl.external_bytes,
                    "loads": residency.loads,
                    "evictions": residency.evictions,
                    "idle_unloads": residency.idle_unloads,
                    "models": residency.status(),
                }
            )
        return rows

    async def _start_cluster_deployment(self, dep: DeploymentConfig) -> None:
        """Cluster mode: the deployment's replicas run as Ray actors on the nodes placement chose."""
        placed, workers = await self._cluster.start_deployment(dep)
        resources = tuple(r.resource for r in placed.replicas)
        self.placements[dep.name] = Placement(dep.name, dep.backend, resources, placed.reason)
        for worker in workers:
            self.workers[worker.worker_id] = worker
            log.info("worker %s started on %s (%s)", worker.worker_id, worker.device, placed.reason)

    async def _start_deployment(self, dep: DeploymentConfig, store: ArtifactStore) -> None:
        if self._cluster is not None:
            await self._start_cluster_deployment(dep)
            return
        placement = self.place(dep)
        self.placements[dep.name] = placement
        compute_gate = self._compute_gate(dep, placement.resources[0].id)
        plugin = get_backend(dep.backend)
        model_config = dep.to_model_config(self._base_dir)
        artifacts = await asyncio.to_thread(
            build_all, plugin, list(placement.resources), model_config, store, progress=self._progress
        )
        capability = plugin.get_capability(list(placement.resources), model_config, artifacts)
        problems, notes = capability_problems(dep, capability)
        if problems:
            raise CapabilityError(
                f"deployment '{dep.name}' cannot run on {placement.resources[0].id} with backend "
                f"'{dep.backend}': {'; '.join(problems)}",
                reasons=problems,
            )
        if notes:
            placement = dataclasses.replace(placement, reason=f"{placement.reason}; {'; '.join(notes)}")
            self.placements[dep.name] = placement
        device = placement.resources[0].id
        residency = self._residency_for(dep, device)
        for index in range(dep.replicas):
            replica_config = model_config
            if dep.managed is not None:  # start the replica's own server first (docs/managed_engines.md)
                replica_config = await self._start_managed(dep, index, model_config)
            worker_id = f"{dep.name}/{index}"

            async def load(
                resources: tuple[Resource, ...] = placement.resources,
                config: Any = replica_config,
                artifacts: Any = artifacts,
            ) -> Any:
                return await plugin.create_session(list(resources), config, artifacts)

            usage_before = self._usage_bytes(device)
            session = await load()
            if residency is not None:
                if dep.load == "on_demand":
                    # loaded once at start to check it works and learn its size, then unloaded: one tiny
                    # request first (some backends bring weights into memory at their first request), and
                    # its size is what unloading gave back (a library's first import stays: no model's)
                    await _warm_up(session, dep)
                    loaded = self._usage_bytes(device)
                    await self._unload_model(worker_id, session)
                    unloaded = self._usage_bytes(device)
                    size = self._model_bytes(dep, loaded, unloaded)
                    if None not in (usage_before, loaded, unloaded):
                        took, gave = loaded - usage_before, loaded - unloaded  # type: ignore[operator]
                        if took > (64 << 20) and gave < took / 2:
                            log.warning(
                                "%s: unloading gave back %.0f MiB of the %.0f MiB loading took; the rest is "
                                "a library's first import, or memory the backend keeps (set memory_gb if "
                                "%s is wrong)",
                                worker_id,
                                gave / (1 << 20),
                                took / (1 << 20),
                                f"{size >> 20} MiB",
                            )
                    self._loaders[worker_id] = load
                    self._check_fits(dep, device, residency, size)
                    residency.register(
                        worker_id, size, context=_MODELS_CONTEXT, keep_alive_s=dep.keep_alive_s
                    )
                else:
                    size = self._model_bytes(dep, self._usage_bytes(device), usage_before)
                    residency.adopt(worker_id, size, session, context=_MODELS_CONTEXT)
            worker = Worker(
                session,
                worker_id=worker_id,
                deployment=dep.name,
                device=device,
                max_batch_size=dep.max_batch_size,
                queue_policy=dep.batching.queue_policy,
                queue_capacity=dep.batching.queue_capacity,
                aging_s=dep.batching.aging_s,
                batch_policy=dep.batching.policy,
                max_wait_s=dep.batching.max_wait_ms / 1000.0,
                clock=self._clock,
                device_state=self._device_state(device),
                close_session=True,
                # a gated worker keeps one batch waiting at the gate beside the one running, so its
                # partition is backlogged when a token frees and the fair queue can honour the shares
                max_concurrent_batches=1 if compute_gate is None else self.config.qos.compute_tokens + 1,
                max_in_flight=dep.max_in_flight,
                compute_gate=compute_gate,
                residency=residency,
                max_seq_len=min(dep.max_seq_len, capability.max_seq_len),
            )
            await worker.start()
            self.workers[worker.worker_id] = worker
            await self._start_checks(worker)
            log.info("worker %s started on %s (%s)", worker.worker_id, device, placement.reason)

    async def _start_checks(self, worker: Worker) -> None:
        """Active health checks for a worker whose session has them (remote servers: ``health()`` every
        ``health_interval_s``): a failed check takes the worker out and gives up its stuck requests."""
        session = worker.session
        interval_s = getattr(session, "health_interval_s", 0.0)
        if not isinstance(interval_s, (int, float)) or interval_s <= 0 or not hasattr(session, "health"):
            return
        timeout_s = getattr(session, "health_timeout_s", 1.0)
        settings = getattr(session, "settings", None)
        load_probe = None
        if settings is not None and getattr(settings, "server_metrics", False):
            # the server's own queue and cache use join the scorer's view (snapshot_of, below)
            headers = dict(getattr(settings, "headers", {}) or {})
            api_key = getattr(settings, "api_key", None)
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            load_probe = PrometheusLoadProbe(
                str(settings.base_url), timeout_s=float(timeout_s), headers=headers
            )
        checker = RemoteStatePoller(
            session,  # type: ignore[arg-type]
            worker_id=worker.worker_id,
            deployment=worker.deployment,
            device=worker.device,
            max_batch_size=worker.max_batch_size,
            interval_s=float(interval_s),
            poll_timeout_s=float(timeout_s) * 1.5,
            clock=self._clock,
            load_probe=load_probe,
            health=worker.health,
            on_unhealthy=worker.abandon_in_flight,
        )
        self._checkers[worker.worker_id] = checker
        await checker.start()

    def _snapshot_of(self, worker: Any) -> WorkerSnapshot:
        """What the scorer reads of a worker: its own snapshot with its service time, plus, for a remote
        server that reports its load, the server's queue and cache use (``routing.remote_state``)."""
        snapshot = service_time_snapshot(worker)
        checker = self._checkers.get(worker.worker_id)
        if checker is not None and checker.has_load:
            return checker.overlay(snapshot)
        return snapshot

    async def _stop_checks(self, worker_ids: Any) -> None:
        checkers = [self._checkers.pop(w) for w in list(worker_ids) if w in self._checkers]
        await asyncio.gather(*(c.stop() for c in checkers), return_exceptions=True)

    def _total_memory_bytes(self, worker: Worker) -> int | None:
        """A device's total memory where no poller reads it: host RAM for the CPU, else what
        discovery found."""
        if worker.device == "cpu":
            return self._host_memory.read()[1]
        resources = worker.session.resources
        return resources[0].memory_bytes if resources else None

    async def _start_managed(self, dep: DeploymentConfig, index: int, model_config: Any) -> Any:
        """Start a managed deployment's server for replica ``index``; its ``ModelConfig`` points at it."""
        from xpuflow.backends.remote.managed_engine import start_managed

        state_dir = (
            self._base_dir / self.config.artifact_dir
            if self.config.artifact_dir
            else Path.home() / ".cache" / "xpuflow"
        )
        engine, config = await start_managed(
            dep, index, model_config, base_dir=self._base_dir, state_dir=state_dir
        )
        self._managed[f"{dep.name}/{index}"] = engine
        return config

    def _device_state(self, device: str) -> Any:
        monitor = self._monitor
        host_memory = self._host_memory

        def read() -> Mapping[str, Any]:
            reading = monitor.snapshot().get(device) if monitor is not None else None
            if reading is None:
                if device == "cpu":  # no poller covers host RAM: read it live (cached for a second)
                    free, _total = host_memory.read()
                    return {} if free is None else {"free_memory_bytes": free}
                return {}
            return {"free_memory_bytes": reading.free_bytes, "utilization_pct": reading.utilization_pct}

        return read

    def _logical_models(self) -> list[LogicalModelConfig]:
        if self.config.models:
            return list(self.config.models)
        return [
            LogicalModelConfig(name=d.name, tiers=[TierRef(name="default", deployments=[d.name])])
            for d in self.config.deployments
        ]

    def _wire(self, model: LogicalModelConfig) -> Router:
        deployments = {d.name: d for d in self.config.deployments}
        tiers: list[tuple[str, list[Any]]] = []
        tier_configs = []
        for index, tier in enumerate(model.tiers):
            workers = [w for w in self.workers.values() if w.deployment in tier.deployments]
            gpus = [w.device for w in workers if w.device.startswith(("cuda", "rocm"))]
            tiers.append((tier.name, workers))
            last = index == len(model.tiers) - 1
            tier_configs.append(
                TierConfig(
                    name=tier.name,
                    device=gpus[0] if gpus else None,
                    min_score=tier.min_score if index > 0 and not last else None,
                    vram_headroom_gb=tier.vram_headroom_gb,
                    latency_sla_ms=tier.latency_sla_ms,
                )
            )
        try:
            routing = RoutingConfig(**{**model.routing, "tiers": tier_configs})
        except Exception as exc:
            raise ConfigError(
                f"model '{model.name}' routing: {exc}", field=f"models.{model.name}.routing"
            ) from exc
        first = deployments[model.tiers[0].deployments[0]]
        task = first.task if first.task in ("embedding", "tensor") else "chat"
        # the server's shared VRAM monitor, unless this model's routing asks for its own source or rate
        own_monitor = {"vram_source", "vram_poll_interval_ms"} & set(model.routing)
        tier_router = (
            AdaptiveRouter(
                routing,
                rules=[_load_rule(ref, model.name) for ref in model.rules],
                monitor=None if own_monitor else self._monitor,
                clock=self._clock,
            )
            if len(tiers) > 1
            else None
        )
        timeout_s = max(deployments[d].timeout_s for t in model.tiers for d in t.deployments)
        dispatcher = Dispatcher(
            scorer=WorkerScorer(wait_weight=model.wait_weight),
            snapshot_of=self._snapshot_of,
            policy=RetryPolicy(
                max_retries=model.max_retries,
                attempt_timeout_s=timeout_s,
                stream_idle_timeout_s=timeout_s,
                outage_retry_s=model.outage_retry_s,
            ),
            clock=self._clock,
        )
        return Router(
            model,
            task,
            tiers,  # type: ignore[arg-type]
            dispatcher=dispatcher,
            tier_router=tier_router,
            admit=self._admission,
            log=self._log,
            clock=self._clock,
            created_s=int(self._started_s),
        )

    async def stop(self) -> None:
        """Stop every worker (draining queued work) and the routers."""
        self._ready = False
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
            self._idle_task = None
        await self._stop_checks(list(self._checkers))
        workers, self.workers = list(self.workers.values()), {}
        await asyncio.gather(*(w.stop(drain=True) for w in workers), return_exceptions=True)
        residencies, self._residency = list(self._residency.values()), {}
        await asyncio.gather(*(r.close() for r in residencies), return_exceptions=True)
        self._loaders.clear()
        engines, self._managed = list(self._managed.values()), {}
        await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)
        if self._cluster is not None:
            cluster, self._cluster = self._cluster, None
            await cluster.stop()
        for router in self._routers.values():
            router.shutdown()
        self._routers.clear()
        self._tokens, self._gates = {}, {}
        if self._monitor is not None and self._owns_monitor:
            self._monitor.stop()

    async def __aenter__(self) -> Orchestrator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- Engine -------------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return self._ready

    def models(self) -> list[ModelInfo]:
        return [router.info() for router in self._routers.values()]

    def router(self, name: str) -> Router:
        """The router of logical model ``name``; ModelNotFound (404) naming the served ones."""
        router = self._routers.get(name)
        if router is None:
            raise ModelNotFound(name, list(self._routers))
        return router

    def _admission(self, call: InferenceCall) -> contextlib.AbstractAsyncContextManager[Any]:
        """The QoS guard of a call: holds its context's memory while it runs (no-op without contexts).
        ConfigError for a class that matches no context; entering raises AdmissionRejected (429)."""
        if self._qos is None:
            return NO_ADMISSION
        return self._qos.admit(call.qos_class, call.timeout_s)

    def complete(self, call: InferenceCall) -> Coroutine[Any, Any, InferenceResult]:
        """The model's router's ``complete`` coroutine itself, with none around it (an unknown model
        raises ``ModelNotFound`` here, before anything is awaited)."""
        return self.router(call.model).complete(call)

    def stream(self, call: InferenceCall) -> AsyncIterator[StreamEvent]:
        return self.router(call.model).stream(call)

    async def tensor_metadata(self, name: str) -> Any:
        """What a tensor model's backend says of its inputs and outputs (``kserve_v2``: the server's
        model metadata), or None when its sessions cannot tell."""
        for _tier, workers in self.router(name).tiers:
            for worker in workers:
                metadata = getattr(getattr(worker, "session", None), "metadata", None)
                if callable(metadata):
                    return await metadata()
        return None

    def status(self) -> Mapping[str, Any]:
        """Live state for the dashboard and the admin API (keys documented in docs/dashboard.md)."""
        workers = []
        vram = self._monitor.snapshot() if self._monitor is not None else None
        for worker in self.workers.values():
            snap = worker.snapshot().to_dict()
            metrics = worker.metrics.to_dict()
            reading = vram.get(worker.device) if vram is not None else None
            workers.append(
                {
                    **snap,
                    "backend": self.placements[worker.deployment].backend
                    if worker.deployment in self.placements
                    else "",
                    "tokens_per_s": metrics.get("tokens_per_s"),
                    "batch_sizes": metrics.get("batch_size_histogram", metrics.get("batch_sizes")),
                    "total_memory_bytes": reading.total_bytes
                    if reading is not None
                    else self._total_memory_bytes(worker),
                    "health": worker.health.state.value,
                    "managed": self._managed[worker.worker_id].status()
                    if worker.worker_id in self._managed
                    else None,
                    "node": getattr(worker, "node", None),  # cluster mode: the node it runs on
                    "metrics": metrics,
                }
            )
        return {
            "ready": self._ready,
            "workers": workers,
            "decisions": list(self._log.decisions)[::-1],
            "counters": dict(self._log.counters),
            "latency_ms": self._log.latency_summary(),
            "models": [m.__dict__ for m in self.models()],
            "placements": {
                name: {"backend": p.backend, "devices": [r.id for r in p.resources], "reason": p.reason}
                for name, p in self.placements.items()
            },
            "qos": self._qos.snapshot() if self._qos is not None else [],
            "partitions": self._partitions_status(),
            "residency": self._residency_status(),
        }

    def _partitions_status(self) -> list[dict[str, Any]]:
        """Each partition's configured share, measured busy share (its fraction of the device's
        token-seconds so far), grants and tokens in use."""
        rows = []
        for part in self.config.qos.partitions:
            tokens: ComputeTokens | DeviceGate | None = self._tokens.get(part.device)
            tokens = tokens or self._gates.get(part.device)
            if tokens is None:
                continue
            rows.append(
                {
                    "name": part.name,
                    "device": part.device,
                    "compute_share": part.compute_share,
                    "memory_gb": part.memory_gb,
                    "deployments": list(part.deployments),
                    "busy_share": tokens.busy_shares().get(part.name, 0.0),
                    "busy_s": tokens.busy_s.get(part.name, 0.0),
                    "granted": tokens.granted[part.name],
                    "tokens_in_use": tokens.held(part.name),
                    "device_tokens": tokens.num_tokens,
                }
            )
        return rows

    # -- AdminControl -------------------------------------------------------------------------------

    def _worker(self, worker_id: str) -> Worker:
        worker = self.workers.get(worker_id)
        if worker is None:
            raise ConfigError(
                f"no worker '{worker_id}'; workers: {', '.join(self.workers) or 'none'}", field="worker_id"
            )
        return worker

    async def drain(self, worker_id: str) -> None:
        self._worker(worker_id).draining = True

    async def undrain(self, worker_id: str) -> None:
        self._worker(worker_id).draining = False

    async def reload(self) -> Mapping[str, Any]:
        """Re-read the config file and apply the difference, so requests keep being served throughout:
        deployments whose settings did not change keep their workers; the workers of new and changed
        ones start first, then the logical models are rewired to them, then the workers of changed and
        removed deployments drain (they finish what they hold) and stop. A change of ``qos`` or
        ``resources`` counts as a change of every deployment (still started before the old ones
        drain); a change of ``cluster`` restarts everything. Returns what was added, changed, removed
        and kept."""
        if self._config_path is None:
            raise ConfigError("this server was started without a config file; nothing to reload")
        from xpuflow.config import load_config

        new, old = load_config(self._config_path), self.config
        old_deps = {d.name: d for d in old.deployments}
        new_deps = {d.name: d for d in new.deployments}
        everything = new.qos != old.qos or new.resources != old.resources
        kept = {n for n, d in new_deps.items() if not everything and old_deps.get(n) == d}
        changed = {n for n in new_deps if n in old_deps and n not in kept}
        added, removed = set(new_deps) - set(old_deps), set(old_deps) - set(new_deps)
        summary = {
            "added": sorted(added),
            "changed": sorted(changed),
            "removed": sorted(removed),
            "kept": sorted(kept),
        }
        if new.cluster != old.cluster or (new.cluster is not None and everything):
            # cluster mode: the partitions' gate actors are started with the cluster's workers
            await self.stop()
            self.config, self._inventory = new, None
            self.placements.clear()
            await self.start()
            return summary
        if new.resources != old.resources:
            self._inventory = None
        old_workers, old_checkers = self.workers, self._checkers
        self.config = new
        self.workers, self._checkers = {}, {}  # _start_deployment registers the new workers here
        try:
            if everything:
                self._qos = QoSGate(new.qos, self.inventory, monitor=self._monitor, clock=self._clock)
                self._tokens = self._partition_tokens()
            store = self._store or ArtifactStore(
                (self._base_dir / new.artifact_dir) if new.artifact_dir else None
            )
            for dep in new.deployments:
                if dep.name not in kept:
                    await self._start_deployment(dep, store)
        except BaseException:
            await self._stop_checks(list(self._checkers))
            started = list(self.workers.values())
            await asyncio.gather(*(w.stop(drain=False) for w in started), return_exceptions=True)
            self.config, self.workers, self._checkers = old, old_workers, old_checkers
            raise
        staying = {wid: w for wid, w in old_workers.items() if w.deployment in kept}
        leaving = [w for w in old_workers.values() if w.deployment not in kept]
        self.workers = {**staying, **self.workers}
        self._checkers = {**{w: c for w, c in old_checkers.items() if w in staying}, **self._checkers}
        retired_checks = [c for w, c in old_checkers.items() if w not in staying]
        old_routers, self._routers = self._routers, {m.name: self._wire(m) for m in self._logical_models()}
        for name in removed:
            self.placements.pop(name, None)
        # requests routed before the rewiring still hold the old workers: they drain, not refuse
        await asyncio.gather(*(c.stop() for c in retired_checks), return_exceptions=True)
        await asyncio.gather(*(w.stop(drain=True) for w in leaving), return_exceptions=True)
        for router in old_routers.values():
            router.shutdown()
        log.info("reloaded %s: %s", self._config_path, summary)
        return summary
