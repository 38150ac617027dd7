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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from xpuflow.errors import ConfigError

__all__ = ["DeclaredResource", "DeploymentConfig", "XpuflowConfig", "load_config", "parse_config"]


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
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific settings.")

    def to_model_config(self, base_dir: Path | None = None) -> Any:
        from xpuflow.backends.base import ModelConfig, ModelTask

        path = None
        if self.model is not None:
            path = Path(self.model).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
        return ModelConfig(
            model_id=self.name,
            path=path,
            task=ModelTask(self.task),
            precision=self.precision,
            max_batch_size=self.max_batch_size,
            max_seq_len=self.max_seq_len,
            options=self.options,
        )


class XpuflowConfig(_Strict):
    """The whole file."""

    resources: list[DeclaredResource] = Field(default_factory=list, description="Declared devices.")
    deployments: list[DeploymentConfig] = Field(default_factory=list, description="Models to run.")
    artifact_dir: str | None = Field(None, description="Artifact store folder; default: user cache.")

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


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<data>") -> XpuflowConfig:
    """Validate already-parsed YAML/JSON data. Raises ConfigError naming each bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping at the top level, got {type(data).__name__}")
    try:
        return XpuflowConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        raise ConfigError(_format_validation(exc, source), field=".".join(map(str, first))) from exc


def load_config(path: str | Path) -> XpuflowConfig:
    """Read and validate a YAML config file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {file} does not exist; pass the path of a YAML file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {file} is not UTF-8 text") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {file} is not valid YAML: {exc}") from exc
    return parse_config(data, str(file))
