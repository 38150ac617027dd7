"""Device partitions: a memory limit and a compute share each, enforced on the device's workers.

Memory is a QoS context of the partition's ``memory_bytes``. Compute is ``ComputeTokens``: a weighted
fair semaphore of ``num_tokens`` concurrency tokens for the device's workers. When a token frees and
several partitions wait, it goes to the one with the least weighted service so far (start-time fair
queuing: each grant advances a partition's virtual time by ``1 / share``), so under contention each
partition's share of grants approaches its ``compute_share``, and an idle partition's share is used by
the others (the scheme is work conserving)::

    parts = DevicePartitions(scheduler, num_tokens=4)
    parts.add("chat", memory_bytes=8 * GB, compute_share=0.75, qos=QoSPolicy.GUARANTEED)
    parts.add("batch", memory_bytes=8 * GB, compute_share=0.25, qos=QoSPolicy.BEST_EFFORT)
    async with parts.run("chat", nbytes=1 * GB):
        await worker.submit(request)
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from xpuflow.config import PartitionConfig
from xpuflow.errors import ConfigError
from xpuflow.scheduling.qos.admission import QoSPolicy
from xpuflow.scheduling.qos.scheduler import ExecutionContext, QoSScheduler

__all__ = ["ComputeTokens", "DevicePartitions", "Partition", "check_partition_memory"]


def check_partition_memory(
    partitions: Sequence[PartitionConfig], device: str, capacity_bytes: int | None
) -> None:
    """ConfigError when the ``memory_gb`` of ``device``'s partitions add up to more than the device has
    (an unknown capacity checks nothing). One machine and cluster mode check the same way."""
    memory_gb = sum(p.memory_gb or 0.0 for p in partitions if p.device == device)
    if capacity_bytes and memory_gb * (1 << 30) > capacity_bytes:
        raise ConfigError(
            f"the memory_gb of the partitions on '{device}' add up to {memory_gb:.2f} GiB, more than its "
            f"{capacity_bytes / (1 << 30):.2f} GiB",
            field="qos.partitions.memory_gb",
        )


class ComputeTokens:
    """A weighted fair semaphore: ``num_tokens`` tokens shared by named partitions by ``shares``."""

    def __init__(self, num_tokens: int, shares: dict[str, float] | None = None) -> None:
        if num_tokens < 1:
            raise ConfigError("num_tokens must be >= 1", field="num_tokens")
        self.num_tokens = num_tokens
        self._free = num_tokens
        self._shares: dict[str, float] = {}
        self._vtime: dict[str, float] = {}
        self._waiting: dict[str, deque[tuple[int, asyncio.Future[None], bool]]] = {}
        self._seq = itertools.count()
        self.granted: Counter[str] = Counter()
        self.busy_s: dict[str, float] = {}  # seconds each partition held tokens in ``hold``
        self._held: Counter[str] = Counter()
        self._virtual_now = 0.0
        for name, share in (shares or {}).items():
            self.add(name, share)

    def add(self, name: str, share: float) -> None:
        if share <= 0:
            raise ConfigError(f"partition '{name}' compute_share must be > 0", field="compute_share")
        self._shares[name] = share
        self._vtime.setdefault(name, 0.0)
        self._waiting.setdefault(name, deque())

    @property
    def in_use(self) -> int:
        return self.num_tokens - self._free

    def _pick(self) -> str | None:
        waiting = [n for n, q in self._waiting.items() if q]
        if not waiting:
            return None
        return min(waiting, key=lambda n: (self._vtime[n], self._waiting[n][0][0]))

    def _charge(self, name: str, was_idle: bool) -> None:
        start = self._vtime[name]
        if was_idle:  # back from idle: start at the system's virtual time, with no banked credit
            start = max(start, self._virtual_now)
        self._virtual_now = start
        self._vtime[name] = start + 1.0 / self._shares[name]
        self._held[name] += 1
        self.granted[name] += 1

    async def acquire(self, name: str) -> None:
        """Take a token for partition ``name``, waiting for its fair turn."""
        if name not in self._shares:
            raise ConfigError(f"unknown partition '{name}'; known: {', '.join(sorted(self._shares))}")
        was_idle = not self._waiting[name] and self._held[name] == 0
        if self._free > 0 and not any(self._waiting.values()):
            self._free -= 1
            self._charge(name, was_idle)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (next(self._seq), future, was_idle)
        self._waiting[name].append(entry)
        self._dispatch()
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(name)  # granted as we were cancelled: hand it on
            elif entry in self._waiting[name]:
                self._waiting[name].remove(entry)
            raise

    def release(self, name: str) -> None:
        """Give back a token ``name`` holds."""
        self._held[name] -= 1
        self._free += 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self._free > 0:
            name = self._pick()
            if name is None:
                return
            _, future, was_idle = self._waiting[name].popleft()
            if future.done():
                continue
            self._free -= 1
            self._charge(name, was_idle)
            future.set_result(None)

    def held(self, name: str) -> int:
        """Tokens partition ``name`` holds now."""
        return self._held[name]

    def busy_shares(self) -> dict[str, float]:
        """Each partition's fraction of the token-seconds held through ``hold`` so far."""
        total = sum(self.busy_s.values())
        return {n: (self.busy_s.get(n, 0.0) / total if total > 0 else 0.0) for n in self._shares}

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """Hold one token of partition ``name`` for a block of work; its time adds to ``busy_s``."""
        await self.acquire(name)
        started = time.monotonic()
        try:
            yield
        finally:
            self.busy_s[name] = self.busy_s.get(name, 0.0) + time.monotonic() - started
            self.release(name)


@dataclass(frozen=True)
class Partition:
    name: str
    memory_bytes: int
    compute_share: float
    context: ExecutionContext


class DevicePartitions:
    """Partitions of one device: each a QoS context (memory) plus a compute share of the tokens."""

    def __init__(self, scheduler: QoSScheduler, *, num_tokens: int) -> None:
        self.scheduler = scheduler
        self.tokens = ComputeTokens(num_tokens)
        self._partitions: dict[str, Partition] = {}

    def add(
        self,
        name: str,
        *,
        memory_bytes: int,
        compute_share: float,
        qos: QoSPolicy | str = QoSPolicy.GUARANTEED,
        base_bytes: int | None = None,
    ) -> Partition:
        total = sum(p.compute_share for p in self._partitions.values()) + compute_share
        if total > 1.0 + 1e-9:
            raise ConfigError(
                f"compute shares add up to {total:.2f}; they must not exceed 1.0", field="compute_share"
            )
        ctx = self.scheduler.create_context(name, memory_bytes, base_bytes, qos)
        self.tokens.add(name, compute_share)
        part = Partition(name, memory_bytes, compute_share, ctx)
        self._partitions[name] = part
        return part

    def get(self, name: str) -> Partition:
        try:
            return self._partitions[name]
        except KeyError:
            known = ", ".join(sorted(self._partitions)) or "none"
            raise ConfigError(f"unknown partition '{name}'; known: {known}", field="partition") from None

    def measured_shares(self) -> dict[str, float]:
        """Each partition's fraction of the compute tokens granted so far."""
        total = sum(self.tokens.granted.values()) or 1
        return {n: self.tokens.granted[n] / total for n in self._partitions}

    @asynccontextmanager
    async def run(self, name: str, nbytes: int, *, timeout_s: float | None = None) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the partition's memory and one compute token for a block of work."""
        part = self.get(name)
        async with self.scheduler.admit(part.context, nbytes, timeout_s=timeout_s), self.tokens.hold(name):
            yield
