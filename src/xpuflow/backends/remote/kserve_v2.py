"""The ``kserve_v2`` backend: model servers that speak the Open Inference Protocol (KServe v2).

Triton, MLServer, KServe model servers, OpenVINO Model Server and TorchServe's v2 mode join as workers,
over REST (aiohttp) or gRPC (grpc.aio), chosen per deployment with ``options.protocol``::

    config = ModelConfig(model_id="iris", task="tensor",
                         options={"base_url": "127.0.0.1:8081", "protocol": "grpc"})
    session = await KServeV2Plugin().create_session([], config, artifacts={})
    async with session:
        meta = await session.metadata()                        # names, datatypes, shapes
        out = await session.run(np.array([[5.1, 3.5, 1.4, 0.2]]))   # {"predict": array([0])}
        ready = await session.health()                         # ServerReady and ModelReady

Tasks. ``embedding``: texts go out as one BYTES tensor (the model's first BYTES input, or
``options.input_name``) and the first floating-point output comes back, one row per text.
``tensor`` (raw tensors, classifiers): ``run`` takes an array (sent as the model's first input) or a
mapping of input names to arrays and returns every output by name; a classifier is a tensor model whose
output holds labels or scores. Arrays are cast to the datatype the model declares.

Batching. The session batches natively (``BatchMode.NATIVE``): the worker's batcher forms a batch and the
session sends it as one inference request, texts or rows joined along the first dimension, then splits
the answer. Failures are ``RemoteError`` with the server's message; ``retryable`` for connection errors,
timeouts, 429 and 5xx (gRPC: UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, INTERNAL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from xpuflow.artifacts.profile import BuildArtifact, BuildProfile
from xpuflow.backends.base import Availability, BatchMode, ModelConfig, ModelTask, Session
from xpuflow.backends.remote.oip_client import (
    ModelMetadata,
    OIPClient,
    OIPTimeouts,
    RestOIPClient,
    TensorSpec,
)
from xpuflow.backends.remote.oip_tensors import DATATYPES
from xpuflow.backends.remote.openai import LATENCY_EMA_ALPHA, RemoteMetrics, _api_key
from xpuflow.clock import Clock, SystemClock
from xpuflow.errors import ConfigError, RemoteError
from xpuflow.types import Capability, OptimizedFor, Resource, ResourceType

__all__ = ["KSERVE_OPTIONS", "KServeSettings", "KServeV2Plugin", "KServeV2Session"]

#: option name -> what it does; anything else in ``ModelConfig.options`` is a ConfigError.
KSERVE_OPTIONS: dict[str, str] = {
    "base_url": "the server: http://host:port for rest, host:port (or grpc://host:port) for grpc (required)",
    "protocol": "rest or grpc (default rest)",
    "model": "the model name the server knows (default: the deployment name)",
    "model_version": "the model version to call (default: the server's choice)",
    "input_name": "the input to send texts or a lone array to (default: from the model's metadata)",
    "output_name": "the output to read embeddings from (default: from the model's metadata)",
    "api_key": "bearer token sent as 'Authorization: Bearer ...' (REST header, gRPC metadata)",
    "api_key_env": "name of an environment variable holding the bearer token, read at session creation",
    "headers": "extra HTTP headers or gRPC metadata sent with every request (a mapping of strings)",
    "timeout_s": "total seconds for one request (default 60)",
    "connect_timeout_s": "seconds to open a connection (default 2)",
    "health_timeout_s": "total seconds for one readiness check (default 1)",
    "health_interval_s": "seconds between readiness checks while they pass; 0 turns them off (default 1)",
    "max_connections": "pooled REST connections, and so concurrent requests (default 64)",
}

_PROTOCOLS = ("rest", "grpc")


def _number(options: Mapping[str, Any], name: str, default: float, *, zero_ok: bool = False) -> float:
    value = options.get(name, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value < 0
        or (value == 0 and not zero_ok)
    ):
        limit = ">= 0 (0 turns it off)" if zero_ok else "> 0"
        raise ConfigError(
            f"options.{name} must be a number of seconds {limit}, got {value!r}", field=f"options.{name}"
        )
    return float(value)


def _address(value: Any, protocol: str) -> str:
    example = "http://127.0.0.1:8080" if protocol == "rest" else "127.0.0.1:8081"
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"the kserve_v2 backend needs options.base_url, e.g. {example}", field="options.base_url"
        )
    if protocol == "rest":
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"options.base_url must be an http:// or https:// URL with a host for protocol rest, got "
                f"{value!r}; e.g. {example}",
                field="options.base_url",
            )
        return value.rstrip("/")
    target = value[len("grpc://") :] if value.startswith("grpc://") else value
    if "://" in target or ":" not in target:
        raise ConfigError(
            f"options.base_url must be host:port for protocol grpc, got {value!r}; e.g. {example}",
            field="options.base_url",
        )
    return target


@dataclass(frozen=True)
class KServeSettings:
    """The validated options of one kserve_v2 deployment (see ``KSERVE_OPTIONS``)."""

    base_url: str
    model: str
    protocol: str = "rest"
    model_version: str = ""
    input_name: str | None = None
    output_name: str | None = None
    api_key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 60.0
    connect_timeout_s: float = 2.0
    health_timeout_s: float = 1.0
    health_interval_s: float = 1.0
    max_connections: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))

    @classmethod
    def from_config(cls, config: ModelConfig) -> KServeSettings:
        """Validate ``config.options``; raises ConfigError naming the option and the fix."""
        options = config.options
        unknown = sorted(set(options) - set(KSERVE_OPTIONS))
        if unknown:
            raise ConfigError(
                f"unknown kserve_v2 option(s) {', '.join(unknown)}; valid: {', '.join(KSERVE_OPTIONS)}",
                field=f"options.{unknown[0]}",
            )
        protocol = options.get("protocol", "rest")
        if protocol not in _PROTOCOLS:
            raise ConfigError(
                f"options.protocol must be rest or grpc, got {protocol!r}", field="options.protocol"
            )
        headers = options.get("headers") or {}
        if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ConfigError(
                "options.headers must map header names to string values", field="options.headers"
            )
        if config.task not in (ModelTask.EMBEDDING, ModelTask.TENSOR):
            raise ConfigError(
                f"deployment '{config.model_id}': the kserve_v2 backend serves task embedding or tensor, not "
                f"{config.task.value}; use remote_openai for chat servers",
                field="task",
            )
        return cls(
            base_url=_address(options.get("base_url"), protocol),
            model=str(options.get("model") or config.model_id),
            protocol=protocol,
            model_version=str(options.get("model_version") or ""),
            input_name=options.get("input_name"),
            output_name=options.get("output_name"),
            api_key=_api_key(options),
            headers=headers,
            timeout_s=_number(options, "timeout_s", 60.0),
            connect_timeout_s=_number(options, "connect_timeout_s", 2.0),
            health_timeout_s=_number(options, "health_timeout_s", 1.0),
            health_interval_s=_number(options, "health_interval_s", 1.0, zero_ok=True),
            max_connections=config.int_option("max_connections", 64),
        )

    def client(self) -> OIPClient:
        """A new client of the configured protocol (opens nothing until its first call)."""
        timeouts = OIPTimeouts(self.timeout_s, self.connect_timeout_s, self.health_timeout_s)
        headers = dict(self.headers)
        if self.api_key:
            headers.setdefault("Authorization", f"Bearer {self.api_key}")
        if self.protocol == "grpc":
            from xpuflow.backends.remote.oip_client_grpc import GrpcOIPClient

            return GrpcOIPClient(self.base_url, timeouts, metadata=headers)
        return RestOIPClient(self.base_url, timeouts, max_connections=self.max_connections, headers=headers)


def _rows(array: np.ndarray[Any, Any]) -> int:
    return int(array.shape[0]) if array.ndim else 1


class KServeV2Session(Session):
    """One model on one OIP server. Use it from one event loop; close it to release its connections."""

    batch_mode = BatchMode.NATIVE

    def __init__(
        self,
        model_id: str,
        resources: Sequence[Resource],
        settings: KServeSettings,
        *,
        task: ModelTask = ModelTask.TENSOR,
        max_batch_size: int = 8,
        client: OIPClient | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(model_id, resources)
        self.settings = settings
        self.task = task
        self.max_batch_size = max_batch_size
        self.client = client or settings.client()
        self._clock = clock or SystemClock()
        self._metadata: ModelMetadata | None = None
        self._metadata_lock = asyncio.Lock()
        # input name -> the numeric dtype the model declares (built with the metadata, used per request)
        self._input_dtypes: dict[str, np.dtype[Any]] = {}
        self._first_input: TensorSpec | None = None
        self._embed_specs: tuple[TensorSpec, TensorSpec] | None = None  # (texts in, vectors out)
        self._latency_ema_s: float | None = None
        self._successes = 0
        self._failures = 0
        self._consecutive_failures = 0
        self._last_error: str | None = None

    @property
    def health_interval_s(self) -> float:
        """Seconds between readiness checks (0: none); the orchestrator runs them."""
        return self.settings.health_interval_s

    @property
    def health_timeout_s(self) -> float:
        return self.settings.health_timeout_s

    # -- metadata -----------------------------------------------------------------------------------

    async def metadata(self) -> ModelMetadata:
        """The model's metadata, asked once and kept."""
        if self._metadata is None:
            async with self._metadata_lock:
                if self._metadata is None:
                    meta = await self.client.model_metadata(self.settings.model, self.settings.model_version)
                    self._input_dtypes = {
                        s.name: dtype
                        for s in meta.inputs
                        if (dtype := DATATYPES.get(s.datatype)) is not None and dtype.kind != "O"
                    }
                    self._metadata = meta
        return self._metadata

    def _pick(self, specs: Sequence[TensorSpec], wanted: str | None, kind: str, accept: Any) -> TensorSpec:
        if wanted is not None:
            for spec in specs:
                if spec.name == wanted:
                    return spec
        else:
            for spec in specs:
                if accept(spec):
                    return spec
        names = ", ".join(f"{s.name} ({s.datatype})" for s in specs) or "none"
        if wanted is not None:
            raise ConfigError(
                f"model '{self.settings.model}' has no {kind} '{wanted}'; its {kind}s: {names}",
                field=f"options.{kind}_name",
            )
        raise ConfigError(
            f"model '{self.settings.model}' declares no suitable {kind} for task {self.task.value}; its "
            f"{kind}s: {names}; set options.{kind}_name",
            field=f"options.{kind}_name",
        )

    # -- bookkeeping --------------------------------------------------------------------------------

    async def _infer(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], outputs: Sequence[str] = ()
    ) -> dict[str, np.ndarray[Any, Any]]:
        start = self._clock.monotonic()
        try:
            result = await self.client.infer(
                self.settings.model, inputs, outputs=outputs, version=self.settings.model_version
            )
        except RemoteError as exc:
            self._failures += 1
            self._consecutive_failures += 1
            self._last_error = str(exc)
            raise
        latency_s = self._clock.monotonic() - start
        self._successes += 1
        self._consecutive_failures = 0
        previous = self._latency_ema_s
        self._latency_ema_s = (
            latency_s
            if previous is None
            else LATENCY_EMA_ALPHA * latency_s + (1 - LATENCY_EMA_ALPHA) * previous
        )
        return result

    def metrics(self) -> RemoteMetrics:
        """A snapshot of latency EMA and failure counts (readiness checks are not counted)."""
        return RemoteMetrics(
            self._latency_ema_s, self._successes, self._failures, self._consecutive_failures, self._last_error
        )

    # -- embeddings ---------------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        if self._embed_specs is None:
            meta = await self.metadata()
            source = self._pick(
                meta.inputs, self.settings.input_name, "input", lambda s: s.datatype == "BYTES"
            )
            target = self._pick(
                meta.outputs,
                self.settings.output_name,
                "output",
                lambda s: s.datatype in ("FP16", "FP32", "FP64"),
            )
            self._embed_specs = (source, target)
        source, target = self._embed_specs
        array: np.ndarray[Any, Any] = np.empty(len(texts), dtype=object)
        array[:] = [t.encode("utf-8") for t in texts]
        if len(source.shape) == 2:
            array = array.reshape(len(texts), 1)  # a model that declares [-1, 1] takes one text per row
        outputs = await self._infer({source.name: array}, [target.name])
        vectors = outputs.get(target.name)
        if vectors is None:
            raise RemoteError(f"model '{self.settings.model}' answered without its output '{target.name}'")
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.size == 0 or vectors.shape[0] != len(texts):
            raise RemoteError(
                f"model '{self.settings.model}' answered output '{target.name}' of shape "
                f"{list(vectors.shape)} for {len(texts)} text(s); expected one vector per text"
            )
        vectors = vectors.reshape(len(texts), -1)
        return vectors.tolist()

    # -- tensors ------------------------------------------------------------------------------------

    async def _inputs(self, inputs: Any) -> dict[str, np.ndarray[Any, Any]]:
        meta = self._metadata or await self.metadata()
        if isinstance(inputs, Mapping):
            named = {str(k): np.asarray(v) for k, v in inputs.items()}
        else:
            spec = self._first_input
            if spec is None:
                spec = self._first_input = self._pick(
                    meta.inputs, self.settings.input_name, "input", lambda s: True
                )
            named = {spec.name: np.asarray(inputs)}
        dtypes = self._input_dtypes
        for name, array in named.items():
            dtype = dtypes.get(name)
            if dtype is not None and array.dtype != dtype:
                named[name] = array.astype(dtype)
        return named

    async def run(self, inputs: Any) -> dict[str, np.ndarray[Any, Any]]:
        """Run the model on an array (its first input) or on named arrays; every output by name."""
        return await self._infer(await self._inputs(inputs))

    async def run_batch(self, batch: Sequence[Any]) -> list[dict[str, np.ndarray[Any, Any]]]:
        """Several ``run`` requests as one inference request: each input joined along its first
        dimension, each output split back by the requests' row counts."""
        if len(batch) == 1:
            return [await self.run(batch[0])]
        prepared = [await self._inputs(item) for item in batch]
        names = list(prepared[0])
        if any(list(p) != names for p in prepared) or any(
            p[n].shape[1:] != prepared[0][n].shape[1:] or p[n].ndim == 0 for p in prepared for n in names
        ):
            return [await self._infer(p) for p in prepared]  # shapes differ: one request each
        counts = [_rows(p[names[0]]) for p in prepared]
        joined = {n: np.concatenate([p[n] for p in prepared]) for n in names}
        outputs = await self._infer(joined)
        total = sum(counts)
        results: list[dict[str, np.ndarray[Any, Any]]] = [{} for _ in batch]
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise RemoteError(
                    f"model '{self.settings.model}' answered a batch of {total} rows with output '{name}' "
                    f"of shape {list(array.shape)}; set max_batch_size: 1 for models that do not batch"
                )
            start = 0
            for index, count in enumerate(counts):
                results[index][name] = array[start : start + count]
                start += count
        return results

    # -- health and lifetime ------------------------------------------------------------------------

    async def health(self) -> bool:
        """ServerReady and ModelReady both true. Never raises; bounded by ``health_timeout_s``."""
        timeout_s = self.settings.health_timeout_s
        try:
            return await self.client.server_ready(timeout_s) and await self.client.model_ready(
                self.settings.model, self.settings.model_version, timeout_s
            )
        except Exception:
            return False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.client.close()


