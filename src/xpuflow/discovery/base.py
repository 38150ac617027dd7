"""The probe contract: one probe per kind of hardware, and it never raises.

A probe returns what it found and, always, a sentence saying what it found or why it found nothing::

    class MyProbe:
        name = "mything"

        def probe(self) -> ProbeResult:
            return ProbeResult.none("libmything is not installed; pip install mything")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from xpuflow.types import Resource

__all__ = ["Probe", "ProbeReport", "ProbeResult"]


@dataclass(frozen=True)
class ProbeResult:
    """What one probe found. ``reason`` is never empty: what was found, or why nothing was."""

    resources: tuple[Resource, ...]
    reason: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resources", tuple(self.resources))
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    @classmethod
    def none(cls, reason: str, **details: Any) -> ProbeResult:
        return cls((), reason, details)

    @classmethod
    def found(cls, resources: Sequence[Resource], reason: str = "", **details: Any) -> ProbeResult:
        if not reason:
            reason = f"found {len(resources)}: " + ", ".join(r.id for r in resources)
        return cls(tuple(resources), reason, details)


@runtime_checkable
class Probe(Protocol):
    """Finds one kind of hardware. ``probe()`` must never raise; vendor libraries are imported inside it."""

    name: str

    def probe(self) -> ProbeResult: ...


@dataclass(frozen=True)
class ProbeReport:
    """One probe's outcome as recorded in an ``Inventory``."""

    probe: str
    found: int
    reason: str
    elapsed_ms: float
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "found": self.found,
            "reason": self.reason,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "details": dict(self.details),
        }
