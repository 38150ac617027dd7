"""Helpers for the dashboard tests: an engine whose status follows the calls it serves, a minimal app
around the dashboard routes, an in-process ASGI GET, and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from xpuflow.backends.base import Completion, StreamChunk
from xpuflow.engine import InferenceCall, InferenceResult, ModelInfo, StreamEvent
from xpuflow.scheduling.request import RequestKind
from xpuflow.serving.dashboard import dashboard_routes
from xpuflow.types import RoutingDecision

GIB = 1 << 30


WORKERS: tuple[dict[str, Any], ...] = (
    {"worker_id": "chat-gpu-0", "deployment": "chat-high", "model": "chat", "tier": "tier_high",
     "device": "cuda:0", "free_memory_bytes": 18 * GIB, "total_memory_bytes": 24 * GIB},
    {"worker_id": "chat-gpu-1", "deployment": "chat-high", "model": "chat", "tier": "tier_high",
     "device": "cuda:0", "free_memory_bytes": 18 * GIB, "total_memory_bytes": 24 * GIB},
    {"worker_id": "chat-cpu-0", "deployment": "chat-low", "model": "chat", "tier": "tier_low",
     "device": "cpu", "free_memory_bytes": 20 * GIB, "total_memory_bytes": 32 * GIB},
)  # fmt: skip


class StatusEngine:
    """An Engine over made-up workers whose ``status()`` follows what it served: counters, per-worker
    load, EMA latency, tokens/s, batch sizes and the latest route decisions (the documented keys)."""

    def __init__(self, latency_s: float = 0.02, workers: Sequence[Mapping[str, Any]] = WORKERS) -> None:
        self.latency_s = latency_s
        self._workers = {w["worker_id"]: {**w, "queue_depth": 0, "in_flight": 0} for w in workers}
        self._ema_ms: dict[str, float | None] = dict.fromkeys(self._workers)
        self._tokens: dict[str, list[tuple[float, int]]] = {w: [] for w in self._workers}
        self._batches: dict[str, dict[str, int]] = {w: {} for w in self._workers}
        self._decisions: list[dict[str, Any]] = []
        self._latencies_ms: list[float] = []
        self.requests_total = 0
        self.errors_total = 0
        self._next = 0

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("chat", "chat", ("tier_high", "tier_low"))]

    def _route(self, call: InferenceCall) -> RoutingDecision:
        worker = list(self._workers.values())[self._next % len(self._workers)]
        self._next += 1
        reason = f"complexity 0.{self._next % 10} routes to {worker['tier']}; least loaded worker"
        return RoutingDecision(
            device=worker["device"], reason=reason, confidence=0.9, tier=worker["tier"],
            worker=worker["worker_id"],
        )  # fmt: skip

    async def complete(self, call: InferenceCall) -> InferenceResult:
        decision = self._route(call)
        worker_id = decision.worker or ""
        self._workers[worker_id]["in_flight"] += 1
        started = time.perf_counter()
        try:
            await asyncio.sleep(self.latency_s)
        finally:
            self._workers[worker_id]["in_flight"] -= 1
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self._record(call, decision, elapsed_ms, tokens=8)
        return InferenceResult(decision, Completion("ok " * 8, 4, 8), total_ms=elapsed_ms)

    async def stream(self, call: InferenceCall) -> AsyncIterator[StreamEvent]:
        result = await self.complete(call)
        yield StreamEvent(decision=result.decision)
        yield StreamEvent(chunk=StreamChunk("ok", finish_reason="stop"))

    def fail(self) -> None:
        self.requests_total += 1
        self.errors_total += 1

    def _record(self, call: InferenceCall, decision: RoutingDecision, ms: float, tokens: int) -> None:
        worker_id = decision.worker or ""
        previous = self._ema_ms[worker_id]
        self._ema_ms[worker_id] = ms if previous is None else 0.8 * previous + 0.2 * ms
        self._tokens[worker_id].append((time.monotonic(), tokens))
        batches = self._batches[worker_id]
        batches["1"] = batches.get("1", 0) + 1
        self._latencies_ms.append(ms)
        self.requests_total += 1
        self._decisions.append(
            {"ts": time.time(), "model": call.model, "tier": decision.tier, "worker": worker_id,
             "device": decision.device, "reason": decision.reason, "request_id": call.request_id}
        )  # fmt: skip
        del self._decisions[:-50]

    def status(self) -> Mapping[str, Any]:
        now = time.monotonic()
        workers = []
        for worker_id, worker in self._workers.items():
            recent = [n for t, n in self._tokens[worker_id] if now - t <= 10.0]
            workers.append(
                {**worker, "healthy": True, "draining": False, "ema_latency_ms": self._ema_ms[worker_id],
                 "tokens_per_s": sum(recent) / 10.0, "batch_sizes": dict(self._batches[worker_id])}
            )  # fmt: skip
        ordered = sorted(self._latencies_ms[-500:])
        latency = (
            {
                "p50": ordered[len(ordered) // 2],
                "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            }
            if ordered
            else {"p50": None, "p99": None}
        )
        return {
            "workers": workers,
            "decisions": list(self._decisions[-20:]),
            "counters": {"requests_total": self.requests_total, "errors_total": self.errors_total},
            "latency_ms": latency,
        }


def dashboard_app(engine: StatusEngine, interval_s: float = 0.2) -> Starlette:
    """The dashboard routes plus one endpoint that sends a call through the engine."""

    async def chat(request: Request) -> Response:
        body = await request.json()
        call = InferenceCall(model=body.get("model", "chat"), kind=RequestKind.CHAT, payload=[])
        result = await engine.complete(call)
        return JSONResponse({"worker": result.decision.worker})

    return Starlette(
        routes=[*dashboard_routes(engine, interval_s=interval_s), Route("/chat", chat, methods=["POST"])]
    )


async def asgi_get(
    app: Any, path: str, query: str = "", *, disconnect_after_bytes: int | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` in-process. The client goes away once ``disconnect_after_bytes`` were received
    (for endless streams); otherwise it waits for the response to finish."""
    status = 0
    headers: dict[str, str] = {}
    body = bytearray()
    request_sent = False
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.update({k.decode(): v.decode() for k, v in message["headers"]})
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))
            finished = not message.get("more_body", False)
            if finished or (disconnect_after_bytes is not None and len(body) >= disconnect_after_bytes):
                gone.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": query.encode(), "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return status, headers, bytes(body)


def parse_sse(body: bytes) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body; events without data (the retry hint) are left out."""
    events = []
    for block in body.decode().split("\n\n"):
        name, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].lstrip())
        if data:
            events.append((name, "\n".join(data)))
    return events
