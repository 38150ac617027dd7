"""The Router: one per logical model, the one owner of a request from admission to its last token.

    router = Router(config, tiers, tier_router=AdaptiveRouter(...), dispatcher=Dispatcher(...),
                    admit=qos_gate_admit, log=request_log)
    result = await router.complete(call)          # or: async for event in router.stream(call)

Every call, plain or streamed, goes through the same steps in the same order:

1. **check**: the call fits the model (a tensor call to a tensor model, embeddings to an embedding
   model; a prompt longer than every worker's context is refused, 422);
2. **admission**: the call's QoS context holds its memory until the answer (or the stream) ends, or
   refuses it (429);
3. **tier choice**: the rule chain (``AdaptiveRouter``; a one-tier model needs none);
4. **worker choice, retries, failover**: the ``Dispatcher`` (scorer over the tier's workers, with the
   request's needs and session affinity), falling to the next tiers in order;
5. **feedback**: the latency is observed into the tier router's SLA state, the decision goes to the
   request log (the dashboard's decisions and counters), and a call that had to load its model is
   marked ``cold_start``.

The orchestrator only builds routers (config -> placement -> builds -> workers -> routers).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from xpuflow.backends.base import Completion
from xpuflow.clock import Clock, SystemClock
from xpuflow.config import LogicalModelConfig
from xpuflow.engine import InferenceCall, InferenceResult, ModelInfo, StreamEvent
from xpuflow.errors import AdmissionRejected, ConfigError, StreamInterrupted, XpuflowError
from xpuflow.policy.worker_scorer import WorkerNeeds, session_affinity
from xpuflow.routing.adaptive import AdaptiveRouter
from xpuflow.routing.dispatch import Dispatcher, DispatchTarget
from xpuflow.scheduling.qos.gate import NO_ADMISSION
from xpuflow.scheduling.request import RequestKind, WorkRequest
from xpuflow.types import RoutingDecision, frozen_from_fields

__all__ = ["NO_ADMISSION", "RequestLog", "Router"]

_GENERATIVE = (RequestKind.CHAT, RequestKind.COMPLETION)
Tiers = list[tuple[str, Sequence[DispatchTarget]]]


class RequestLog:
    """What the routers of one server have done: the last decisions, recent latencies and counters,
    for ``status()`` (the dashboard and the admin API)."""

    def __init__(self, *, decisions: int = 50, latencies: int = 512) -> None:
        # (ts, model, decision, latency_ms, ok): the dicts are made when status() reads them
        self._decisions: collections.deque[tuple[float, str, RoutingDecision, float | None, bool]] = (
            collections.deque(maxlen=decisions)
        )
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=latencies)
        self.counters = {"requests_total": 0, "errors_total": 0, "completion_tokens_total": 0}

    def record(self, model: str, decision: RoutingDecision, latency_ms: float | None, ok: bool) -> None:
        self.counters["requests_total"] += 1
        if not ok:
            self.counters["errors_total"] += 1
        if latency_ms is not None:
            self.latencies_ms.append(latency_ms)
        self._decisions.append((time.time(), model, decision, latency_ms, ok))

    @property
    def decisions(self) -> list[dict[str, Any]]:
        """The last decisions, oldest first: when, which model, tier, worker, device, why, latency, ok."""
        return [
            {
                "ts": ts,
                "model": model,
                "tier": decision.tier,
                "worker": decision.worker,
                "device": decision.device,
                "reason": decision.reason,
                "latency_ms": latency_ms,
                "ok": ok,
            }
            for ts, model, decision, latency_ms, ok in self._decisions
        ]

    def latency_summary(self) -> dict[str, float | None]:
        latencies = sorted(self.latencies_ms)
        if not latencies:
            return {"p50": None, "p99": None}
        last = len(latencies) - 1
        return {
            "p50": latencies[min(last, len(latencies) // 2)],
            "p99": latencies[min(last, int(0.99 * len(latencies)))],
        }


def _no_admission(call: InferenceCall) -> AbstractAsyncContextManager[Any]:
    return NO_ADMISSION


class Router:
    """One logical model's requests; see the module docstring."""

    def __init__(
        self,
        config: LogicalModelConfig,
        task: str,
        tiers: Tiers,
        *,
        dispatcher: Dispatcher,
        tier_router: AdaptiveRouter | None = None,
        admit: Callable[[InferenceCall], AbstractAsyncContextManager[Any]] = _no_admission,
        log: RequestLog | None = None,
        clock: Clock | None = None,
        created_s: int = 0,
    ) -> None:
        self.config = config
        self.name = config.name
        self.task = task  # "chat" (also completions), "embedding" or "tensor"
        self.tiers = tiers
        self.dispatcher = dispatcher
        self.tier_router = tier_router  # None for one tier: nothing to choose, no scoring cost
        self._admit = admit
        self.log = log or RequestLog()
        self._clock = clock or SystemClock()
        self.created_s = created_s
        self._single_tier: RoutingDecision | None = None

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.task, tuple(t for t, _ in self.tiers), self.created_s)

    def shutdown(self) -> None:
        if self.tier_router is not None:
            self.tier_router.shutdown()

    # -- the steps ------------------------------------------------------------------------------------

    def check(self, call: InferenceCall) -> None:
        """The call fits this model's task; ConfigError (a 4xx naming the right endpoint) otherwise."""
        if (self.task == "tensor") != (call.kind is RequestKind.TENSOR):
            raise ConfigError(
                f"model '{call.model}' is a tensor model; send it tensors over the Open Inference Protocol "
                f"(POST /v2/models/{call.model}/infer or gRPC ModelInfer)"
                if self.task == "tensor"
                else f"model '{call.model}' serves {self.task}, not tensors; use its OpenAI endpoint",
                field="model",
            )
        if self.task == "embedding" and call.kind in _GENERATIVE:
            raise ConfigError(
                f"model '{call.model}' serves embeddings; use /v1/embeddings or a chat model", field="model"
            )
        if self.task != "embedding" and call.kind is RequestKind.EMBEDDING:
            raise ConfigError(
                f"model '{call.model}' generates text; use an embedding model for /v1/embeddings",
                field="model",
            )

    def choose_tier(self, call: InferenceCall) -> tuple[RoutingDecision, Tiers]:
        """The tier decision and the tiers in the order to try them (the chosen one first)."""
        if self.tier_router is None:
            only = self.tiers[0][0]
            if call.tier_override not in (None, only):
                raise ConfigError(
                    f"model '{call.model}' has no tier '{call.tier_override}'; tiers: {only}",
                    field="x-xpuflow-tier",
                )
            decision = self._single_tier
            if decision is None or decision.tier != only:  # made once (it is immutable), not per call
                decision = self._single_tier = RoutingDecision(
                    None, "the model has one tier", 1.0, tier=only, details={"rule": "single-tier"}
                )
            return decision, self.tiers
        decision = self.tier_router.route_decision(call.payload, override=call.tier_override)
        chosen = decision.tier or self.tiers[0][0]
        ordered = [t for t in self.tiers if t[0] == chosen] + [t for t in self.tiers if t[0] != chosen]
        return decision, ordered

    def needs(self, call: InferenceCall) -> WorkerNeeds | None:
        """What a generation needs of a worker: at least its prompt's tokens in the worker's context (a
        lower bound, 6 characters a token, so only a prompt that cannot fit is kept from a worker). A
        prompt too long for every worker is the client's error (422), not an outage."""
        if call.kind not in _GENERATIVE:
            return None
        payload = call.payload
        if isinstance(payload, str):
            chars = len(payload)
        else:
            chars = 0
            for message in payload:  # a loop, and dicts known without the Mapping ABC's check
                if type(message) is dict or isinstance(message, Mapping):
                    content = message.get("content")
                    chars += len(content) if type(content) is str else len(str(content or ""))
        tokens = chars // 6
        if tokens < 256:
            return None  # fits any context worth serving: skip the check
        contexts = [w.snapshot().max_seq_len for _, workers in self.tiers for w in workers]
        known = [c for c in contexts if isinstance(c, int)]
        if known and len(known) == len(contexts) and tokens > max(known):
            raise ConfigError(
                f"the prompt is at least {tokens} tokens, more than the context of every worker of model "
                f"'{call.model}' (at most {max(known)} tokens); shorten it",
                field="prompt" if call.kind is RequestKind.COMPLETION else "messages",
            )
        return WorkerNeeds(tokens=tokens)

    def _request(self, call: InferenceCall, stream: bool) -> WorkRequest:
        deadline = self._clock.monotonic() + call.timeout_s if call.timeout_s else None
        return WorkRequest(
            call.kind,
            call.payload,
            call.params,
            priority=call.priority,
            stream=stream,
            deadline_s=deadline,
            request_id=call.request_id,
            cancelled=call.cancelled,
        )

    def _observe(self, decision: RoutingDecision, latency_ms: float) -> None:
        if self.tier_router is not None and decision.tier is not None:
            self.tier_router.observe(decision.tier, latency_ms)

    # -- calls ----------------------------------------------------------------------------------------

    async def complete(self, call: InferenceCall) -> InferenceResult:
        self.check(call)
        needs = self.needs(call)
        request = self._request(call, stream=False)
        async with self._admit(call):
            tier_decision, tiers = self.choose_tier(call)
            started = self._clock.monotonic()
            try:
                done = await self.dispatcher.dispatch(
                    tiers, request, needs=needs, affinity=_affinity(call), tier_decision=tier_decision
                )
            except AdmissionRejected:
                raise
            except XpuflowError:
                self.log.record(call.model, tier_decision, None, ok=False)
                raise
        latency_ms = (self._clock.monotonic() - started) * 1000.0
        decision = _cold(done.decision, request)
        self._observe(decision, latency_ms)
        self.log.record(call.model, decision, latency_ms, ok=True)
        queue_ms = float(request.metadata.get("queue_ms", 0.0))  # the wait in the last worker's queue
        if isinstance(done.result, Completion):
            self.log.counters["completion_tokens_total"] += done.result.completion_tokens
            # InferenceResult(decision, completion=..., ...) without the frozen dataclass's __init__
            return frozen_from_fields(
                InferenceResult,
                {
                    "decision": decision,
                    "completion": done.result,
                    "embeddings": None,
                    "prompt_tokens": done.result.prompt_tokens,
                    "queue_ms": queue_ms,
                    "total_ms": latency_ms,
                    "outputs": None,
                },
            )
        if call.kind is RequestKind.TENSOR:
            return InferenceResult(decision, outputs=done.result, queue_ms=queue_ms, total_ms=latency_ms)  # type: ignore[arg-type]
        return InferenceResult(decision, embeddings=list(done.result), queue_ms=queue_ms, total_ms=latency_ms)

    async def stream(self, call: InferenceCall) -> AsyncIterator[StreamEvent]:
        """Admission happens before the first event (a refusal is an ordinary 429); the context's
        memory is held until the stream ends, is closed early, or fails."""
        self.check(call)
        needs = self.needs(call)
        request = self._request(call, stream=True)
        async with self._admit(call):
            tier_decision, tiers = self.choose_tier(call)
            started = self._clock.monotonic()
            try:
                opened = await self.dispatcher.open_stream(
                    tiers, request, needs=needs, affinity=_affinity(call), tier_decision=tier_decision
                )
            except XpuflowError:
                self.log.record(call.model, tier_decision, None, ok=False)
                raise
            yield StreamEvent(decision=_cold(opened.decision, request))
            ok = True
            try:
                async with opened:
                    async for chunk in opened:
                        yield StreamEvent(chunk=chunk)
            except StreamInterrupted as exc:
                ok = False
                yield StreamEvent(error=str(exc))
            finally:
                latency_ms = (self._clock.monotonic() - started) * 1000.0
                if ok:
                    self._observe(opened.decision, latency_ms)
                self.log.record(call.model, opened.decision, latency_ms, ok=ok)


def _affinity(call: InferenceCall) -> Any:
    """Sticky worker choice for calls that name a session (``x-xpuflow-session`` or OpenAI's ``user``):
    rendezvous hashing keeps a session on one worker while it is a good choice (its prefix cache stays
    warm), and moves only that worker's sessions when it leaves."""
    return session_affinity(call.session_key) if call.session_key else None


def _cold(decision: RoutingDecision, request: WorkRequest) -> RoutingDecision:
    """``decision``, marked ``details["cold_start"]`` when serving ``request`` had to load its model
    (the gateway answers ``x-xpuflow-cold-start: true``)."""
    if not request.metadata.get("cold_start"):
        return decision
    return dataclasses.replace(decision, details={**decision.details, "cold_start": True})
