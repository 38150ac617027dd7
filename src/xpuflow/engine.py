"""What the gateway needs from the engine behind it (the orchestrator implements it).

The HTTP layer parses and validates OpenAI requests into ``InferenceCall``s and turns results back into
OpenAI responses; everything about models, tiers, workers and devices stays behind this contract::

    result = await engine.complete(InferenceCall(model="chat", kind=RequestKind.CHAT, payload=messages))
    result.completion.text, result.decision.tier, result.decision.worker, result.decision.device
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from xpuflow.backends.base import Completion, GenerationParams, StreamChunk
from xpuflow.scheduling.request import CancelSignal, Priority, RequestKind
from xpuflow.types import RoutingDecision

__all__ = ["AdminControl", "Engine", "InferenceCall", "InferenceResult", "ModelInfo", "StreamEvent"]

_ids = itertools.count(1)


@dataclass(frozen=True)
class ModelInfo:
    """A logical model clients can name, e.g. "chat" with tiers ["tier_high", "tier_low"]."""

    name: str
    task: str  # "chat" (also serves completions) or "embedding"
    tiers: tuple[str, ...] = ()
    created_s: int = 0


@dataclass
class InferenceCall:
    """One validated client request, as the engine receives it."""

    model: str
    kind: RequestKind
    payload: Any  # messages (chat), a prompt (completion), or a list of texts (embedding)
    params: GenerationParams = field(default_factory=GenerationParams)
    priority: Priority = Priority.NORMAL
    qos_class: str | None = None
    tier_override: str | None = None
    api_key_name: str | None = None
    request_id: str = field(default_factory=lambda: f"chatcmpl-{next(_ids)}")
    cancelled: asyncio.Event = field(default_factory=CancelSignal)  # set when the client goes away
    timeout_s: float | None = None
    # requests with one key prefer one worker (its prefix/KV cache stays warm): the x-xpuflow-session
    # header, else the body's OpenAI ``user``
    session_key: str | None = None


@dataclass(frozen=True)
class InferenceResult:
    """A finished call: the output, where it ran and why, and its timings."""

    decision: RoutingDecision
    completion: Completion | None = None
    embeddings: list[list[float]] | None = None
    prompt_tokens: int = 0
    queue_ms: float = 0.0
    total_ms: float = 0.0
    outputs: Mapping[str, Any] | None = None  # a tensor call's named output arrays


@dataclass(frozen=True)
class StreamEvent:
    """One event of a streamed call. The first event carries the decision (headers are sent from it);
    then text chunks; the last chunk carries ``finish_reason``. ``error`` ends a stream that failed after
    its first token (before that, the engine retries or raises)."""

    decision: RoutingDecision | None = None
    chunk: StreamChunk | None = None
    error: str | None = None


@runtime_checkable
class Engine(Protocol):
    """The serving engine: logical models in, routed results out."""

    def models(self) -> list[ModelInfo]: ...

    async def complete(self, call: InferenceCall) -> InferenceResult:
        """Run a non-streaming call. Raises ConfigError (unknown model, bad input: 4xx),
        AdmissionRejected (429), RoutingError (503) or the backend's error after retries."""
        ...

    def stream(self, call: InferenceCall) -> AsyncIterator[StreamEvent]:
        """Run a streaming call; the first event carries the decision."""
        ...

    def status(self) -> Mapping[str, Any]:
        """Live state for the dashboard and admin API: workers (per device: queue depth, in flight,
        latency, tokens/s, VRAM, health), recent route decisions, request counters."""
        ...


@runtime_checkable
class AdminControl(Protocol):
    """Operations behind the admin API (a separate admin key)."""

    async def drain(self, worker_id: str) -> None:
        """Stop sending new requests to a worker; queued and in-flight ones finish."""
        ...

    async def undrain(self, worker_id: str) -> None: ...

    async def reload(self) -> Mapping[str, Any]:
        """Re-read the config and apply it; returns what changed."""
        ...
