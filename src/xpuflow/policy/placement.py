"""Placement: which device a deployment runs on, and whether its backend can serve it there. Pure
functions of the deployment, the devices its backend can use and the backend's ``Capability``: no I/O,
so ``xpuflow check``, the orchestrator and tests decide alike::

    placement = place(dep, usable, params=1.3e8)            # device: auto -> the workload advisor
    problems, notes = capability_problems(dep, capability)  # after the build: refuse or clamp
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from xpuflow.config import DeploymentConfig
from xpuflow.discovery.inventory import Inventory
from xpuflow.errors import CapabilityError
from xpuflow.types import Capability, Resource

__all__ = ["Placement", "capability_problems", "place"]


@dataclass(frozen=True)
class Placement:
    """Where a deployment runs and why."""

    deployment: str
    backend: str
    resources: tuple[Resource, ...]
    reason: str


def place(dep: DeploymentConfig, usable: Sequence[Resource], *, params: float | None = None) -> Placement:
    """The device of ``dep`` among ``usable`` (the devices its backend can use). An explicit device must
    be one of them; ``auto`` takes the only one, or asks the workload advisor for a model of ``params``
    parameters. Raises CapabilityError naming the devices that would work."""
    if not usable:
        raise CapabilityError(
            f"deployment '{dep.name}': backend '{dep.backend}' can use no device found here"
        )
    if dep.device != "auto":
        chosen = next((r for r in usable if r.id == dep.device), None)
        if chosen is None:
            raise CapabilityError(
                f"deployment '{dep.name}': device '{dep.device}' is not usable by backend "
                f"'{dep.backend}'; usable: {', '.join(r.id for r in usable)}, or device: auto"
            )
        return Placement(dep.name, dep.backend, (chosen,), f"{dep.device} as configured")
    if len(usable) == 1 or params is None:
        return Placement(dep.name, dep.backend, (usable[0],), f"{usable[0].id}: the only choice")
    from xpuflow.policy.advisor import advise_workload

    decision = advise_workload(
        Inventory.of(list(usable)), params, batch_size=dep.max_batch_size, precision=dep.precision
    )
    chosen = next(r for r in usable if r.id == decision.device)
    return Placement(dep.name, dep.backend, (chosen,), decision.reason)


_TASK_FEATURE = {"chat": "chat", "completion": "chat", "embedding": "embeddings"}


def capability_problems(dep: DeploymentConfig, capability: Capability) -> tuple[list[str], list[str]]:
    """What ``capability`` (the backend on the placed device) says of ``dep``: problems that make it
    unservable (its task, its precision), and notes on settings it lowers (batch size, context length).
    Each is a sentence with the backend's own reason where it gave one."""
    problems: list[str] = []
    notes: list[str] = []
    feature = _TASK_FEATURE.get(dep.task)
    supported = {
        "chat": capability.supports_chat,
        "embeddings": capability.supports_embeddings,
    }
    if feature is not None and not supported[feature]:
        why = capability.unsupported.get(feature) or capability.unsupported.get(dep.task) or "not supported"
        problems.append(f"task {dep.task}: {why}")
    if capability.dtypes and dep.precision not in capability.dtypes:
        problems.append(
            f"precision {dep.precision}: the backend runs {', '.join(capability.dtypes)} here; set precision "
            f"to one of them"
        )
    if dep.max_seq_len > capability.max_seq_len:
        notes.append(
            f"context {capability.max_seq_len} tokens (the backend's limit; max_seq_len asks "
            f"{dep.max_seq_len})"
        )
    if dep.max_batch_size > capability.max_batch_size:
        notes.append(
            f"batches of at most {capability.max_batch_size} (the backend's limit; max_batch_size asks "
            f"{dep.max_batch_size})"
        )
    return problems, notes
