"""What crosses between the gateway and a worker on another node, as plain picklable data.

Requests travel without their ``asyncio.Event`` (cancellation travels as ``ray.cancel``) and with the
time left instead of a deadline and the time already waited instead of when it first queued (monotonic
clocks differ between machines). Errors travel as
``WireError`` and are raised again as the same xpuflow error class on the gateway, so the dispatcher's
retry rules see exactly what a local worker would raise::

    wire = request_to_wire(request, now_s=clock.monotonic())
    request = request_from_wire(wire, now_s=other_clock.monotonic())   # on the worker's node
    raise error_from_wire(error_to_wire(exc))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xpuflow.discovery.base import ProbeReport
from xpuflow.discovery.inventory import Inventory
from xpuflow.errors import (
    AdmissionRejected,
    CapabilityError,
    ConfigError,
    DeadlineExceeded,
    QueueFull,
    RemoteError,
    RequestCancelled,
    SessionError,
    XpuflowError,
)
from xpuflow.scheduling.request import Priority, RequestKind, WorkRequest
from xpuflow.types import Resource, ResourceType

__all__ = [
    "WireError",
    "error_from_wire",
    "error_to_wire",
    "inventory_from_wire",
    "inventory_to_wire",
    "request_from_wire",
    "request_to_wire",
    "resource_from_wire",
    "resource_to_wire",
]


def request_to_wire(request: WorkRequest, *, now_s: float) -> dict[str, Any]:
    return {
        "kind": request.kind.value,
        "payload": request.payload,
        "params": request.params,
        "priority": int(request.priority),
        "stream": request.stream,
        "timeout_s": None if request.deadline_s is None else max(0.0, request.deadline_s - now_s),
        "request_id": request.request_id,
        "metadata": dict(request.metadata),
        "waited_s": None if request.queued_since_s is None else max(0.0, now_s - request.queued_since_s),
    }


def request_from_wire(wire: Mapping[str, Any], *, now_s: float) -> WorkRequest:
    timeout_s = wire.get("timeout_s")
    waited_s = wire.get("waited_s")
    return WorkRequest(
        RequestKind(wire["kind"]),
        wire["payload"],
        wire["params"],
        priority=Priority(wire["priority"]),
        stream=bool(wire["stream"]),
        deadline_s=None if timeout_s is None else now_s + float(timeout_s),
        request_id=str(wire["request_id"]),
        metadata=dict(wire.get("metadata") or {}),
        queued_since_s=None if waited_s is None else now_s - float(waited_s),
    )


@dataclass(frozen=True)
class WireError:
    """An error raised beside the device, as data: its kind, message and the fields retries read."""

    kind: str
    message: str
    retry_after_s: float | None = None
    retryable: bool = False
    status: int | None = None
    field: str | None = None


_KINDS: tuple[tuple[str, type[BaseException]], ...] = (
    ("config", ConfigError),
    ("capability", CapabilityError),
    ("queue_full", QueueFull),
    ("admission", AdmissionRejected),
    ("deadline", DeadlineExceeded),
    ("cancelled", RequestCancelled),
    ("remote", RemoteError),
)


def error_to_wire(exc: BaseException) -> WireError:
    for kind, cls in _KINDS:
        if isinstance(exc, cls):
            return WireError(
                kind,
                str(exc),
                retry_after_s=getattr(exc, "retry_after_s", None),
                retryable=bool(getattr(exc, "retryable", False)),
                status=getattr(exc, "status", None),
                field=getattr(exc, "field", None),
            )
    if isinstance(exc, XpuflowError):
        return WireError("session", str(exc))
    return WireError("session", f"{type(exc).__name__}: {exc}")


def error_from_wire(error: WireError) -> XpuflowError:
    """The xpuflow error that ``error`` describes (``SessionError`` for anything else: retryable)."""
    kind, message = error.kind, error.message
    if kind == "config":
        return ConfigError(message, field=error.field)
    if kind == "capability":
        return CapabilityError(message)
    if kind == "queue_full":
        return QueueFull(message, retry_after_s=error.retry_after_s or 0.0)
    if kind == "admission":
        return AdmissionRejected(message, retry_after_s=error.retry_after_s or 0.0)
    if kind == "deadline":
        return DeadlineExceeded(message)
    if kind == "cancelled":
        return RequestCancelled(message)
    if kind == "remote":
        return RemoteError(
            message, status=error.status, retryable=error.retryable, retry_after_s=error.retry_after_s
        )
    return SessionError(message)


def resource_to_wire(resource: Resource) -> dict[str, Any]:
    return {
        "id": resource.id,
        "type": resource.type.value,
        "name": resource.name,
        "attributes": dict(resource.attributes),
        "tags": sorted(resource.tags),
        "source": resource.source,
    }


def resource_from_wire(wire: Mapping[str, Any], **extra_attributes: Any) -> Resource:
    return Resource(
        str(wire["id"]),
        ResourceType(wire["type"]),
        str(wire.get("name", "")),
        {**dict(wire.get("attributes") or {}), **extra_attributes},
        frozenset(wire.get("tags") or ()),
        str(wire.get("source", "")),
    )


def inventory_to_wire(inventory: Inventory) -> dict[str, Any]:
    return {
        "resources": [resource_to_wire(r) for r in inventory.resources],
        "reports": [
            {"probe": r.probe, "found": r.found, "reason": r.reason, "elapsed_ms": r.elapsed_ms}
            for r in inventory.reports
        ],
    }


def inventory_from_wire(wire: Mapping[str, Any], resources: Sequence[Resource] | None = None) -> Inventory:
    reports = tuple(
        ProbeReport(str(r["probe"]), int(r["found"]), str(r["reason"]), float(r["elapsed_ms"]))
        for r in wire.get("reports") or ()
    )
    found = resources if resources is not None else [resource_from_wire(r) for r in wire["resources"]]
    return Inventory(tuple(found), reports)
