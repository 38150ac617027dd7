"""What a device needs built, and what a build produced.

Example::

    profile = BuildProfile(name="engine", target=ResourceType.NPU, compiler="refnpu-compile",
                           compiler_version="1.0", flags=("--opt", "2"), interface="cli")
    profile.key_fields()   # the fields that enter the artifact's content key
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from xpuflow.types import ResourceType

__all__ = ["BuildArtifact", "BuildInterface", "BuildProfile"]


class BuildInterface(str, Enum):
    """How the toolchain is driven."""

    CLI = "cli"
    C_API = "c-api"
    PYTHON = "python"
    CONFIG_FILE = "config-file"


@dataclass(frozen=True)
class BuildProfile:
    """One build step a backend needs for a model on a kind of device.

    ``name`` identifies the step within its backend ("gguf-dequant", "onnx-export", "engine").
    Everything here except ``description`` enters the artifact's content key, so changing a flag or
    upgrading the compiler builds a new artifact instead of reusing a stale one.
    """

    name: str
    target: ResourceType
    compiler: str
    compiler_version: str
    flags: tuple[str, ...] = ()
    interface: BuildInterface = BuildInterface.PYTHON
    backend: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a BuildProfile needs a name such as 'onnx-export'")
        object.__setattr__(self, "target", ResourceType(self.target))
        object.__setattr__(self, "interface", BuildInterface(self.interface))
        object.__setattr__(self, "flags", tuple(self.flags))

    def key_fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "target": self.target.value,
            "compiler": self.compiler,
            "compiler_version": self.compiler_version,
            "flags": list(self.flags),
            "interface": self.interface.value,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.key_fields(), "description": self.description}


@dataclass(frozen=True)
class BuildArtifact:
    """A finished, checksummed build output in the artifact store.

    ``path`` is the artifact's directory; ``metadata`` holds sha256 per file, created_at, sizes and
    the build's duration.
    """

    id: str
    model_id: str
    profile: BuildProfile
    path: Path
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    def file(self, name: str) -> Path:
        """The path of one output file of this artifact."""
        return self.path / name

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model_id": self.model_id,
            "profile": self.profile.to_dict(),
            "path": str(self.path),
            "metadata": dict(self.metadata),
        }
