"""A fake backend shipped with the contract, for tests and the simulator.

``FakeSession`` answers deterministically (it echoes the prompt reversed, word by word) after a
configurable service time, can be told to fail, and batches natively so schedulers can be tested
without a model::

    session = FakeSession("fake", service_time_s=0.01, fail_next=1)

With a device model (``options.device_model: path`` in a config, the file ``xpuflow simulate`` reads) a
batch sleeps as long as the model says for its prompts (one token per word) and ``max_tokens``, so the
real gateway can be driven with the simulator's service times. A device model with ``continuous: true``
makes the session continuous (``BatchMode.CONTINUOUS``, up to the model's ``max_batch_size`` in flight):
each call sleeps ``request_timing`` for the calls running when it starts, as the simulator counts it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from xpuflow.artifacts.profile import BuildArtifact, BuildProfile
from xpuflow.backends.base import (
    Availability,
    BatchMode,
    ChatMessage,
    Completion,
    GenerationParams,
    ModelConfig,
    Session,
    StreamChunk,
)
from xpuflow.errors import SessionError
from xpuflow.types import Capability, OptimizedFor, Resource

__all__ = ["FakePlugin", "FakeSession"]


def _fake_reply(prompt: str, max_tokens: int) -> tuple[str, str]:
    words = prompt.split()[::-1] or ["ok"]
    finish = "length" if len(words) > max_tokens else "stop"
    return " ".join(words[:max_tokens]), finish


_LEAKED: list[bytearray] = []  # what sessions with ``leak_on_close`` kept after closing


class FakeSession(Session):
    """Deterministic answers after ``service_time_s`` (+ ``per_item_s`` per batch item)."""

    batch_mode = BatchMode.NATIVE

    def __init__(
        self,
        model_id: str = "fake",
        resources: Sequence[Resource] = (),
        *,
        service_time_s: float = 0.0,
        per_item_s: float = 0.0,
        max_batch_size: int = 8,
        fail_next: int = 0,
        embedding_dim: int = 8,
        device_model: Any = None,
        memory_mb: float = 0.0,
        leak_on_close: bool = False,
    ) -> None:
        super().__init__(model_id, resources)
        # host memory it holds while open, like weights (touched, so it counts in the RSS); a session
        # that leaks keeps it after close, as a backend that does not give memory back would
        self._weights: bytearray | None = (
            bytearray(b"\x01" * int(memory_mb * (1 << 20))) if memory_mb else None
        )
        self.leak_on_close = leak_on_close
        self.service_time_s = service_time_s
        self.per_item_s = per_item_s
        self.max_batch_size = max_batch_size
        self.fail_next = fail_next
        self.embedding_dim = embedding_dim
        self.device_model = device_model  # xpuflow.simulate.DeviceModel, or None
        if device_model is not None and device_model.continuous:
            self.batch_mode = BatchMode.CONTINUOUS
            self.max_in_flight = max(1, min(max_batch_size, device_model.max_batch_size))
        self.active = 0  # calls running now
        self.calls = 0
        self.batch_sizes: list[int] = []

    async def _serve(self, n: int, work: Sequence[tuple[int, int]] = ()) -> None:
        self.calls += 1
        self.batch_sizes.append(n)
        delay = self.service_time_s + self.per_item_s * n
        model = self.device_model
        if model is not None and work:
            if self.batch_mode is BatchMode.CONTINUOUS and len(work) == 1:
                delay += model.request_timing(work[0][0], work[0][1], self.active + 1).total_s
            else:
                delay += model.batch_timing(list(work)).total_s
        self.active += 1
        try:
            await asyncio.sleep(delay)
        finally:
            self.active -= 1
        if self.fail_next > 0:
            self.fail_next -= 1
            raise SessionError(f"fake session '{self.model_id}' failed on purpose")

    async def generate(self, prompt: str, params: GenerationParams) -> Completion:
        return (await self.generate_batch([prompt], params))[0]

    async def generate_batch(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        await self._serve(len(prompts), [(len(p.split()), params.max_tokens) for p in prompts])
        out = []
        for prompt in prompts:
            text, finish = _fake_reply(prompt, params.max_tokens)
            out.append(Completion(text, len(prompt.split()), len(text.split()), finish, self.model_id))
        return out

    async def chat(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion:
        return (await self.chat_batch([messages], params))[0]

    async def chat_batch(
        self, conversations: Sequence[Sequence[ChatMessage]], params: GenerationParams
    ) -> list[Completion]:
        prompts = [str(c[-1].get("content", "")) if c else "" for c in conversations]
        return await self.generate_batch(prompts, params)

    async def stream_generate(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        completion = await self.generate(prompt, params)
        for i, word in enumerate(completion.text.split()):
            yield StreamChunk(word if i == 0 else " " + word)
        yield StreamChunk(
            "",
            completion.finish_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
        )

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        await self._serve(len(texts))
        vectors = []
        for text in texts:
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
            vectors.append([b / 255.0 for b in digest[: self.embedding_dim]])
        return vectors

    async def close(self) -> None:
        if self._weights is not None and self.leak_on_close:
            _LEAKED.append(self._weights)
        self._weights = None
        await super().close()

    async def run(self, inputs: Any) -> dict[str, Any]:
        """Tensor models: every input doubled, as output ``<name>_x2`` (a lone array is ``input``)."""
        import numpy as np

        named = inputs if isinstance(inputs, Mapping) else {"input": inputs}
        first = next(iter(named.values()), None)
        await self._serve(int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1)
        return {f"{name}_x2": np.asarray(value) * 2 for name, value in named.items()}


class FakePlugin:
    """A backend plugin whose sessions are ``FakeSession``s; options pass through to the session."""

    name = "fake"

    def availability(self) -> Availability:
        return Availability(True, "always available (test double)", "0")

    def probe(self, resources: Sequence[Resource]) -> list[Resource]:
        return list(resources)

    def required_build_profiles(
        self, resources: Sequence[Resource], config: ModelConfig
    ) -> list[BuildProfile]:
        return []

    def get_capability(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Capability:
        return Capability(
            max_batch_size=config.max_batch_size,
            max_seq_len=config.max_seq_len,
            supports_streaming=True,
            supports_embeddings=True,
            supports_chat=True,
            optimized_for=OptimizedFor.THROUGHPUT,
        )

    async def create_session(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> FakeSession:
        options: dict[str, Any] = dict(config.options)
        device_model = None
        if options.get("device_model"):
            from xpuflow.simulate.device_model import load_device_model

            device_model = load_device_model(str(options["device_model"]))
        return FakeSession(
            config.model_id,
            resources,
            service_time_s=float(options.get("service_time_s", 0.0)),
            per_item_s=float(options.get("per_item_s", 0.0)),
            max_batch_size=config.max_batch_size,
            fail_next=int(options.get("fail_next", 0)),
            device_model=device_model,
            memory_mb=float(options.get("memory_mb", 0.0)),
            leak_on_close=bool(options.get("leak_on_close", False)),
        )
