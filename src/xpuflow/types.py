"""Core types: the resource model, capabilities and routing decisions.

These are plain frozen dataclasses and enums; everything above them passes them around as data::

    cpu = Resource(id="cpu", type=ResourceType.CPU, name="AMD EPYC", attributes={"memory_bytes": 64 << 30})
    cpu.memory_bytes  # 68719476736
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from types import MappingProxyType
from typing import Any, TypeVar

from xpuflow.errors import ConfigError

__all__ = [
    "Alternative",
    "Capability",
    "OptimizedFor",
    "Precision",
    "Priority",
    "RequestKind",
    "Resource",
    "ResourceType",
    "RoutingDecision",
    "Strategy",
    "Task",
    "WorkerSnapshot",
    "frozen_from_fields",
]


class ResourceType(str, Enum):
    """The kinds of compute xpuflow places work on."""

    GPU = "gpu"
    IGPU = "igpu"
    NPU = "npu"
    PIM = "pim"
    CPU = "cpu"
    REMOTE = "remote"


class OptimizedFor(str, Enum):
    THROUGHPUT = "throughput"
    LATENCY = "latency"
    ENERGY = "energy"


class Precision(str, Enum):
    """Numeric precision of model weights; ``bytes_per_param`` drives memory estimates."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bytes_per_param(self) -> float:
        return _BYTES_PER_PARAM[self]

    @property
    def is_float16(self) -> bool:
        return self in (Precision.FP16, Precision.BF16)

    @property
    def is_integer(self) -> bool:
        return self in (Precision.INT8, Precision.INT4)


_BYTES_PER_PARAM = {
    Precision.FP32: 4.0,
    Precision.FP16: 2.0,
    Precision.BF16: 2.0,
    Precision.FP8: 1.0,
    Precision.INT8: 1.0,
    Precision.INT4: 0.5,
}


class Strategy(str, Enum):
    """What the advisor optimises for."""

    AUTO = "auto"
    LATENCY = "latency"
    THROUGHPUT = "throughput"
    POWER = "power"


class Task(str, Enum):
    """What a workload does, for the workload advisor (training needs more memory than inference);
    not what a model serves, which is ``RequestKind``."""

    INFERENCE = "inference"
    TRAINING = "training"


class Priority(IntEnum):
    """Lower value is served first. Parsed from the ``x-priority`` header."""

    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, value: str | int | Priority | None) -> Priority:
        if value is None or value == "":
            return cls.NORMAL
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            raise ConfigError(
                f"unknown priority '{value}'; valid: high, normal, low", field="x-priority"
            ) from None


