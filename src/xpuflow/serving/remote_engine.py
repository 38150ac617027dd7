"""A pure gateway: an ``Engine`` whose logical models each forward to one OpenAI-compatible server.

No local model, queue or router: each model name maps to one ``RemoteOpenAISession`` (pooled aiohttp
connections), and every request goes straight to it. It puts xpuflow's auth, metrics, limits and error
handling in front of existing servers (vLLM, TGI, llama.cpp, ...), and it is the gateway path that
``benchmarks/gateway_overhead.py`` measures::

    engine = RemoteEngine.from_urls({"chat": ("http://10.0.0.5:8000", "Qwen/Qwen2.5-7B-Instruct")})
    app = create_app(engine, GatewaySettings(), lifespan=engine.lifespan)

Errors are the session's: ``RemoteError`` (502, 429 or the upstream's 4xx) and ``SessionError``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from xpuflow.backends.base import ModelConfig, ModelTask
from xpuflow.backends.remote.openai import RemoteOpenAISession, RemoteSettings
from xpuflow.engine import InferenceCall, InferenceResult, ModelInfo, StreamEvent
from xpuflow.errors import ConfigError
from xpuflow.types import RequestKind, RoutingDecision

__all__ = ["RemoteEngine"]

_TIER = "remote"


class RemoteEngine:
    """``Engine`` over remote sessions, one per logical model. Use it from one event loop and close it
    (``aclose()`` or ``lifespan``) to release its connections."""

    def __init__(
        self, sessions: Mapping[str, RemoteOpenAISession], tasks: Mapping[str, str] | None = None
    ) -> None:
        if not sessions:
            raise ConfigError("a remote engine needs at least one model", field="models")
        self._sessions = dict(sessions)
        tasks = dict(tasks or {})
        created = int(time.time())
        self._models = {
            name: ModelInfo(name, tasks.get(name, "chat"), (_TIER,), created_s=created)
            for name in self._sessions
        }
        self._decisions = {}
        for name, session in self._sessions.items():
            host = urlsplit(session.settings.base_url).netloc
            self._decisions[name] = RoutingDecision(
                device=f"remote:{host}",
                reason=f"remote: the one upstream of '{name}' ({session.settings.base_url})",
                confidence=1.0,
                tier=_TIER,
                worker=f"{name}/{_TIER}/0",
                details={"rule": "remote"},
            )

    @classmethod
    def from_urls(
        cls, models: Mapping[str, tuple[str, str] | str], *, options: Mapping[str, Any] | None = None
    ) -> RemoteEngine:
        """Sessions for ``{"name": base_url}`` or ``{"name": (base_url, upstream_model)}``; ``options``
        are remote_openai options shared by all (timeout_s, max_connections, api_key, ...). A name
        containing "embed" serves embeddings; pass sessions and tasks to the constructor to choose."""
        sessions, tasks = {}, {}
        for name, target in models.items():
            base_url, upstream = (target, name) if isinstance(target, str) else target
            task = ModelTask.EMBEDDING if "embed" in name else ModelTask.CHAT
            config = ModelConfig(
                model_id=name, task=task, options={**(options or {}), "base_url": base_url, "model": upstream}
            )
            settings = RemoteSettings.from_config(config)
            sessions[name] = RemoteOpenAISession(name, [], settings, max_batch_size=config.max_batch_size)
            tasks[name] = "embedding" if task is ModelTask.EMBEDDING else "chat"
        return cls(sessions, tasks)

    def models(self) -> list[ModelInfo]:
        return list(self._models.values())

    def _session(self, call: InferenceCall) -> RemoteOpenAISession:
        session = self._sessions.get(call.model)
        if session is None:
            raise ConfigError(f"unknown model '{call.model}'", field="model")
        return session

    async def complete(self, call: InferenceCall) -> InferenceResult:
        session = self._session(call)
        start = time.perf_counter()
        decision = self._decisions[call.model]
        if call.kind is RequestKind.EMBEDDING:
            vectors = await session.embed(call.payload)
            return InferenceResult(decision, embeddings=vectors, total_ms=(time.perf_counter() - start) * 1e3)
        if call.kind is RequestKind.CHAT:
            completion = await session.chat(call.payload, call.params)
        else:
            completion = await session.generate(call.payload, call.params)
        total_ms = (time.perf_counter() - start) * 1e3
        return InferenceResult(
            decision, completion, prompt_tokens=completion.prompt_tokens, total_ms=total_ms
        )

    async def stream(self, call: InferenceCall) -> AsyncIterator[StreamEvent]:
        session = self._session(call)
        if call.kind is RequestKind.CHAT:
            chunks = session.stream_chat(call.payload, call.params)
        else:
            chunks = session.stream_generate(call.payload, call.params)
        # The first chunk comes before the decision so that a server that fails at once fails the
        # request (a clean HTTP error), not a stream that has already begun.
        iterator = chunks.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            yield StreamEvent(decision=self._decisions[call.model])
            return
        yield StreamEvent(decision=self._decisions[call.model])
        yield StreamEvent(chunk=first)
        async for chunk in iterator:
            yield StreamEvent(chunk=chunk)

    def status(self) -> Mapping[str, Any]:
        workers = []
        for name, session in self._sessions.items():
            metrics = session.metrics()
            decision = self._decisions[name]
            workers.append(
                {
                    "worker_id": decision.worker,
                    "model": name,
                    "tier": _TIER,
                    "device": decision.device,
                    "healthy": metrics.consecutive_failures < 3,
                    "draining": False,
                    "queue_depth": 0,
                    "in_flight": 0,
                    "ema_latency_ms": None if metrics.latency_ema_s is None else metrics.latency_ema_s * 1e3,
                    "completed": metrics.successes,
                    "failed": metrics.failures,
                    "last_error": metrics.last_error,
                }
            )
        return {"ready": True, "workers": workers, "devices": [], "decisions": []}

    async def aclose(self) -> None:
        for session in self._sessions.values():
            await session.close()

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """For ``create_app(..., lifespan=engine.lifespan)``: closes the sessions when the server stops."""
        try:
            yield
        finally:
            await self.aclose()
