"""The user's configuration file (YAML), validated with pydantic.

Errors name the field and the fix. Inside xpuflow, config becomes plain frozen data
(``ModelConfig`` for backends, dicts for declared resources)::

    cfg = load_config("xpuflow.yaml")
    for dep in cfg.deployments:
        plugin = get_backend(dep.backend)
        model = dep.to_model_config()

Example::

    resources:
      - {id: "pim:0", type: pim, name: "UPMEM DIMM", memory_bytes: 8589934592}
    deployments:
      - name: chat-small
        backend: llamacpp
        model: /models/SmolLM2-135M-Instruct.Q4_1.gguf
        task: chat
        device: auto
        options: {n_ctx: 2048}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xpuflow.errors import ConfigError

__all__ = [
    "ApiKeyConfig",
    "BatchingConfig",
    "ClusterConfig",
    "CorsConfig",
    "DeclaredResource",
    "DeploymentConfig",
    "GatewayConfig",
    "LogicalModelConfig",
    "ManagedConfig",
    "PartitionConfig",
    "QoSConfig",
    "QoSContextConfig",
    "ResidencyConfig",
    "TierRef",
    "XpuflowConfig",
    "load_config",
    "parse_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeclaredResource(_Strict):
    """A device the probes cannot find by themselves: a PIM part or a remote model server."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(description="Stable id such as 'pim:0' or 'remote:vllm-a'.")
    type: Literal["gpu", "igpu", "npu", "pim", "cpu", "remote"] = Field(description="Resource kind.")
    name: str = Field("", description="Human-readable name.")
    memory_bytes: int | None = Field(None, ge=0, description="Memory the device holds, in bytes.")
    tags: list[str] = Field(default_factory=list, description="Hints such as 'low-power'.")


class BatchingConfig(_Strict):
    """How a deployment's workers queue and batch requests (see docs/scheduling.md)."""

    policy: Literal["adaptive", "greedy", "fixed_window"] = Field(
        "adaptive", description="Batch policy: adaptive wait window, dispatch at once, or a fixed window."
    )
    max_wait_ms: float = Field(50.0, ge=0.0, description="Longest a request waits for a batch to fill.")
    queue_capacity: int = Field(256, ge=1, description="Requests a worker holds queued before 429.")
    aging_s: float = Field(5.0, gt=0.0, description="Seconds after which a queued request moves up a class.")
    queue_policy: Literal["priority", "fifo"] = Field("priority", description="Queue order.")


class ManagedConfig(_Strict):
    """A model server xpuflow starts and supervises for a deployment (see docs/managed_engines.md)."""

    template: Literal["llamacpp", "vllm", "sglang", "tgi", "ovms"] | None = Field(
        None, description="A shipped argv template: llamacpp, vllm, sglang, tgi or ovms."
    )
    argv: list[str] | None = Field(
        None,
        min_length=1,
        description="Your own argv (a list, never a shell string) with placeholders {model} {model_name} "
        "{host} {port} {grpc_port} {python}; instead of a template.",
    )
    executable: str | None = Field(None, description="Replaces argv[0], e.g. the path of a vllm binary.")
    extra_args: list[str] = Field(default_factory=list, description="Arguments appended to the argv.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables added for it.")
    host: str = Field("127.0.0.1", description="Address the server listens on.")
    port: int | None = Field(None, ge=1, le=65535, description="Its HTTP port; default: a free one.")
    ready_path: str | None = Field(
        None, description="Path that answers 200 once ready; default: the template's."
    )
    ready_timeout_s: float = Field(300.0, gt=0.0, description="Longest a start may take to become ready.")
    log_file: str | None = Field(
        None, description="Where its stdout and stderr go; default: managed/<deployment>-<replica>.log."
    )
    restart_backoff_s: float = Field(1.0, gt=0.0, description="Wait before the first restart; doubles.")
    max_backoff_s: float = Field(30.0, gt=0.0, description="Longest wait between restarts.")
    max_restarts: int = Field(5, ge=0, description="Crashes within crash_window_s before it gives up.")
    crash_window_s: float = Field(300.0, gt=0.0, description="Window in which crashes count as a loop.")
    stop_timeout_s: float = Field(10.0, gt=0.0, description="Seconds after SIGTERM before SIGKILL.")

    @model_validator(mode="after")
    def _one_argv(self) -> ManagedConfig:
        if (self.template is None) == (self.argv is None):
            raise ValueError(
                "managed: give exactly one of template (llamacpp, vllm, sglang, tgi, ovms) or argv"
            )
        return self


