"""Devices declared in config: parts no probe can see (processing-in-memory) and remote model servers.

Each entry is a plain mapping with ``id`` and ``type`` (a ``ResourceType`` value) and optionally
``name``, ``memory_bytes`` and ``tags``; every other key (``endpoint``, ``bandwidth_gbps``, ...) is kept as
an attribute::

    DeclaredProbe([
        {"id": "pim:0", "type": "pim", "name": "HBM-PIM", "memory_bytes": 16 << 30, "bandwidth_gbps": 1230},
        {"id": "remote:vllm-a", "type": "remote", "endpoint": "http://10.0.0.5:8000/v1",
         "tags": ["low-latency"]},
    ]).probe()

An invalid entry is skipped, and the reason says which one and why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from xpuflow.discovery.base import ProbeResult
from xpuflow.types import Resource, ResourceType

__all__ = ["DeclaredProbe"]

_TYPES = ", ".join(t.value for t in ResourceType)
_RESERVED = ("id", "type", "name", "tags", "attributes")


def _resource(entry: Any) -> Resource:
    """The entry as a Resource; ``ValueError`` naming the field when it is not one."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"must be a mapping with 'id' and 'type', got {type(entry).__name__}")
    resource_id = entry.get("id")
    if not isinstance(resource_id, str) or not resource_id.strip():
        raise ValueError("'id' must be a non-empty string such as 'pim:0' or 'remote:vllm-a'")
    raw_type = entry.get("type")
    try:
        resource_type = ResourceType(
            raw_type.value if isinstance(raw_type, ResourceType) else str(raw_type).lower()
        )
    except ValueError:
        raise ValueError(f"'type' must be one of {_TYPES}, got {raw_type!r}") from None
    name = entry.get("name", "")
    if not isinstance(name, str):
        raise ValueError(f"'name' must be a string, got {type(name).__name__}")
    tags = entry.get("tags", ())
    if isinstance(tags, str) or not isinstance(tags, Iterable) or not all(isinstance(t, str) for t in tags):
        raise ValueError("'tags' must be a list of strings such as ['low-latency']")

    nested = entry.get("attributes", {})
    if not isinstance(nested, Mapping):
        raise ValueError(f"'attributes' must be a mapping, got {type(nested).__name__}")
    attributes = {**nested, **{k: v for k, v in entry.items() if k not in _RESERVED}}
    for key in ("memory_bytes", "free_memory_bytes"):
        value = attributes.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"'{key}' must be a whole number of bytes >= 0, got {value!r}")
    return Resource(resource_id.strip(), resource_type, name, attributes, frozenset(tags), "declared")


class DeclaredProbe:
    """Turns config entries into resources. Never raises: invalid entries are skipped with a reason."""

    name = "declared"

    def __init__(self, entries: Iterable[Mapping[str, Any]] = ()) -> None:
        self.entries = list(entries)

    def probe(self) -> ProbeResult:
        if not self.entries:
            return ProbeResult.none("no devices declared in config")
        resources: list[Resource] = []
        skipped: list[str] = []
        for position, entry in enumerate(self.entries):
            label = f"entry {position}"
            if isinstance(entry, Mapping) and isinstance(entry.get("id"), str):
                label += f" ({entry['id']!r})"
            try:
                resource = _resource(entry)
            except ValueError as exc:
                skipped.append(f"{label}: {exc}")
                continue
            if any(r.id == resource.id for r in resources):
                skipped.append(f"{label}: id {resource.id!r} is declared twice; the first one is kept")
                continue
            resources.append(resource)

        skipped_text = f"; skipped {len(skipped)}: " + "; ".join(skipped) if skipped else ""
        if not resources:
            return ProbeResult.none(f"no valid declared devices{skipped_text}", skipped=skipped)
        listed = ", ".join(r.id for r in resources)
        return ProbeResult.found(
            resources, f"declared {len(resources)}: {listed}{skipped_text}", skipped=skipped
        )