class RequestKind(str, Enum):
    """What a request asks and what a model serves: the one task vocabulary (``ModelTask`` in
    ``backends.base`` and the config's ``task`` use these values)."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    TENSOR = "tensor"  # named arrays in, named arrays out (Open Inference Protocol models)


def _freeze(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


_T = TypeVar("_T")


def frozen_from_fields(cls: type[_T], fields: dict[str, Any]) -> _T:
    """An instance of the (non-slots) frozen dataclass ``cls`` holding ``fields`` (every field, already
    valid) without its ``__init__``, which sets each field through ``object.__setattr__``: for the ones
    built per request on the hot path. Frozen as any other instance."""
    instance = object.__new__(cls)
    instance.__dict__.update(fields)
    return instance


@dataclass(frozen=True)
class Resource:
    """One device xpuflow can place work on.

    ``id`` is stable and user-facing ("cuda:0", "npu:0", "cpu", "remote:vllm-a"). ``attributes`` carries
    what the probe learned (memory_bytes, free_memory_bytes, vendor, device_id, compute_capability,
    isa_features, bandwidth_gbps, tdp_w, ...); ``tags`` are hints such as "low-latency" or "low-power".
    """

    id: str
    type: ResourceType
    name: str = ""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    source: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a Resource needs a non-empty id such as 'cuda:0' or 'cpu'")
        object.__setattr__(self, "type", ResourceType(self.type))
        object.__setattr__(self, "attributes", _freeze(self.attributes))
        object.__setattr__(self, "tags", frozenset(self.tags))

    @property
    def memory_bytes(self) -> int | None:
        value = self.attributes.get("memory_bytes")
        return int(value) if value is not None else None

    @property
    def free_memory_bytes(self) -> int | None:
        """Free memory when known, else total memory, else None."""
        value = self.attributes.get("free_memory_bytes", self.attributes.get("memory_bytes"))
        return int(value) if value is not None else None

    @property
    def vendor(self) -> str:
        return str(self.attributes.get("vendor", ""))

    def with_attributes(self, **updates: Any) -> Resource:
        """A copy with some attributes replaced (resources are immutable)."""
        merged = dict(self.attributes)
        merged.update(updates)
        return Resource(self.id, self.type, self.name, merged, self.tags, self.source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type.value,
            "name": self.name,
            "attributes": {k: _jsonable(v) for k, v in sorted(self.attributes.items())},
            "tags": sorted(self.tags),
            "source": self.source,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (frozenset, set, tuple)):
        return sorted(value) if isinstance(value, (frozenset, set)) else list(value)
    if isinstance(value, Enum):
        return value.value
    return value


@dataclass(frozen=True)
class Capability:
    """What a backend can do on given resources. Data, never behaviour.

    ``unsupported`` maps a feature name to the reason it is missing, so every "no" reaches the user
    with its reason. ``details`` holds backend facts worth showing (e.g. the chosen execution providers).
    """

    max_batch_size: int = 1
    max_seq_len: int = 2048
    supports_kv_cache: bool = False
    supports_streaming: bool = False
    supports_embeddings: bool = False
    supports_chat: bool = False
    dtypes: tuple[str, ...] = ("fp32",)
    optimized_for: OptimizedFor = OptimizedFor.LATENCY
    unsupported: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        object.__setattr__(self, "unsupported", _freeze(self.unsupported))
        object.__setattr__(self, "details", _freeze(self.details))

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size,
            "max_seq_len": self.max_seq_len,
            "supports_kv_cache": self.supports_kv_cache,
            "supports_streaming": self.supports_streaming,
            "supports_embeddings": self.supports_embeddings,
            "supports_chat": self.supports_chat,
            "dtypes": list(self.dtypes),
            "optimized_for": self.optimized_for.value,
            "unsupported": dict(self.unsupported),
            "details": {k: _jsonable(v) for k, v in self.details.items()},
        }


@dataclass(frozen=True)
class Alternative:
    """A candidate the decision did not take, with the reason and (when ranked) its score."""

    candidate: str
    reason: str
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "reason": self.reason, "score": self.score}


@dataclass(frozen=True)
class RoutingDecision:
    """An explainable placement: where work goes, why, how sure, and what was turned down.

    The workload advisor fills ``device``, ``precision``, ``use_amp`` and ``estimated_memory_bytes``;
    the request router fills ``tier`` and ``worker``. ``alternatives`` always says why each other
    candidate lost.
    """

    device: str | None
    reason: str
    confidence: float
    alternatives: tuple[Alternative, ...] = ()
    precision: str | None = None
    use_amp: bool = False
    estimated_memory_bytes: int | None = None
    strategy: str | None = None
    tier: str | None = None
    worker: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence}")
        object.__setattr__(self, "alternatives", tuple(self.alternatives))
        object.__setattr__(self, "details", _freeze(self.details))

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> RoutingDecision:
        """The decision of ``fields``, which names every field, with ``alternatives`` a tuple, ``details``
        a dict the decision takes over (it is not copied) and ``confidence`` in [0, 1]; built without
        the frozen dataclass's ``__init__`` and checks (the dispatcher makes one per request). Equal to
        ``RoutingDecision(**fields)``, and as frozen."""
        fields["details"] = MappingProxyType(fields["details"])
        return frozen_from_fields(cls, fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "tier": self.tier,
            "worker": self.worker,
            "reason": self.reason,
            "confidence": round(self.confidence, 4),
            "precision": self.precision,
            "use_amp": self.use_amp,
            "estimated_memory_bytes": self.estimated_memory_bytes,
            "strategy": self.strategy,
            "alternatives": [a.to_dict() for a in self.alternatives],
            "details": {k: _jsonable(v) for k, v in self.details.items()},
        }


@dataclass(frozen=True)
class WorkerSnapshot:
    """A worker's live state at one instant, as the router's pure scorer sees it.

    Workers publish these; ``policy.worker_scorer`` ranks them. ``taken_at_s`` is the monotonic time
    of the reading, so the scorer can age stale state (a remote worker polled seconds ago) out of its
    score. Unknown readings are None, never a made-up number.
    """

    worker_id: str
    deployment: str
    device: str
    healthy: bool = True
    draining: bool = False
    queue_depth: int = 0
    in_flight: int = 0
    max_batch_size: int = 1
    ema_latency_ms: float | None = None
    free_memory_bytes: int | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    max_seq_len: int | None = None
    taken_at_s: float = 0.0
    tags: frozenset[str] = frozenset()
    max_in_flight: int | None = None  # requests it takes at once when the backend batches by itself
    oldest_in_flight_s: float | None = None  # age of its oldest running request at taken_at_s
    latency_sampled_at_s: float | None = None  # monotonic time of the newest ema_latency_ms sample
    mean_batch_size: float | None = None  # requests per batch it has run on average (None: not measured)
    ema_service_ms: float | None = None  # time to serve one batch, without queue wait (None: not measured)

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> WorkerSnapshot:
        """The snapshot of ``fields``, which names every field (``dataclasses.fields``), built without the
        frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field: 2.3 us against 0.2 here):
        a worker takes one for every request it could serve. The object is the same as
        ``WorkerSnapshot(**fields)``, and as frozen."""
        return frozen_from_fields(cls, fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "deployment": self.deployment,
            "device": self.device,
            "healthy": self.healthy,
            "draining": self.draining,
            "queue_depth": self.queue_depth,
            "in_flight": self.in_flight,
            "max_batch_size": self.max_batch_size,
            "ema_latency_ms": self.ema_latency_ms,
            "free_memory_bytes": self.free_memory_bytes,
            "utilization_pct": self.utilization_pct,
            "temperature_c": self.temperature_c,
            "max_seq_len": self.max_seq_len,
            "taken_at_s": self.taken_at_s,
            "tags": sorted(self.tags),
            "max_in_flight": self.max_in_flight,
            "oldest_in_flight_s": self.oldest_in_flight_s,
            "latency_sampled_at_s": self.latency_sampled_at_s,
            "ema_service_ms": self.ema_service_ms,
            "mean_batch_size": self.mean_batch_size,
        }