class DeploymentConfig(_Strict):
    """One model on one backend."""

    name: str = Field(description="Deployment name, unique in the file.", min_length=1)
    backend: str = Field(description="Backend plugin name: llamacpp, transformers, onnxruntime, ...")
    model: str | None = Field(None, description="Model path (file or folder); remote backends omit it.")
    task: Literal["chat", "completion", "embedding", "tensor"] = Field("chat", description="What it serves.")
    device: str = Field("auto", description="Resource id such as 'cuda:0' or 'cpu', or 'auto'.")
    precision: Literal["fp32", "fp16", "bf16", "fp8", "int8", "int4"] = Field(
        "fp32", description="Weight precision."
    )
    max_batch_size: int = Field(8, ge=1, description="Largest batch the session runs at once.")
    max_seq_len: int = Field(2048, ge=1, description="Context length in tokens.")
    replicas: int = Field(1, ge=1, description="Workers to start for this deployment.")
    timeout_s: float = Field(120.0, gt=0.0, description="Longest one attempt of a request may take.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Queueing and batching.")
    max_in_flight: int | None = Field(
        None,
        ge=1,
        description="Requests one worker runs at once when its backend batches by itself (remote "
        "servers, continuous sessions); default: options.max_connections (64) for remote_openai, "
        "max_batch_size for continuous sessions. Others batch with `batching` and refuse it.",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific settings.")
    managed: ManagedConfig | None = Field(
        None, description="Start and supervise the model server (remote_openai, kserve_v2); off when absent."
    )
    node: str | None = Field(
        None,
        description="Cluster mode only: the node (its name, id or IP) or node label ('key=value') its "
        "replicas must run on; default: any node, replicas spread across nodes (docs/cluster.md).",
    )
    load: Literal["pinned", "on_demand"] = Field(
        "pinned",
        description="pinned: loaded at start and held; on_demand: loaded at its first request, unloaded "
        "after keep_alive_s idle or when another model needs the room (docs/residency.md).",
    )
    keep_alive_s: float = Field(
        300.0, gt=0.0, description="on_demand: seconds a loaded replica stays resident while unused."
    )
    memory_gb: float | None = Field(
        None,
        gt=0.0,
        description="What one replica holds in device memory, for the residency budget; default: "
        "measured when it is first loaded at start (at least the size of its model files).",
    )

    def to_model_config(self, base_dir: Path | None = None) -> Any:
        from xpuflow.backends.base import ModelConfig, ModelTask

        path = None
        if self.model is not None:
            path = Path(self.model).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
        options = self.options
        device_model = options.get("device_model")
        if isinstance(device_model, str) and base_dir is not None and not Path(device_model).is_absolute():
            # a file the config names is relative to the config, as the simulator reads it
            options = {**options, "device_model": str(base_dir / Path(device_model).expanduser())}
        return ModelConfig(
            model_id=self.name,
            path=path,
            task=ModelTask(self.task),
            precision=self.precision,
            max_batch_size=self.max_batch_size,
            max_seq_len=self.max_seq_len,
            options=options,
        )


class TierRef(_Strict):
    """One tier of a logical model: the deployments that serve it, and its routing overrides."""

    name: str = Field(min_length=1, max_length=64, description="Tier name, e.g. tier_high.")
    deployments: list[str] = Field(min_length=1, description="Deployments whose workers serve this tier.")
    min_score: float | None = Field(None, ge=0.0, le=1.0, description="Middle tiers: lowest score taken.")
    vram_headroom_gb: float | None = Field(None, ge=0.0, description="Free GiB its GPU must keep.")
    latency_sla_ms: float | None = Field(None, gt=0.0, description="Latency SLA of this tier.")


class LogicalModelConfig(_Strict):
    """A name clients use ("chat-main") and its tiers, strongest first."""

    name: str = Field(min_length=1, description="The model name in API requests.")
    tiers: list[TierRef] = Field(min_length=1, description="Tiers, strongest first.")
    routing: dict[str, Any] = Field(
        default_factory=dict,
        description="Routing settings (complexity_threshold, vram_headroom_gb, latency_sla_ms, ...; "
        "see docs/routing.md); tiers come from `tiers`.",
    )
    max_retries: int = Field(2, ge=0, description="Retries on other workers of a tier before the next tier.")
    wait_weight: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="How many times more the worker scorer counts a request's wait before it starts (and "
        "so before its first token) than its completion time; 0 ranks workers by expected completion "
        "time. Set it (10 to 20 is a good start) when the model has a time-to-first-token SLO "
        "(docs/worker_choice.md).",
    )
    outage_retry_s: float = Field(
        10.0,
        ge=0.0,
        description="While every worker of every tier is failing, how long a request keeps going round "
        "them (with backoff) before it fails; 0: one round.",
    )
    rules: list[str] = Field(
        default_factory=list,
        description="Custom tier rules, 'package.module:name' of a function or a rule object (or a class "
        "taking no arguments), run after the tier override and before the built-in rules (docs/routing.md).",
    )

    @field_validator("rules")
    @classmethod
    def _rule_refs(cls, value: list[str]) -> list[str]:
        for ref in value:
            module, _, name = ref.partition(":")
            if not module or not name:
                raise ValueError(f"rule '{ref}' must be 'package.module:name'")
        return value


