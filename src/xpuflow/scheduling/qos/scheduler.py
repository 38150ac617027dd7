"""QoS execution contexts on one device: budgets, admission guards, streams and memory pressure.

A ``QoSScheduler`` owns one device's ``AdmissionController`` and hands out ``ExecutionContext``s.
Work runs inside ``context_session(ctx)`` (sync or async), which holds a grant of the context's budget
for its duration and always gives it back, on success, on an exception and on cancellation::

    sched = QoSScheduler(device_id=0, capacity_bytes=24 * GB)
    chat = sched.create_context("chat", max_vram=8 * GB, qos=QoSPolicy.GUARANTEED)
    batch = sched.create_context("batch", max_vram=16 * GB, qos=QoSPolicy.BEST_EFFORT)
    async with sched.admit("chat", 2 * GB):
        ...

The module-level functions (``initialize``, ``create_context``, ...) are thin wrappers over one
default scheduler. With torch and CUDA, each context gets its own CUDA stream; elsewhere streams and
events are host stand-ins with the same API, and memory is host accounting.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from xpuflow.clock import Clock, SystemClock
from xpuflow.errors import AdmissionRejected, ConfigError
from xpuflow.scheduling.qos.admission import (
    GB,
    MB,
    AdmissionController,
    AdmissionOutcome,
    ContextSpec,
    Grant,
    QoSPolicy,
)

__all__ = [
    "GB",
    "MB",
    "ContextSession",
    "ExecutionContext",
    "HostEvent",
    "HostStream",
    "MemoryPressure",
    "QoSPolicy",
    "QoSScheduler",
    "context_session",
    "create_context",
    "get_available_vram",
    "get_context_usage",
    "get_stream",
    "initialize",
    "on_memory_pressure",
    "record_event",
    "wait_event",
]

FreeBytesFn = Callable[[], int | None]


def _cuda(device_id: int) -> Any | None:
    """torch.cuda when torch is installed and the device exists; None otherwise. Never raises."""
    try:
        import torch

        if torch.cuda.is_available() and device_id < torch.cuda.device_count():
            return torch.cuda
    except Exception:
        return None
    return None


def _default_memory(device_id: int) -> tuple[int, FreeBytesFn]:
    """(capacity_bytes, free-bytes probe) of the CUDA device, or of host memory without CUDA."""
    cuda = _cuda(device_id)
    if cuda is not None:
        _, total = cuda.mem_get_info(device_id)

        def cuda_free() -> int | None:
            try:
                return int(cuda.mem_get_info(device_id)[0])
            except Exception:
                return None

        return int(total), cuda_free
    import psutil

    def host_free() -> int | None:
        try:
            return int(psutil.virtual_memory().available)
        except Exception:
            return None

    return int(psutil.virtual_memory().total), host_free


class HostEvent:
    """An event on a host stream: host work is synchronous, so it is complete when recorded."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class HostStream:
    """The stand-in for a CUDA stream where there is no CUDA: the same calls, no device work."""

    def record_event(self) -> HostEvent:
        return HostEvent()

    def wait_event(self, event: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


@dataclass(frozen=True)
class MemoryPressure:
    """Told to ``on_memory_pressure`` handlers: measured free memory fell below what the grants
    expect. ``deficit_bytes`` is what is still over after shedding best-effort work."""

    device_id: int
    free_bytes: int
    external_bytes: int
    deficit_bytes: int
    shed_contexts: tuple[str, ...]


@dataclass(eq=False)
class ExecutionContext:
    """A named budget on one device. ``max_vram`` and ``base_vram`` are bytes."""

    name: str
    qos: QoSPolicy
    max_vram: int
    base_vram: int
    device_id: int
    _stream: Any = field(default=None, repr=False)


class ContextSession:
    """A grant of ``nbytes`` of a context's budget, held for a ``with`` or ``async with`` block.

    The sync form admits at once or raises AdmissionRejected; the async form waits in the queue up to
    ``timeout_s``. Exit releases the grant as completed, failed or cancelled. An async holder whose
    grant is shed for a higher class is cancelled and sees AdmissionRejected; a sync holder sees
    ``shed`` become true and should stop."""

    def __init__(
        self, scheduler: QoSScheduler, ctx: ExecutionContext, nbytes: int, timeout_s: float | None
    ) -> None:
        self._sched = scheduler
        self.context = ctx
        self.nbytes = nbytes
        self.timeout_s = timeout_s
        self.grant: Grant | None = None

    @property
    def shed(self) -> bool:
        return self.grant is not None and self.grant.release_reason == "shed"

    def __enter__(self) -> ContextSession:
        self.grant = self._sched._admit_now(self.context, self.nbytes)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._finish(exc)

    async def __aenter__(self) -> ContextSession:
        self.grant = await self._sched._admit_wait(self.context, self.nbytes, self.timeout_s)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        was_shed = self.shed
        self._finish(exc)
        if was_shed and isinstance(exc, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
            raise AdmissionRejected(
                f"work in best-effort context '{self.context.name}' was shed to make room for a higher "
                "class; retry later",
                retry_after_s=self._sched.controller.retry_after_s,
            ) from exc

    def _finish(self, exc: BaseException | None) -> None:
        if self.grant is None:
            return
        if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
            reason = "cancelled"
        else:
            reason = "completed" if exc is None else "failed"
        self._sched._release(self.grant, reason)


class QoSScheduler:
    """QoS contexts on one device. ``capacity_bytes`` and ``free_bytes`` default to the CUDA device's
    memory (or host memory without CUDA); tests pass both, plus a ``FakeClock``."""

    def __init__(
        self,
        device_id: int = 0,
        *,
        capacity_bytes: int | None = None,
        free_bytes: FreeBytesFn | None = None,
        clock: Clock | None = None,
        retry_after_s: float = 0.5,
        use_cuda: bool | None = None,
    ) -> None:
        if capacity_bytes is None or free_bytes is None:
            measured_total, measured_free = _default_memory(device_id)
            capacity_bytes = measured_total if capacity_bytes is None else capacity_bytes
            free_bytes = measured_free if free_bytes is None else free_bytes
        self.device_id = device_id
        self.clock: Clock = clock or SystemClock()
        self.controller = AdmissionController(capacity_bytes, retry_after_s=retry_after_s)
        self.controller.on_shed = self._on_shed
        self._free_bytes = free_bytes
        self._cuda = _cuda(device_id) if use_cuda is not False else None
        self._contexts: dict[str, ExecutionContext] = {}
        self._handlers: list[Callable[[MemoryPressure], None]] = []
        self._waiters: dict[int, asyncio.Future[Grant]] = {}
        self._holders: dict[int, asyncio.Task[Any]] = {}
        self.counters: dict[str, Counter[str]] = {}

    # ---------------------------------------------------------------- contexts
    def create_context(
        self,
        name: str,
        max_vram: int,
        base_vram: int | None = None,
        qos: QoSPolicy | str = QoSPolicy.GUARANTEED,
    ) -> ExecutionContext:
        """Create a context; Guaranteed reserves ``max_vram``, Burstable ``base_vram`` (default 0)."""
        policy = QoSPolicy.parse(qos)
        if policy is QoSPolicy.GUARANTEED:
            base = max_vram
        elif policy is QoSPolicy.BURSTABLE:
            base = base_vram or 0
        else:
            if base_vram:
                raise ConfigError(f"best-effort context '{name}' cannot reserve base_vram", field="base_vram")
            base = 0
        self.controller.add_context(ContextSpec(name, policy, max_vram, base))
        ctx = ExecutionContext(name, policy, max_vram, base, self.device_id)
        self._contexts[name] = ctx
        self.counters[name] = Counter()
        return ctx

    def context(self, name: str | ExecutionContext) -> ExecutionContext:
        if isinstance(name, ExecutionContext):
            return name
        try:
            return self._contexts[name]
        except KeyError:
            known = ", ".join(sorted(self._contexts)) or "none"
            raise ConfigError(f"unknown QoS context '{name}'; known: {known}", field="context") from None

    @property
    def contexts(self) -> list[ExecutionContext]:
        return list(self._contexts.values())

    def resolve(
        self, key_qos_class: str | None, header_qos_class: str | None = None
    ) -> ExecutionContext | None:
        """The context for a request: the API key's class wins over the ``x-qos-class`` header. The value
        names a context, or a class (its first context). None when neither is given."""
        value = key_qos_class or header_qos_class
        if not value:
            return None
        if value in self._contexts:
            return self._contexts[value]
        policy = QoSPolicy.parse(value)
        for ctx in self._contexts.values():
            if ctx.qos is policy:
                return ctx
        known = ", ".join(sorted(self._contexts)) or "none"
        raise ConfigError(f"no QoS context of class '{policy.value}'; contexts: {known}", field="x-qos-class")

    # ---------------------------------------------------------------- admission
    def context_session(
        self, ctx: ExecutionContext | str, nbytes: int | None = None, *, timeout_s: float | None = None
    ) -> ContextSession:
        """Hold ``nbytes`` (default: the context's base, or its max if it has none) for a block."""
        context = self.context(ctx)
        size = nbytes if nbytes is not None else (context.base_vram or context.max_vram)
        return ContextSession(self, context, size, timeout_s)

    def admit(
        self, ctx: ExecutionContext | str, nbytes: int, *, timeout_s: float | None = None
    ) -> ContextSession:
        """The admission guard a caller wraps work in: ``async with scheduler.admit("chat", n): ...``."""
        return self.context_session(ctx, nbytes, timeout_s=timeout_s)

    def _admit_now(self, ctx: ExecutionContext, nbytes: int) -> Grant:
        try:
            outcome = self.controller.admit(ctx.name, nbytes, now_s=self.clock.monotonic())
        except AdmissionRejected:
            self.counters[ctx.name]["rejected"] += 1
            raise
        self._settle(outcome)
        assert outcome.grant is not None
        self.counters[ctx.name]["admitted"] += 1
        return outcome.grant

    async def _admit_wait(self, ctx: ExecutionContext, nbytes: int, timeout_s: float | None) -> Grant:
        now = self.clock.monotonic()
        try:
            ticket, outcome = self.controller.enqueue(ctx.name, nbytes, now_s=now, timeout_s=timeout_s)
        except AdmissionRejected:
            self.counters[ctx.name]["rejected"] += 1
            raise
        task = asyncio.current_task()
        if ticket is None:
            grant = outcome.grant
            self._settle(outcome)
        else:
            served = {t.ticket_id: g for t, g in outcome.served}
            if ticket.ticket_id in served:
                grant = served.pop(ticket.ticket_id)
                outcome.served = [(t, g) for t, g in outcome.served if t.ticket_id != ticket.ticket_id]
                self._settle(outcome)
            else:
                future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
                self._waiters[ticket.ticket_id] = future
                self._settle(outcome)
                try:
                    grant = await asyncio.wait_for(asyncio.shield(future), timeout_s)
                except BaseException as exc:
                    self._waiters.pop(ticket.ticket_id, None)
                    self.controller.withdraw(ticket)
                    if future.done() and not future.cancelled() and future.exception() is None:
                        # served in the same instant we gave up: give the bytes straight back
                        self._release(future.result(), "cancelled")
                    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
                        self.counters[ctx.name]["rejected"] += 1
                        raise AdmissionRejected(
                            f"context '{ctx.name}' waited {timeout_s} s for {nbytes} bytes of device memory; "
                            "retry later",
                            retry_after_s=self.controller.retry_after_s,
                        ) from None
                    raise
        assert grant is not None
        if task is not None:
            self._holders[grant.grant_id] = task
        self.counters[ctx.name]["admitted"] += 1
        return grant

    def _release(self, grant: Grant, reason: str) -> None:
        self._holders.pop(grant.grant_id, None)
        if not grant.released:
            self.counters[grant.context][reason] += 1
        self._settle(self.controller.release(grant, reason, now_s=self.clock.monotonic()))

    def _settle(self, outcome: AdmissionOutcome) -> None:
        """Wake waiters whose tickets were served or rejected."""
        for ticket, grant in outcome.served:
            future = self._waiters.pop(ticket.ticket_id, None)
            if future is None or future.done():
                self.controller.release(grant, "cancelled", now_s=self.clock.monotonic())
            else:
                future.set_result(grant)
        for ticket, error in outcome.rejected:
            self.counters[ticket.context]["rejected"] += 1
            future = self._waiters.pop(ticket.ticket_id, None)
            if future is not None and not future.done():
                future.set_exception(error)

    def _on_shed(self, grant: Grant) -> None:
        self.counters[grant.context]["shed"] += 1
        task = self._holders.pop(grant.grant_id, None)
        if task is not None and not task.done():
            task.cancel(f"shed for a higher QoS class on device {self.device_id}")

    # ---------------------------------------------------------------- memory
    def get_available_vram(self) -> int:
        """Bytes a best-effort grant could take now."""
        return self.controller.available_bytes()

    def get_context_usage(self, ctx: ExecutionContext | str) -> tuple[int, int]:
        """(used_bytes, max_bytes) of a context."""
        context = self.context(ctx)
        return self.controller.used_bytes(context.name), context.max_vram

    def on_memory_pressure(
        self, handler: Callable[[MemoryPressure], None]
    ) -> Callable[[MemoryPressure], None]:
        """Register a handler (usable as a decorator) called when ``check_memory_pressure`` finds less
        free memory than the grants expect."""
        self._handlers.append(handler)
        return handler

    def check_memory_pressure(self) -> MemoryPressure | None:
        """Measure free memory, charge the unexplained part as external, shed best-effort work if the
        grants no longer fit, and tell the handlers. Returns the event, or None without pressure."""
        free = self._free_bytes()
        if free is None:
            return None
        ctrl = self.controller
        external = max(0, ctrl.capacity_bytes - free - ctrl.used_bytes())
        before = ctrl.used_bytes() + external > ctrl.capacity_bytes or external > ctrl.external_bytes
        outcome = ctrl.set_external_bytes(external, now_s=self.clock.monotonic())
        self._settle(outcome)
        if not before and not outcome.shed:
            return None
        event = MemoryPressure(
            self.device_id,
            free,
            external,
            ctrl.overcommit_bytes,
            tuple(sorted({g.context for g in outcome.shed})),
        )
        for handler in list(self._handlers):
            handler(event)
        return event

    # ---------------------------------------------------------------- streams
    def get_stream(self, ctx: ExecutionContext | str) -> Any:
        """The context's CUDA stream (created on first use), or a ``HostStream`` without CUDA."""
        context = self.context(ctx)
        if context._stream is None:
            if self._cuda is not None:
                context._stream = self._cuda.Stream(device=self.device_id)
            else:
                context._stream = HostStream()
        return context._stream

    def record_event(self, ctx: ExecutionContext | str) -> Any:
        """An event marking the work queued so far on the context's stream."""
        return self.get_stream(ctx).record_event()

    def wait_event(self, ctx: ExecutionContext | str, event: Any) -> None:
        """Make later work on the context's stream wait for ``event`` (from any context)."""
        self.get_stream(ctx).wait_event(event)

    def snapshot(self) -> dict[str, Any]:
        """Budgets, usage and counters per context: what metrics and the dashboard show."""
        return {
            "device_id": self.device_id,
            "capacity_bytes": self.controller.capacity_bytes,
            "available_bytes": self.get_available_vram(),
            "external_bytes": self.controller.external_bytes,
            "queued": len(self.controller.queued),
            "contexts": {
                c.name: {
                    "qos": c.qos.value,
                    "max_bytes": c.max_vram,
                    "base_bytes": c.base_vram,
                    "used_bytes": self.controller.used_bytes(c.name),
                    **dict(self.counters[c.name]),
                }
                for c in self._contexts.values()
            },
        }


# -------------------------------------------------------------------- module-level API
_default: QoSScheduler | None = None


def initialize(device_id: int = 0, **kwargs: Any) -> QoSScheduler:
    """Create the default scheduler for ``device_id`` (keyword arguments as ``QoSScheduler``)."""
    global _default
    _default = QoSScheduler(device_id, **kwargs)
    return _default


def _scheduler() -> QoSScheduler:
    if _default is None:
        raise ConfigError("QoS scheduling is not initialized; call initialize(device_id) first")
    return _default


def create_context(
    name: str, max_vram: int, base_vram: int | None = None, qos: QoSPolicy | str = QoSPolicy.GUARANTEED
) -> ExecutionContext:
    return _scheduler().create_context(name, max_vram, base_vram, qos)


def context_session(ctx: ExecutionContext | str, nbytes: int | None = None) -> ContextSession:
    return _scheduler().context_session(ctx, nbytes)


def get_available_vram() -> int:
    return _scheduler().get_available_vram()


def get_context_usage(ctx: ExecutionContext | str) -> tuple[int, int]:
    return _scheduler().get_context_usage(ctx)


def on_memory_pressure(handler: Callable[[MemoryPressure], None]) -> Callable[[MemoryPressure], None]:
    return _scheduler().on_memory_pressure(handler)


def get_stream(ctx: ExecutionContext | str) -> Any:
    return _scheduler().get_stream(ctx)


def record_event(ctx: ExecutionContext | str) -> Any:
    return _scheduler().record_event(ctx)


def wait_event(ctx: ExecutionContext | str, event: Any) -> None:
    _scheduler().wait_event(ctx, event)
