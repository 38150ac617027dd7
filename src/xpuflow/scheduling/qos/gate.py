"""The orchestrator's QoS contexts: the config's ``qos`` section as one ``QoSScheduler`` per device.

A request names a context by its API key's ``qos_class`` or its ``x-qos-class`` header (the gateway
puts the winner in ``InferenceCall.qos_class``); a request naming none goes to ``default_context``, or
runs without admission control when there is none. The value names a context, or a class (its first
context in config order)::

    gate = QoSGate(config.qos, inventory, monitor=monitor)
    async with gate.admit(call.qos_class, timeout_s=call.timeout_s):
        ...   # one request's memory of the context is held here, and always given back

Capacity comes from the inventory resource's ``memory_bytes`` (host memory for a CPU that reports
none); the free-memory probe reads the VRAM monitor, so measured pressure sheds best-effort work only
where there is a GPU reading.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from xpuflow.clock import Clock
from xpuflow.config import QoSConfig, QoSContextConfig
from xpuflow.discovery.inventory import Inventory
from xpuflow.errors import ConfigError
from xpuflow.scheduling.qos.admission import GB, MB, QoSPolicy
from xpuflow.scheduling.qos.scheduler import QoSScheduler
from xpuflow.telemetry.vram import VRAMMonitor
from xpuflow.types import ResourceType

__all__ = ["NO_ADMISSION", "QoSGate"]

_CLASSES = ", ".join(p.value for p in QoSPolicy)


class _Admitted:
    """The admission of a call that nothing limits (no QoS gate, or no context for its class): entering
    and leaving it cost no coroutine (an ``async with contextlib.nullcontext()`` costs two, on every
    request)."""

    __slots__ = ()

    def __aenter__(self) -> _Ready:
        return _READY

    def __aexit__(self, *exc: object) -> _Ready:
        return _READY  # None: an exception goes on


class _Ready:
    """An awaitable that is done at once, with None."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        yield from ()


_READY = _Ready()
NO_ADMISSION: AbstractAsyncContextManager[Any] = _Admitted()  # type: ignore[assignment]


@dataclass(frozen=True)
class _Context:
    config: QoSContextConfig
    scheduler: QoSScheduler
    request_bytes: int


def _device_index(device: str) -> int:
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


def _host_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


class QoSGate:
    """Admission by QoS context for the orchestrator. Raises ConfigError at construction when a context
    names a device the inventory lacks or the budgets do not fit the device."""

    def __init__(
        self,
        config: QoSConfig,
        inventory: Inventory,
        *,
        monitor: VRAMMonitor | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self._schedulers: dict[str, QoSScheduler] = {}
        self._contexts: dict[str, _Context] = {}
        for ctx in config.contexts:
            scheduler = self._schedulers.get(ctx.device)
            if scheduler is None:
                scheduler = self._schedulers[ctx.device] = self._scheduler(
                    ctx.device, inventory, monitor, clock
                )
            base = None if ctx.base_vram_gb is None else int(ctx.base_vram_gb * GB)
            try:
                scheduler.create_context(ctx.name, int(ctx.max_vram_gb * GB), base, ctx.qos)
            except ConfigError as exc:
                raise ConfigError(f"qos context '{ctx.name}': {exc}", field="qos.contexts") from exc
            self._contexts[ctx.name] = _Context(ctx, scheduler, int(ctx.request_vram_mb * MB))

    @staticmethod
    def _scheduler(
        device: str, inventory: Inventory, monitor: VRAMMonitor | None, clock: Clock | None
    ) -> QoSScheduler:
        resource = inventory.get(device)
        if resource is None:
            known = ", ".join(r.id for r in inventory.resources) or "none"
            raise ConfigError(
                f"qos contexts name device '{device}', which is not here; devices: {known}",
                field="qos.contexts.device",
            )
        capacity = resource.memory_bytes
        if capacity is None and resource.type is ResourceType.CPU:
            capacity = _host_memory_bytes()
        if not capacity:
            raise ConfigError(
                f"device '{device}' reports no memory size, so qos budgets cannot be checked on it; "
                "declare it under resources with memory_bytes",
                field="qos.contexts.device",
            )

        def free_bytes() -> int | None:
            reading = monitor.snapshot().get(device) if monitor is not None else None
            return None if reading is None else int(reading.free_bytes)

        return QoSScheduler(
            _device_index(device),
            capacity_bytes=capacity,
            free_bytes=free_bytes,
            clock=clock,
            use_cuda=False,  # the gate budgets memory; streams stay with the backends
        )

    @property
    def enabled(self) -> bool:
        return bool(self._contexts)

    def resolve(self, qos_class: str | None) -> _Context | None:
        """The context for a request's class (or the default context); None for no admission control.
        ConfigError (-> 400) naming the valid values when the class matches no context."""
        if not self._contexts:
            return None
        value = qos_class or self.config.default_context
        if not value:
            return None
        found = self._contexts.get(value)
        if found is not None:
            return found
        valid = f"contexts: {', '.join(self._contexts)}; classes: {_CLASSES}"
        try:
            policy = QoSPolicy.parse(value)
        except ConfigError:
            raise ConfigError(f"unknown QoS class '{value}'; valid {valid}", field="x-qos-class") from None
        for ctx in self._contexts.values():
            if ctx.config.qos == policy.value:
                return ctx
        raise ConfigError(
            f"no QoS context of class '{policy.value}' is configured; valid {valid}", field="x-qos-class"
        )

    def admit(self, qos_class: str | None, timeout_s: float | None) -> AbstractAsyncContextManager[Any]:
        """The guard a request runs in: holds one request's memory of its context until the block ends
        (success, failure or cancellation); a no-op without a context. Entering it raises
        AdmissionRejected (-> 429) when the memory does not come free within the wait."""
        ctx = self.resolve(qos_class)
        if ctx is None:
            return NO_ADMISSION
        wait = ctx.config.admission_timeout_s
        if timeout_s is not None:
            wait = timeout_s if wait is None else min(wait, timeout_s)
        ctx.scheduler.check_memory_pressure()  # cheap: a monitor pointer read, None without a GPU reading
        return ctx.scheduler.admit(ctx.config.name, ctx.request_bytes, timeout_s=wait)

    def snapshot(self) -> list[dict[str, Any]]:
        """One entry per context, in config order: what status()["qos"], metrics and the dashboard show."""
        out: list[dict[str, Any]] = []
        snaps = {device: s.snapshot() for device, s in self._schedulers.items()}
        for name, ctx in self._contexts.items():
            row = snaps[ctx.config.device]["contexts"][name]
            out.append(
                {
                    "name": name,
                    "device": ctx.config.device,
                    "qos": row["qos"],
                    "used_bytes": row["used_bytes"],
                    "max_bytes": row["max_bytes"],
                    "base_bytes": row["base_bytes"],
                    "request_bytes": ctx.request_bytes,
                    "admitted": int(row.get("admitted", 0)),
                    "rejected": int(row.get("rejected", 0)),
                    "shed": int(row.get("shed", 0)),
                }
            )
        return out