class ApiKeyConfig(_Strict):
    """A client key. Give the key itself (``key``) or the environment variable holding it (``key_env``)."""

    name: str = Field(min_length=1, description="Who holds the key (shown in metrics, never the key).")
    key: str | None = Field(None, min_length=8, description="The bearer token.")
    key_env: str | None = Field(None, description="Environment variable that holds the token.")
    rights: list[Literal["infer", "admin", "metrics", "dashboard"]] = Field(
        default_factory=lambda: list[Literal["infer", "admin", "metrics", "dashboard"]](["infer"]),
        description="What the key may do: infer, admin (on a key of its own), metrics, dashboard.",
    )
    qos_class: str | None = Field(None, description="QoS class for requests made with this key.")

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyConfig:
        if (self.key is None) == (self.key_env is None):
            raise ValueError(f"api key '{self.name}': give exactly one of key or key_env")
        return self


class CorsConfig(_Strict):
    """Which browser origins may call the gateway (CORS); off unless this section is present."""

    allow_origins: list[str] = Field(
        min_length=1, description="Origins allowed, such as https://app.example.com; ['*'] allows any."
    )
    allow_methods: list[str] = Field(
        default_factory=lambda: ["GET", "POST"], description="HTTP methods browsers may use."
    )
    allow_headers: list[str] = Field(
        default_factory=lambda: ["authorization", "content-type", "x-priority", "x-qos-class"],
        description="Request headers browsers may send.",
    )
    allow_credentials: bool = Field(
        False, description="Let browsers send cookies and HTTP auth; not with allow_origins ['*']."
    )
    max_age_s: int = Field(600, ge=0, description="Seconds browsers may cache a preflight answer.")

    @model_validator(mode="after")
    def _no_wildcard_credentials(self) -> CorsConfig:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError(
                "cors.allow_credentials with allow_origins ['*'] lets every web site send its visitors' "
                "credentials; list the origins instead"
            )
        return self


