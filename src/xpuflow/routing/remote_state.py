"""The polled state of a remote deployment, as ``WorkerSnapshot``s that age out when polls stop.

A remote server's load is not visible in-process, so a ``RemoteStatePoller`` asks on an interval:
the session's ``health()`` (no token cost) and ``metrics()`` (the latency EMA and failures it saw),
plus, optionally, the server's own load from its Prometheus ``/metrics`` (``PrometheusLoadProbe``:
requests waiting and running, KV-cache use, for vLLM, SGLang, TGI and llama.cpp's server)::

    poller = RemoteStatePoller(session, worker_id="remote-a/0", deployment="chat-big",
                               device="remote:vllm-a", interval_s=2.0,
                               load_probe=PrometheusLoadProbe(session.settings.base_url),
                               health=worker.health)
    async with poller:                        # start() ... stop(): one background task
        dispatcher = Dispatcher(snapshot_of=lambda w: poller.overlay(service_time_snapshot(w))
                                if w is worker else service_time_snapshot(w))

Every snapshot carries ``taken_at_s`` (the injected clock's time of the reading it reports), so when
polls stall the scorer's staleness decay pulls the remote's load toward "unknown" instead of trusting
an old "idle". Each poll is an active health check reported to ``health`` (a ``HealthTracker``) with
``record_check``: a failed one takes the worker out of rotation at once, before client requests hit
it, and calls ``on_unhealthy`` (the orchestrator passes ``Worker.abandon_in_flight``, so requests
stuck on a hung server move to another worker instead of waiting out their timeout); a passing one
undoes what checks did, and makes the half-open probe of a worker that requests took out due now
(a server can answer ``/health`` while failing every request: only a served request closes that).

The schedule: every ``interval_s`` while checks pass; after a failure sooner, ``recheck_s``, then
doubling up to ``interval_s`` (0.25 s, 0.5 s, 1 s, ... by default), so a server that comes back is
seen within about a second and one that stays down costs one check a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from xpuflow.backends.remote.openai import RemoteMetrics
from xpuflow.clock import Clock, SystemClock
from xpuflow.scheduling.health import HealthTracker
from xpuflow.types import WorkerSnapshot

__all__ = [
    "PrometheusLoadProbe",
    "RemoteStatePoller",
    "RemoteStateSource",
    "ServerLoad",
    "overlay_remote",
    "parse_server_load",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


class RemoteStateSource(Protocol):
    """What the poller reads; ``backends.remote_openai.RemoteOpenAISession`` has both."""

    def metrics(self) -> RemoteMetrics: ...

    async def health(self) -> bool: ...


@dataclass(frozen=True)
class ServerLoad:
    """A server's own view of its load; None where the server does not report it."""

    waiting: int | None = None  # requests queued at the server
    running: int | None = None  # requests in its running batch
    kv_cache_usage: float | None = None  # fraction of KV-cache blocks in use, 0..1


# Gauge names per server; each server has one queue, one running and one cache gauge.
_WAITING = (
    "vllm:num_requests_waiting",
    "sglang:num_queue_reqs",
    "tgi_queue_size",
    "llamacpp:requests_deferred",
)
_RUNNING = (
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "tgi_batch_current_size",
    "llamacpp:requests_processing",
)
_KV_CACHE = (
    "vllm:kv_cache_usage_perc",  # vLLM v1
    "vllm:gpu_cache_usage_perc",  # vLLM v0
    "sglang:token_usage",
    "llamacpp:kv_cache_usage_ratio",
)


def parse_server_load(text: str) -> ServerLoad | None:
    """Read the load gauges from a Prometheus text exposition; None when it has none of them.

    Values of one gauge with several label sets (several models on one server) are summed; the cache
    fraction takes the largest, the one that limits the next request.
    """
    sums: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end <= 0:
            continue
        name = line[:name_end]
        if name not in _WAITING and name not in _RUNNING and name not in _KV_CACHE:
            continue
        rest = line[line.rfind("}") + 1 :] if "{" in line[: name_end + 1] else line[name_end:]
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if not math.isfinite(value) or value < 0:
            continue
        if name in _KV_CACHE:
            sums[name] = max(sums.get(name, 0.0), value)
        else:
            sums[name] = sums.get(name, 0.0) + value

    def first(names: tuple[str, ...]) -> float | None:
        return next((sums[n] for n in names if n in sums), None)

    waiting, running, cache = first(_WAITING), first(_RUNNING), first(_KV_CACHE)
    if waiting is None and running is None and cache is None:
        return None
    return ServerLoad(
        None if waiting is None else round(waiting),
        None if running is None else round(running),
        None if cache is None else min(1.0, cache),
    )