class KServeV2Plugin:
    """Sessions on an Open Inference Protocol server named by ``options.base_url``; nothing runs here."""

    name = "kserve_v2"
    remote = True  # placed on a "remote:<deployment>" resource when none is declared

    def availability(self) -> Availability:
        import importlib.metadata

        try:
            version = importlib.metadata.version("aiohttp")
        except importlib.metadata.PackageNotFoundError:
            return Availability(False, "aiohttp is not installed; pip install 'xpuflow[oip]'")
        try:
            grpc_version: str | None = importlib.metadata.version("grpcio")
        except importlib.metadata.PackageNotFoundError:
            grpc_version = None
        grpc = f", grpcio {grpc_version}" if grpc_version else " (gRPC needs: pip install 'xpuflow[oip]')"
        return Availability(True, f"aiohttp {version}{grpc}: Open Inference Protocol servers", version)

    def probe(self, resources: Sequence[Resource]) -> list[Resource]:
        """The declared remote resources; a kserve_v2 deployment also runs with none. Never raises."""
        return [r for r in resources if r.type is ResourceType.REMOTE]

    def required_build_profiles(
        self, resources: Sequence[Resource], config: ModelConfig
    ) -> list[BuildProfile]:
        return []  # the server loads its own model

    def get_capability(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Capability:
        embedding = config.task is ModelTask.EMBEDDING
        return Capability(
            max_batch_size=config.max_batch_size,
            max_seq_len=config.max_seq_len,
            supports_streaming=False,
            supports_embeddings=embedding,
            supports_chat=False,
            dtypes=(config.precision,),
            optimized_for=OptimizedFor.THROUGHPUT,
            unsupported={"chat": "Open Inference Protocol servers take tensors; use remote_openai for chat"},
        )

    async def create_session(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> KServeV2Session:
        """Validate the options and return a session; no connection is opened until the first request."""
        settings = KServeSettings.from_config(config)
        if settings.protocol == "grpc":
            try:
                import grpc  # noqa: F401
            except ImportError as exc:
                raise ConfigError(
                    f"deployment '{config.model_id}' uses options.protocol grpc but grpcio is not installed; "
                    "pip install 'xpuflow[oip]' or use protocol rest",
                    field="options.protocol",
                ) from exc
        return KServeV2Session(
            config.model_id, resources, settings, task=config.task, max_batch_size=config.max_batch_size
        )