class GatewayConfig(_Strict):
    """The HTTP server."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    metrics_require_key: bool = Field(
        False, description="Require a key with the metrics right for /metrics (open by default)."
    )
    dashboard_require_key: bool = Field(
        False,
        description="Require a key with the dashboard right for the dashboard's data (open by default; "
        "turn it on when the gateway listens beyond 127.0.0.1).",
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host header values answered (any port; '*.example.com' matches subdomains), others "
        "get 400; ['*'] answers any. Default: localhost, 127.0.0.1 and [::1] when listening on a "
        "loopback address, any otherwise.",
    )
    drain_timeout_s: float = Field(
        120.0,
        gt=0.0,
        description="On SIGTERM or SIGINT, seconds requests in flight may take to finish before the server "
        "stops; /ready answers 503 and new requests 503 meanwhile.",
    )
    cors: CorsConfig | None = Field(None, description="CORS for browser clients; off when absent.")
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol gRPC server (inference.GRPCInferenceService, on "
        "gateway.host) beside the HTTP API; 0 picks a free one; off when absent (see docs/oip.md).",
    )
    request_timeout_s: float | None = Field(
        600.0,
        gt=0.0,
        description="Longest wait for a non-streamed answer or a stream's first event (then 504); "
        "null: no limit.",
    )
    default_max_tokens: int = Field(
        256,
        ge=1,
        description="max_tokens of a request that names neither max_tokens nor max_completion_tokens.",
    )
    max_tokens_limit: int = Field(32768, ge=1, description="Larger max_tokens values get 422.")
    max_embedding_inputs: int = Field(2048, ge=1, description="Inputs one embeddings request may carry.")
    owned_by: str = Field("xpuflow", min_length=1, description="The owned_by that /v1/models reports.")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="The server's event loop: uvloop where installed (auto), or the standard asyncio loop.",
    )


class QoSContextConfig(_Strict):
    """A QoS execution context: a named memory budget on one device (see docs/qos.md)."""

    name: str = Field(min_length=1, max_length=64, description="Context name; also a value of x-qos-class.")
    device: str = Field("cpu", description="Resource id of the device whose memory it budgets.")
    max_vram_gb: float = Field(gt=0.0, description="Most memory (GiB) the context's requests hold at once.")
    base_vram_gb: float | None = Field(
        None, ge=0.0, description="Burstable: GiB reserved for it (guaranteed reserves max_vram_gb)."
    )
    qos: Literal["guaranteed", "burstable", "best_effort"] = Field(
        "guaranteed", description="Class: guaranteed, burstable or best_effort."
    )
    request_vram_mb: float = Field(
        64.0, gt=0.0, description="Memory (MiB) one request of this context holds while it runs."
    )
    admission_timeout_s: float | None = Field(
        None, gt=0.0, description="Longest a request waits for memory before 429; default: its timeout."
    )

    @model_validator(mode="after")
    def _sizes(self) -> QoSContextConfig:
        if self.base_vram_gb is not None:
            if self.qos == "best_effort" and self.base_vram_gb > 0:
                raise ValueError(
                    f"qos context '{self.name}': best_effort contexts reserve nothing; drop base_vram_gb"
                )
            if self.base_vram_gb > self.max_vram_gb:
                raise ValueError(
                    f"qos context '{self.name}': base_vram_gb {self.base_vram_gb} exceeds max_vram_gb "
                    f"{self.max_vram_gb}"
                )
        if self.request_vram_mb > self.max_vram_gb * 1024:
            raise ValueError(
                f"qos context '{self.name}': request_vram_mb {self.request_vram_mb} exceeds max_vram_gb "
                f"{self.max_vram_gb}; no request could ever be admitted"
            )
        return self


class PartitionConfig(_Strict):
    """A device partition: a compute share (and memory limit) for some deployments (see docs/qos.md)."""

    name: str = Field(min_length=1, max_length=64, description="Partition name, unique in the file.")
    device: str = Field(
        "cpu", description="Resource id of the device it partitions (cluster mode: a node's device, 'cpu@a')."
    )
    compute_share: float = Field(
        gt=0.0, le=1.0, description="Fraction (0-1] of the device's compute tokens it gets under contention."
    )
    memory_gb: float | None = Field(
        None,
        gt=0.0,
        description="Memory (GiB) set aside for it; a device's partitions must fit its memory.",
    )
    deployments: list[str] = Field(
        min_length=1, description="Deployments whose workers run in it (each in at most one partition)."
    )


class QoSConfig(_Strict):
    """QoS contexts requests map to (by API key ``qos_class`` or the ``x-qos-class`` header)."""

    contexts: list[QoSContextConfig] = Field(default_factory=list, description="The contexts.")
    default_context: str | None = Field(
        None, description="Context for requests that name none; default: no admission control for them."
    )
    partitions: list[PartitionConfig] = Field(
        default_factory=list, description="Device partitions: compute shares for groups of deployments."
    )
    compute_tokens: int = Field(
        1, ge=1, description="Batches that run at once on a partitioned device; shared by compute_share."
    )

    @model_validator(mode="after")
    def _names(self) -> QoSConfig:
        seen: set[str] = set()
        for ctx in self.contexts:
            if ctx.name in seen:
                raise ValueError(f"qos context name '{ctx.name}' appears twice; names must be unique")
            seen.add(ctx.name)
        if self.default_context is not None and self.default_context not in seen:
            raise ValueError(
                f"qos.default_context '{self.default_context}' is not a context; contexts: "
                f"{', '.join(c.name for c in self.contexts) or 'none'}"
            )
        names: set[str] = set()
        shares: dict[str, float] = {}
        for part in self.partitions:
            if part.name in names:
                raise ValueError(f"partition name '{part.name}' appears twice; names must be unique")
            names.add(part.name)
            shares[part.device] = shares.get(part.device, 0.0) + part.compute_share
        for device, total in shares.items():
            if total > 1.0 + 1e-9:
                raise ValueError(
                    f"the compute_share of the partitions on '{device}' add up to {total:.2f}; "
                    "they must not exceed 1.0"
                )
        return self


class ClusterConfig(_Strict):
    """Run workers on a Ray cluster (docs/cluster.md); without this section xpuflow is one process."""

    engine: Literal["ray"] = Field("ray", description="Cluster engine; Ray is the one supported.")
    address: str = Field(
        "auto",
        description="'auto' (the Ray cluster this machine belongs to), 'ray://host:port' or 'host:port' "
        "(a cluster's head), or 'local' (start a one-node Ray in this process).",
    )
    namespace: str = Field("xpuflow", min_length=1, description="Ray namespace of xpuflow's actors.")
    refresh_interval_s: float = Field(
        5.0, gt=0.0, description="Seconds between cluster inventory refreshes (nodes that join or leave)."
    )
    health_interval_s: float = Field(
        0.25, gt=0.0, description="Seconds between reads of each remote worker's live metrics."
    )
    unhealthy_after_s: float = Field(
        1.0,
        gt=0.0,
        description="A remote worker that has not answered for this long leaves routing until it answers.",
    )
    worker_num_cpus: float = Field(
        1.0, ge=0.0, description="Ray CPUs one worker on a CPU device reserves on its node."
    )
    spread: bool = Field(True, description="Spread a deployment's replicas across nodes.")
    transport: Literal["direct", "ray"] = Field(
        "direct",
        description="How requests reach workers on other nodes: 'direct' (a kept-open TCP connection to "
        "each worker actor, opened on its node's address; needs the gateway to reach the workers' "
        "nodes on any port) or 'ray' (Ray actor calls and streaming generators, Ray's ports only).",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value in ("auto", "local") or value.startswith("ray://") or ":" in value:
            return value
        raise ValueError(f"cluster.address '{value}': use auto, local, ray://host:port or host:port")


class ResidencyConfig(_Strict):
    """Model residency: per device, the memory that loaded models may hold (docs/residency.md)."""

    budget_gb: dict[str, float] = Field(
        default_factory=dict,
        description="Device id -> GiB that resident models may hold; default: the device's memory "
        "from discovery (host memory for the CPU).",
    )
    check_interval_s: float = Field(
        1.0, gt=0.0, description="How often idle on_demand replicas are checked against keep_alive_s."
    )
    load_timeout_s: float = Field(
        300.0, gt=0.0, description="Longest a load at a request may take before the request fails."
    )
    wait_for_room_s: float = Field(
        30.0,
        ge=0.0,
        description="How long a load waits for models in use to be released so they can be evicted "
        "(it fails with 503 at once when pinned models hold the room).",
    )

    @field_validator("budget_gb")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for device, gb in value.items():
            if not gb > 0:
                raise ValueError(f"residency.budget_gb.{device} must be > 0, got {gb}")
        return value


class XpuflowConfig(_Strict):
    """The whole file."""

    resources: list[DeclaredResource] = Field(default_factory=list, description="Declared devices.")
    deployments: list[DeploymentConfig] = Field(default_factory=list, description="Models to run.")
    models: list[LogicalModelConfig] = Field(
        default_factory=list,
        description="Logical models; when empty, each deployment is served under its own name.",
    )
    api_keys: list[ApiKeyConfig] = Field(
        default_factory=list, description="Client keys; when empty the API is open (bind to 127.0.0.1)."
    )
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="HTTP server settings.")
    artifact_dir: str | None = Field(None, description="Artifact store folder; default: user cache.")
    qos: QoSConfig = Field(default_factory=QoSConfig, description="QoS contexts and their budgets.")
    cluster: ClusterConfig | None = Field(
        None, description="Run workers on a Ray cluster; absent: everything in this process."
    )
    residency: ResidencyConfig = Field(
        default_factory=ResidencyConfig, description="Memory budgets for on_demand deployments."
    )

    @model_validator(mode="after")
    def _models_reference_deployments(self) -> XpuflowConfig:
        known = {d.name: d for d in self.deployments}
        names: set[str] = set()
        for model in self.models:
            if model.name in names:
                raise ValueError(f"model name '{model.name}' appears twice; names must be unique")
            names.add(model.name)
            tasks = set()
            for tier in model.tiers:
                for dep in tier.deployments:
                    if dep not in known:
                        raise ValueError(
                            f"model '{model.name}' tier '{tier.name}' names deployment '{dep}', which is "
                            f"not defined; deployments: {', '.join(known) or 'none'}"
                        )
                    tasks.add("embedding" if known[dep].task == "embedding" else "generation")
            if len(tasks) > 1:
                raise ValueError(
                    f"model '{model.name}' mixes embedding and generation deployments; split it in two"
                )
        owner: dict[str, str] = {}
        for part in self.qos.partitions:
            for dep in part.deployments:
                if dep not in known:
                    raise ValueError(
                        f"partition '{part.name}' names deployment '{dep}', which is not defined; "
                        f"deployments: {', '.join(known) or 'none'}"
                    )
                if dep in owner:
                    raise ValueError(
                        f"deployment '{dep}' is in partitions '{owner[dep]}' and '{part.name}'; "
                        "a deployment belongs to at most one partition"
                    )
                owner[dep] = part.name
        return self

    @field_validator("deployments")
    @classmethod
    def _unique_names(cls, value: list[DeploymentConfig]) -> list[DeploymentConfig]:
        seen: set[str] = set()
        for dep in value:
            if dep.name in seen:
                raise ValueError(f"deployment name '{dep.name}' appears twice; names must be unique")
            seen.add(dep.name)
        return value

    def declared_resources(self) -> list[dict[str, Any]]:
        return [r.model_dump() for r in self.resources]


def format_validation_error(exc: ValidationError, source: str, what: str = "config") -> str:
    """One line per bad field: where it is, what is wrong, and the value that was given."""
    lines = [f"invalid {what} {source}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        got = "" if isinstance(value, (dict, list)) or err["type"] == "missing" else f" (got {value!r})"
        lines.append(f"  {where}: {err['msg']}{got}")
    return "\n".join(lines)


def first_error_field(exc: ValidationError) -> str | None:
    errors = exc.errors()
    return ".".join(map(str, errors[0]["loc"])) or None if errors else None


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """Parse a YAML file; ConfigError saying what is wrong with the file otherwise."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {file} does not exist; pass the path of a YAML file") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{what} {file} is a folder; pass the path of a YAML file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {file} is not UTF-8 text") from exc
    except OSError as exc:
        raise ConfigError(f"{what} {file} cannot be read: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {file} is not valid YAML: {exc}") from exc


def parse_config(data: Any, source: str = "<data>") -> XpuflowConfig:
    """Validate already-parsed YAML/JSON data. Raises ConfigError naming each bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping at the top level, got {type(data).__name__}")
    try:
        return XpuflowConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source), field=first_error_field(exc)) from exc


def load_config(path: str | Path) -> XpuflowConfig:
    """Read and validate a YAML config file."""
    return parse_config(read_yaml(path), str(path))
