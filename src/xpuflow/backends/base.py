"""The backend contracts: a ``BackendPlugin`` per software stack, and the ``Session`` it creates.

A plugin says which resources it can use, what must be built for a model, what it can do there, and
opens sessions. A session is the running model::

    plugin = get_backend("llamacpp")
    config = ModelConfig(model_id="smollm2", path="/models/smollm2.gguf", task="chat")
    session = await plugin.create_session([cpu], config, artifacts={})
    async with session:
        reply = await session.chat([{"role": "user", "content": "Hi"}], GenerationParams(max_tokens=16))
        print(reply.text)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, overload, runtime_checkable

from xpuflow.artifacts.profile import BuildArtifact, BuildProfile
from xpuflow.errors import BackendError, ConfigError
from xpuflow.types import Capability, RequestKind, Resource

__all__ = [
    "Availability",
    "BackendPlugin",
    "BatchMode",
    "ChatMessage",
    "Completion",
    "GenerationParams",
    "ModelConfig",
    "ModelTask",
    "Session",
    "StreamChunk",
]

ChatMessage = Mapping[str, Any]
"""An OpenAI-style chat message: {"role": "system"|"user"|"assistant", "content": "..."}."""


# What a model serves is what a request asks: one vocabulary (``types.RequestKind``). TENSOR: plain
# numeric models (e.g. an MLP compiled for an NPU), named arrays in and out.
ModelTask = RequestKind


@dataclass(frozen=True)
class ModelConfig:
    """What a plugin needs to know about one model. Plain data; the YAML config maps onto it.

    ``path`` is a local file or folder (GGUF file, HF folder, ONNX file, engine source); remote
    backends use ``options["base_url"]`` and ``options["model"]`` instead. ``options`` holds
    backend-specific settings, each documented by its backend (n_ctx, execution_providers, ...).
    """

    model_id: str
    path: Path | None = None
    task: ModelTask = ModelTask.CHAT
    precision: str = "fp32"
    max_batch_size: int = 8
    max_seq_len: int = 2048
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ConfigError("model_id must be a non-empty name such as 'chat-small'", field="model_id")
        if self.max_batch_size < 1:
            raise ConfigError(
                f"max_batch_size must be >= 1, got {self.max_batch_size}", field="max_batch_size"
            )
        object.__setattr__(self, "task", ModelTask(self.task))
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)

    @overload
    def int_option(self, name: str, default: int) -> int: ...
    @overload
    def int_option(self, name: str, default: None = None) -> int | None: ...
    def int_option(self, name: str, default: int | None = None) -> int | None:
        """``options[name]`` as a positive integer (``default`` when absent); ConfigError otherwise."""
        value = self.options.get(name, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(
                f"options.{name} must be a positive integer, got {value!r}", field=f"options.{name}"
            )
        return value

    def bool_option(self, name: str, default: bool) -> bool:
        """``options[name]`` as true or false (``default`` when absent); ConfigError otherwise."""
        value = self.options.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"options.{name} must be true or false, got {value!r}", field=f"options.{name}")
        return value


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings. The defaults are greedy decoding (temperature 0) so results are repeatable."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}", field="max_tokens")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}", field="temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True)
class Completion:
    """A finished generation. ``finish_reason`` is "stop" or "length" as in the OpenAI API."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    model: str = ""


@dataclass(frozen=True)
class StreamChunk:
    """One piece of a streamed generation; the last chunk carries ``finish_reason``.

    A chunk may also carry the call's token counts (``prompt_tokens``, ``completion_tokens``): sessions
    that know them put them on their last chunk, or on a text-less chunk after it, as OpenAI's
    ``stream_options.include_usage`` does.
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class BatchMode(str, Enum):
    """How a session runs a batch: one forward pass for all (native), one after another (sequential),
    or by itself at every decoding step (continuous: concurrent calls join one running batch, so a
    worker sends each request at once instead of forming batches)."""

    NONE = "none"
    SEQUENTIAL = "sequential"
    NATIVE = "native"
    CONTINUOUS = "continuous"


@dataclass(frozen=True)
class Availability:
    """Whether a plugin's software stack is usable here, and if not, why and how to fix it."""

    available: bool
    reason: str
    version: str | None = None


class Session:
    """A model running on its resources. Subclasses override what they support.

    Unsupported operations raise ``BackendError`` with a reason. The batch forms default to running
    the single forms one after another; sessions that batch natively override them and set
    ``batch_mode = BatchMode.NATIVE``. Sessions are async context managers.
    """

    batch_mode: BatchMode = BatchMode.SEQUENTIAL
    max_batch_size: int = 1

    def __init__(self, model_id: str, resources: Sequence[Resource] = ()) -> None:
        self.model_id = model_id
        self.resources = tuple(resources)
        self.closed = False

    def _unsupported(self, what: str) -> BackendError:
        return BackendError(f"{type(self).__name__} for model '{self.model_id}' does not support {what}")

    async def generate(self, prompt: str, params: GenerationParams) -> Completion:
        raise self._unsupported("text completion")

    def stream_generate(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        return _single_chunk(self.generate(prompt, params))

    async def chat(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion:
        raise self._unsupported("chat")

    def stream_chat(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[StreamChunk]:
        return _single_chunk(self.chat(messages, params))

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise self._unsupported("embeddings")

    async def generate_batch(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        return [await self.generate(p, params) for p in prompts]

    async def chat_batch(
        self, conversations: Sequence[Sequence[ChatMessage]], params: GenerationParams
    ) -> list[Completion]:
        return [await self.chat(c, params) for c in conversations]

    async def embed_batch(self, batches: Sequence[Sequence[str]]) -> list[list[list[float]]]:
        """Every request's texts in one ``embed`` call (a padded batch where the session batches),
        split back per request."""
        vectors = await self.embed([text for texts in batches for text in texts])
        out, start = [], 0
        for texts in batches:
            out.append(vectors[start : start + len(texts)])
            start += len(texts)
        return out

    async def run(self, inputs: Any) -> Any:
        """Run a numeric model on an array (tensor models only)."""
        raise self._unsupported("tensor inputs")

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _single_chunk(result: Any) -> AsyncIterator[StreamChunk]:
    completion = await result
    yield StreamChunk(completion.text, None)
    yield StreamChunk("", completion.finish_reason)


@runtime_checkable
class BackendPlugin(Protocol):
    """One software stack (llama.cpp, transformers, ONNX Runtime, a vendor NPU SDK, a remote server).

    Vendor libraries are imported inside the plugin's methods, never at module import. Besides the
    four contract methods a plugin has ``name`` and ``availability()``; plugins whose build profiles
    are not empty also implement ``build(profile, config, out_dir)`` (see ``build.builder``).
    """

    name: str

    def availability(self) -> Availability: ...

    def probe(self, resources: Sequence[Resource]) -> list[Resource]:
        """The subset of ``resources`` this stack can run on."""
        ...

    def required_build_profiles(
        self, resources: Sequence[Resource], config: ModelConfig
    ) -> list[BuildProfile]: ...

    def get_capability(
        self,
        resources: Sequence[Resource],
        config: ModelConfig,
        artifacts: Mapping[str, BuildArtifact],
    ) -> Capability: ...

    async def create_session(
        self,
        resources: Sequence[Resource],
        config: ModelConfig,
        artifacts: Mapping[str, BuildArtifact],
    ) -> Session: ...
