"""A fake serving engine shipped with the ``Engine`` contract, for gateway and dashboard tests.

It serves two logical models over ``FakeSession``s: ``chat`` (chat and text completion, tiers
``tier_high`` on a fake GPU and ``tier_low`` on the CPU) and ``embed`` (embeddings on the CPU). Answers
are deterministic (the last message's words reversed; hash-derived vectors), every call is recorded,
and latency and failures are set per test::

    engine = FakeEngine(service_time_s=0.01, chunk_interval_s=0.001)
    engine.fail_next(AdmissionRejected("queue full", retry_after_s=2))   # the next call raises it
    app = create_app(engine, GatewaySettings())
    ...
    engine.calls[-1].priority, engine.status()["workers"][0]["in_flight"]
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from xpuflow.backends.base import Completion
from xpuflow.engine import InferenceCall, InferenceResult, ModelInfo, StreamEvent
from xpuflow.errors import ConfigError, ModelNotFound, RoutingError, XpuflowError
from xpuflow.scheduling.request import RequestKind
from xpuflow.testing.fake_backend import FakeSession
from xpuflow.types import Alternative, RoutingDecision

__all__ = ["FakeEngine", "FakeWorker"]

_GIB = 1 << 30


@dataclass
class FakeWorker:
    """One fake replica with the live state a real worker reports."""

    worker_id: str
    model: str
    tier: str
    device: str
    session: FakeSession
    total_memory_bytes: int = 8 * _GIB
    free_memory_bytes: int = 6 * _GIB
    healthy: bool = True
    draining: bool = False
    in_flight: int = 0
    completed: int = 0
    failed: int = 0
    tokens_total: int = 0
    ema_latency_ms: float | None = None
    batch_sizes: Counter[int] = field(default_factory=Counter)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    def record(self, latency_ms: float, tokens: int, ok: bool) -> None:
        if not ok:
            self.failed += 1
            return
        self.completed += 1
        self.tokens_total += tokens
        self.batch_sizes[1] += 1
        self.latencies_ms.append(latency_ms)
        old = self.ema_latency_ms
        self.ema_latency_ms = latency_ms if old is None else old + 0.2 * (latency_ms - old)

    def to_dict(self, started_s: float) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)

        def pct(q: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

        return {
            "worker_id": self.worker_id,
            "deployment": f"{self.model}-{self.tier}",
            "model": self.model,
            "tier": self.tier,
            "device": self.device,
            "healthy": self.healthy,
            "draining": self.draining,
            "health": "draining" if self.draining else "healthy" if self.healthy else "unhealthy",
            "queue_depth": 0,
            "in_flight": self.in_flight,
            "ema_latency_ms": self.ema_latency_ms,
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
            "tokens_total": self.tokens_total,
            "tokens_per_s": self.tokens_total / max(1e-9, time.monotonic() - started_s),
            "total_memory_bytes": self.total_memory_bytes,
            "free_memory_bytes": self.free_memory_bytes,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "completed": self.completed,
            "failed": self.failed,
        }


class FakeEngine:
    """``Engine`` and ``AdminControl`` over fake workers. Single event loop; not thread-safe.

    ``service_time_s`` delays every answer; ``chunk_interval_s`` spaces stream chunks;
    ``stream_error_after`` ends streams with an error event after that many chunks; ``ready`` is what
    ``is_ready()`` reports.
    """

    def __init__(
        self,
        *,
        service_time_s: float = 0.0,
        chunk_interval_s: float = 0.0,
        stream_error_after: int | None = None,
        ready: bool = True,
        embedding_dim: int = 8,
    ) -> None:
        self.chunk_interval_s = chunk_interval_s
        self.stream_error_after = stream_error_after
        self.ready = ready
        self.calls: list[InferenceCall] = []
        self.reloads = 0
        self.decisions: deque[dict[str, Any]] = deque(maxlen=100)
        self.qos: list[dict[str, Any]] = []  # status()["qos"] rows a test sets (docs/dashboard.md)
        self._failures: deque[XpuflowError] = deque()
        self._started_s = time.monotonic()
        self._models = {
            "chat": ModelInfo("chat", "chat", ("tier_high", "tier_low"), created_s=1_700_000_000),
            "embed": ModelInfo("embed", "embedding", ("default",), created_s=1_700_000_000),
        }

        def session(name: str) -> FakeSession:
            return FakeSession(name, service_time_s=service_time_s, embedding_dim=embedding_dim)

        self.workers: dict[str, FakeWorker] = {
            w.worker_id: w
            for w in (
                FakeWorker("chat/tier_high/0", "chat", "tier_high", "cuda:0", session("chat")),
                FakeWorker(
                    "chat/tier_low/0", "chat", "tier_low", "cpu", session("chat"), 24 * _GIB, 20 * _GIB
                ),
                FakeWorker(
                    "embed/default/0", "embed", "default", "cpu", session("embed"), 24 * _GIB, 20 * _GIB
                ),
            )
        }
        self.requests_total = 0
        self.errors_total = 0
        self._latencies_ms: deque[float] = deque(maxlen=512)

    # -- test controls ------------------------------------------------------------------------------

    def fail_next(self, error: XpuflowError, times: int = 1) -> None:
        """Raise ``error`` from the next ``times`` calls (before any routing)."""
        self._failures.extend([error] * times)

    def is_ready(self) -> bool:
        return self.ready

    # -- Engine -------------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return list(self._models.values())

    def _route(self, call: InferenceCall) -> tuple[FakeWorker, RoutingDecision]:
        self.calls.append(call)
        self.requests_total += 1
        if self._failures:
            self.errors_total += 1
            raise self._failures.popleft()
        info = self._models.get(call.model)
        if info is None:
            self.errors_total += 1
            raise ModelNotFound(call.model, list(self._models))
        tiers = info.tiers
        if call.tier_override is not None:
            if call.tier_override not in tiers:
                raise ConfigError(
                    f"model '{call.model}' has no tier '{call.tier_override}'; tiers: {', '.join(tiers)}",
                    field="x-xpuflow-tier",
                )
            tiers = (call.tier_override,)
            rule, why = "override", f"override: the client asked for {call.tier_override}"
        else:
            rule, why = "default", "default: no rule objected"
        rejected: list[Alternative] = []
        for tier in tiers:
            for worker in self.workers.values():
                if worker.model != call.model or worker.tier != tier:
                    continue
                if worker.draining or not worker.healthy:
                    rejected.append(
                        Alternative(worker.worker_id, "draining" if worker.draining else "unhealthy")
                    )
                    continue
                decision = RoutingDecision(
                    device=worker.device,
                    reason=f"{why}; worker {worker.worker_id} is the only healthy one",
                    confidence=1.0,
                    alternatives=tuple(rejected),
                    tier=tier,
                    worker=worker.worker_id,
                    details={"rule": rule},
                )
                self.decisions.append(
                    {
                        **decision.to_dict(),
                        "model": call.model,
                        "request_id": call.request_id,
                        "ts": time.time(),
                    }
                )
                return worker, decision
        self.errors_total += 1
        raise RoutingError(
            f"no worker can take model '{call.model}'",
            reasons=[f"{a.candidate}: {a.reason}" for a in rejected],
        )

    async def complete(self, call: InferenceCall) -> InferenceResult:
        worker, decision = self._route(call)
        start = time.perf_counter()
        worker.in_flight += 1
        try:
            session = worker.session
            if call.kind is RequestKind.EMBEDDING:
                vectors = await session.embed(list(call.payload))
                tokens = sum(len(str(t).split()) for t in call.payload)
                result = InferenceResult(decision, embeddings=vectors, prompt_tokens=tokens)
            else:
                completion: Completion
                if call.kind is RequestKind.CHAT:
                    completion = await session.chat(call.payload, call.params)
                else:
                    completion = await session.generate(str(call.payload), call.params)
                completion = Completion(
                    completion.text,
                    completion.prompt_tokens,
                    completion.completion_tokens,
                    completion.finish_reason,
                    call.model,
                )
                result = InferenceResult(
                    decision, completion=completion, prompt_tokens=completion.prompt_tokens
                )
                tokens = completion.completion_tokens
        except XpuflowError:
            worker.record(0.0, 0, ok=False)
            self.errors_total += 1
            raise
        finally:
            worker.in_flight -= 1
        total_ms = (time.perf_counter() - start) * 1000.0
        worker.record(total_ms, tokens, ok=True)
        self._latencies_ms.append(total_ms)
        return InferenceResult(
            result.decision,
            result.completion,
            result.embeddings,
            result.prompt_tokens,
            queue_ms=0.1,
            total_ms=total_ms,
        )

    async def stream(self, call: InferenceCall) -> AsyncIterator[StreamEvent]:
        worker, decision = self._route(call)
        start = time.perf_counter()
        worker.in_flight += 1
        sent = 0
        try:
            yield StreamEvent(decision=decision)
            session = worker.session
            # word by word: the fake's chat streams the last message as its prompt
            prompt = str(call.payload[-1]["content"]) if call.kind is RequestKind.CHAT else str(call.payload)
            chunks = session.stream_generate(prompt, call.params)
            async for chunk in chunks:
                if call.cancelled.is_set():
                    return
                if self.stream_error_after is not None and sent >= self.stream_error_after:
                    worker.record(0.0, 0, ok=False)
                    self.errors_total += 1
                    yield StreamEvent(error=f"worker {worker.worker_id} failed after {sent} chunks")
                    return
                if self.chunk_interval_s:
                    await asyncio.sleep(self.chunk_interval_s)
                sent += 1 if chunk.text else 0
                yield StreamEvent(chunk=chunk)
            total_ms = (time.perf_counter() - start) * 1000.0
            worker.record(total_ms, sent, ok=True)
            self._latencies_ms.append(total_ms)
        finally:
            worker.in_flight -= 1

    def status(self) -> Mapping[str, Any]:
        """The documented status keys (docs/dashboard.md), plus ``ready``, ``models`` and ``devices``."""
        devices: dict[str, dict[str, Any]] = {}
        for w in self.workers.values():
            devices.setdefault(
                w.device,
                {
                    "id": w.device,
                    "type": "gpu" if w.device.startswith("cuda") else "cpu",
                    "total_memory_bytes": w.total_memory_bytes,
                    "free_memory_bytes": w.free_memory_bytes,
                },
            )
        ordered = sorted(self._latencies_ms)
        latency = {
            name: ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None
            for name, q in (("p50", 0.5), ("p99", 0.99))
        }
        return {
            "ready": self.ready,
            "models": [
                {"name": m.name, "task": m.task, "tiers": list(m.tiers)} for m in self._models.values()
            ],
            "workers": [w.to_dict(self._started_s) for w in self.workers.values()],
            "devices": list(devices.values()),
            "decisions": list(self.decisions),
            "counters": {"requests_total": self.requests_total, "errors_total": self.errors_total},
            "latency_ms": latency,
            "qos": [dict(c) for c in self.qos],
        }

    # -- AdminControl -------------------------------------------------------------------------------

    def _worker(self, worker_id: str) -> FakeWorker:
        worker = self.workers.get(worker_id)
        if worker is None:
            raise ConfigError(
                f"unknown worker '{worker_id}'; workers: {', '.join(self.workers)}", field="worker"
            )
        return worker

    async def drain(self, worker_id: str) -> None:
        self._worker(worker_id).draining = True

    async def undrain(self, worker_id: str) -> None:
        self._worker(worker_id).draining = False

    async def reload(self) -> Mapping[str, Any]:
        self.reloads += 1
        return {"added": [], "removed": [], "changed": [], "reloads": self.reloads}
