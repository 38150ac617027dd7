"""A minimal stand-in for ``scheduling.worker.Worker`` over a ``FakeSession``, for dispatcher tests.

It has the same surface the dispatcher uses (``worker_id``, ``device``, ``health``, ``submit``,
``stream``, ``snapshot``) and the same health rule as the real worker: it records the success or
failure of every request in its own ``HealthTracker`` (not request errors, nor withdrawals). No queue
and no batching: each request runs straight on the session. Switches make it misbehave: ``hang``
(answers only when the request's ``cancelled`` event is set, with ``RequestCancelled``, as the real
worker does), ``reject`` (queue full), ``stream_fail_after`` (breaks a stream after that many chunks).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from xpuflow.backends.base import Completion, StreamChunk
from xpuflow.clock import Clock
from xpuflow.errors import AdmissionRejected, ConfigError, RequestCancelled, SessionError
from xpuflow.scheduling.health import HealthTracker
from xpuflow.scheduling.request import RequestKind, WorkRequest
from xpuflow.testing import FakeSession
from xpuflow.types import WorkerSnapshot


class FakeWorker:
    def __init__(
        self,
        worker_id: str,
        session: FakeSession | None = None,
        *,
        device: str = "cpu",
        deployment: str = "chat",
        clock: Clock | None = None,
        failure_threshold: int = 3,
        cooldown_s: float = 10.0,
        ema_latency_ms: float | None = None,
        queue_depth: int = 0,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        free_memory_bytes: int | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.device = device
        self.deployment = deployment
        self.session = session or FakeSession(worker_id)
        self.health = HealthTracker(failure_threshold, cooldown_s, clock=clock)
        self.ema_latency_ms = ema_latency_ms
        self.queue_depth = queue_depth
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.free_memory_bytes = free_memory_bytes
        self.in_flight = 0
        self.calls = 0
        self.requests: list[WorkRequest] = []
        self.hang = False
        self.reject = False
        self.stream_fail_after: int | None = None
        self.error: Exception | None = None  # raised by every call while set

    async def _run(self, request: WorkRequest) -> Any:
        if self.hang:
            # Like the real worker: a request whose client went away is answered with an error.
            await request.cancelled.wait()
            raise RequestCancelled(f"{request.request_id} withdrawn: its client went away")
        if self.error is not None:
            await asyncio.sleep(0)
            raise self.error
        if request.kind is RequestKind.EMBEDDING:
            return await self.session.embed(request.payload)
        if request.kind is RequestKind.CHAT:
            return await self.session.chat(request.payload, request.params)
        return await self.session.generate(request.payload, request.params)

    async def submit(self, request: WorkRequest) -> Completion | list[list[float]]:
        self.calls += 1
        self.requests.append(request)
        if self.reject:
            raise AdmissionRejected(f"{self.worker_id}: queue full", retry_after_s=0.5)
        self.in_flight += 1
        try:
            result = await self._run(request)
        except (ConfigError, RequestCancelled):
            raise  # not the worker's fault: not a health failure (as in Worker)
        except Exception as exc:
            self.health.record_failure(str(exc))
            raise
        finally:
            self.in_flight -= 1
        self.health.record_success()
        return result  # type: ignore[no-any-return]

    async def stream(self, request: WorkRequest) -> AsyncIterator[StreamChunk]:
        self.calls += 1
        self.requests.append(request)
        self.in_flight += 1
        try:
            if self.hang:
                await request.cancelled.wait()
                raise RequestCancelled(f"{request.request_id} withdrawn: its client went away")
            if self.error is not None:
                raise self.error
            sent = 0
            async for chunk in self.session.stream_generate(str(request.payload), request.params):
                if self.stream_fail_after is not None and sent >= self.stream_fail_after:
                    raise SessionError(f"{self.worker_id} broke mid-stream")
                sent += 1
                yield chunk
        except Exception as exc:
            self.health.record_failure(str(exc))
            raise
        finally:
            self.in_flight -= 1
        self.health.record_success()

    def snapshot(self) -> WorkerSnapshot:
        return WorkerSnapshot(
            worker_id=self.worker_id,
            deployment=self.deployment,
            device=self.device,
            healthy=self.health.healthy,
            queue_depth=self.queue_depth,
            in_flight=self.in_flight,
            max_batch_size=self.max_batch_size,
            ema_latency_ms=self.ema_latency_ms,
            free_memory_bytes=self.free_memory_bytes,
            max_seq_len=self.max_seq_len,
            ema_service_ms=getattr(self, "ema_service_ms", None),
        )