class PrometheusLoadProbe:
    """Reads ``GET {base_url}/metrics`` and parses it with ``parse_server_load``. Never raises: any
    failure (no such endpoint, timeout, unknown format) reads as None, "load unknown"."""

    def __init__(
        self, base_url: str, *, timeout_s: float = 2.0, headers: Mapping[str, str] | None = None
    ) -> None:
        root = base_url.rstrip("/")
        self.url = (root[: -len("/v1")] if root.endswith("/v1") else root) + "/metrics"
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})
        self.absent = False  # the server has no /metrics (404): it is not asked again
        self._http: Any = None  # aiohttp.ClientSession, created in the loop that first polls

    async def __call__(self) -> ServerLoad | None:
        if self.absent:
            return None
        try:
            import aiohttp

            if self._http is None:
                self._http = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s), headers=self.headers
                )
            async with self._http.get(self.url) as response:
                if response.status == 404:
                    self.absent = True
                    log.info("%s: no /metrics here; worker choice uses this gateway's own view", self.url)
                    return None
                if response.status != 200:
                    return None
                return parse_server_load(await response.text())
        except Exception as exc:
            log.debug("load probe %s failed: %s", self.url, exc)
            return None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


class RemoteStatePoller:
    """Polls one remote deployment every ``interval_s`` and keeps its latest ``WorkerSnapshot``.

    ``poll_once()`` can be driven by hand (tests, a simulator); ``start()``/``stop()`` run it in a
    background task that sleeps on the injected clock. A poll never raises and takes at most
    ``poll_timeout_s``; a poll that times out reads as an unhealthy server.
    """

    def __init__(
        self,
        source: RemoteStateSource,
        *,
        worker_id: str,
        deployment: str,
        device: str,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        interval_s: float = 2.0,
        poll_timeout_s: float = 5.0,
        clock: Clock | None = None,
        load_probe: Callable[[], Awaitable[ServerLoad | None]] | None = None,
        health: HealthTracker | None = None,
        on_unhealthy: Callable[[str], object] | None = None,
        recheck_s: float = 0.25,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if not recheck_s > 0:
            raise ValueError(f"recheck_s must be > 0, got {recheck_s}")
        if not poll_timeout_s > 0:
            raise ValueError(f"poll_timeout_s must be > 0, got {poll_timeout_s}")
        self.source = source
        self.interval_s = interval_s
        self.poll_timeout_s = poll_timeout_s
        self.health = health
        self.on_unhealthy = on_unhealthy
        self.recheck_s = recheck_s
        self.polls = 0
        self.failed_in_a_row = 0
        self._clock = clock or SystemClock()
        self._load_probe = load_probe
        self._task: asyncio.Task[None] | None = None
        self._load: ServerLoad | None = None
        self._load_at_s: float | None = None
        # Before the first poll nothing is known: no readings, so the scorer treats it as neutral.
        self._snapshot = WorkerSnapshot(
            worker_id=worker_id,
            deployment=deployment,
            device=device,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            taken_at_s=self._clock.monotonic(),
        )

    def snapshot(self) -> WorkerSnapshot:
        """The latest polled state (a fresh poller reports no readings)."""
        return self._snapshot

    def overlay(self, local: WorkerSnapshot) -> WorkerSnapshot:
        """``overlay_remote(local, self.snapshot())``."""
        return overlay_remote(local, self._snapshot)

    @property
    def has_load(self) -> bool:
        """Whether the server's own load has been read (a load probe answered at least once)."""
        return self._load is not None

    async def poll_once(self) -> WorkerSnapshot:
        """Read health, client-side metrics and (if configured) the server's load; never raises."""
        healthy = False
        with contextlib.suppress(Exception):
            healthy = bool(await _bounded(self.source.health(), self.poll_timeout_s))
        if self._load_probe is not None:
            load = None
            with contextlib.suppress(Exception):
                load = await _bounded(self._load_probe(), self.poll_timeout_s)
            if load is not None:
                self._load, self._load_at_s = load, self._clock.monotonic()
        now = self._clock.monotonic()
        metrics: RemoteMetrics | None = None
        with contextlib.suppress(Exception):
            metrics = self.source.metrics()
        self.failed_in_a_row = 0 if healthy else self.failed_in_a_row + 1
        reason = (
            f"the health check of {self._snapshot.device} failed (no answer within "
            f"{self.poll_timeout_s:g} s, or an error status)"
        )
        if self.health is not None:
            self.health.record_check(healthy, "" if healthy else reason)
        if not healthy and self.on_unhealthy is not None:
            try:
                self.on_unhealthy(reason)
            except Exception:  # a failing callback must not stop the checks
                log.exception("on_unhealthy of %s failed", self._snapshot.worker_id)
        ema_s = metrics.latency_ema_s if metrics is not None else None
        load = self._load
        # With a load probe the snapshot is as old as its load reading, so a probe that keeps
        # failing lets the remembered load age out; health and latency are read fresh every poll.
        taken_at = self._load_at_s if self._load_probe is not None and self._load_at_s is not None else now
        self._snapshot = replace(
            self._snapshot,
            healthy=healthy,
            queue_depth=(load.waiting or 0) if load else 0,
            in_flight=(load.running or 0) if load else 0,
            ema_latency_ms=None if ema_s is None else ema_s * 1000.0,
            utilization_pct=None
            if load is None or load.kv_cache_usage is None
            else load.kv_cache_usage * 100.0,
            taken_at_s=taken_at,
        )
        self.polls += 1
        return self._snapshot

    def next_delay_s(self) -> float:
        """Seconds until the next poll: ``interval_s`` after a pass, after failures ``recheck_s``
        doubling up to ``interval_s``."""
        if self.failed_in_a_row == 0:
            return self.interval_s
        return float(min(self.interval_s, self.recheck_s * 2.0 ** min(self.failed_in_a_row - 1, 30)))

    async def _loop(self) -> None:
        while True:
            await self.poll_once()
            await self._clock.sleep(self.next_delay_s())

    async def start(self) -> None:
        """Poll now and then every ``interval_s`` in a background task; idempotent."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"remote-state-{self._snapshot.worker_id}")

    async def stop(self) -> None:
        """Stop polling and close the load probe's connection; idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        close = getattr(self._load_probe, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()

    async def __aenter__(self) -> RemoteStatePoller:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _bounded(work: Awaitable[T], timeout_s: float) -> T:
    """``work``'s result, or TimeoutError after ``timeout_s`` (the work is cancelled). Unlike
    ``asyncio.wait_for`` before Python 3.12, it never swallows a cancellation of the caller."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    finally:
        if not task.done():
            task.cancel()
    if task not in done:
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    return task.result()


def overlay_remote(local: WorkerSnapshot, remote: WorkerSnapshot) -> WorkerSnapshot:
    """A local worker's snapshot with its remote server's polled state folded in (pure).

    The local worker knows what this gateway queued and sent; the server knows everyone's load. The
    result keeps the local identity and queue and adds the server's waiting requests (other clients'
    work is ahead of ours too), takes the larger of the two in-flight counts (ours are part of the
    server's), the local latency EMA when it has one, the server's cache use as utilisation, and
    is unhealthy if either says so. Its age is the remote reading's, so stale remote state ages out.
    """
    return replace(
        local,
        healthy=local.healthy and remote.healthy,
        queue_depth=local.queue_depth + remote.queue_depth,
        in_flight=max(local.in_flight, remote.in_flight),
        ema_latency_ms=local.ema_latency_ms if local.ema_latency_ms is not None else remote.ema_latency_ms,
        utilization_pct=remote.utilization_pct
        if remote.utilization_pct is not None
        else local.utilization_pct,
        free_memory_bytes=local.free_memory_bytes
        if local.free_memory_bytes is not None
        else remote.free_memory_bytes,
        taken_at_s=min(local.taken_at_s, remote.taken_at_s),
    )
