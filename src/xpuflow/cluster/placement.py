"""Where a deployment's replicas run in the cluster, and why: filter -> choose -> spread (pure).

``place_deployment`` takes the cluster inventory and what the backend can use, and returns one
``ReplicaPlacement`` per replica::

    placement = place_deployment(dep, cluster, usable=plugin.probe, advise=advisor, num_cpus=1.0)
    placement.replicas[0].node        # "node-a"
    placement.ray_resources           # {"CPU": 1.0}: what each replica reserves on its node
    placement.reason                  # "cpu: the advisor's choice among 3 nodes; spread over a, b"

1. Nodes: the alive nodes with an inventory, narrowed by the deployment's ``node`` (a name, id, IP or
   ``key=value`` label).
2. Devices: what the backend can use on each node, on nodes whose Ray resources have room for a worker.
3. Kind: ``device: auto`` lets the workload advisor choose among every node's devices; a device id names
   a kind (``cpu``, ``cuda:0``: on any node) or one device (``cpu@node-a``). The replicas go to devices
   like the chosen one (same local id).
4. Spread: replica i goes to the i-th of those devices round-robin (``spread``), or all to the first.

A deployment that fits nowhere fails with ``CapabilityError`` naming, node by node, why not and what
would fit. ``scheduling`` says how Ray keeps a replica there: a label selector when the deployment is
pinned by label (a like node that joins takes it over), a hard node affinity when pinned by id or IP,
else a soft affinity (after a node loss Ray restarts the replica on any node with room).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xpuflow.cluster.inventory import NODE_LABEL, ClusterInventory, ClusterNode
from xpuflow.cluster.resources import node_has_room, ray_resources_for
from xpuflow.config import DeploymentConfig
from xpuflow.errors import CapabilityError
from xpuflow.types import Resource

__all__ = ["ClusterPlacement", "ReplicaPlacement", "place_deployment"]

Usable = Callable[[Sequence[Resource]], Sequence[Resource]]
Advise = Callable[[Sequence[Resource]], tuple[str, str]]  # devices -> (chosen id, reason)


@dataclass(frozen=True)
class ReplicaPlacement:
    """One replica's node and device, and how Ray keeps it there."""

    index: int
    node: str
    node_id: str
    resource: Resource
    scheduling: Mapping[str, Any] = field(default_factory=dict)  # {"affinity": id, "soft": bool} or
    # {"labels": {...}}


@dataclass(frozen=True)
class ClusterPlacement:
    """A deployment's replicas across the cluster; ``reason`` says why there."""

    deployment: str
    backend: str
    replicas: tuple[ReplicaPlacement, ...]
    ray_resources: Mapping[str, float]
    reason: str

    @property
    def nodes(self) -> list[str]:
        return sorted({r.node for r in self.replicas})


def _local_id(resource: Resource) -> str:
    return str(resource.attributes.get("local_id", resource.id.split("@", 1)[0]))


def _usable_on(node: ClusterNode, usable: Usable) -> list[Resource]:
    """The node's devices the backend can use; probes see local ids ("cpu"), as on one machine."""
    by_local = {_local_id(r): r for r in node.resources}
    local = [Resource(_local_id(r), r.type, r.name, r.attributes, r.tags, r.source) for r in node.resources]
    return [by_local[r.id] for r in usable(local) if r.id in by_local]


def _scheduling(dep: DeploymentConfig, node: ClusterNode) -> dict[str, Any]:
    if dep.node is None:
        return {"affinity": node.node_id, "soft": True}
    if "=" in dep.node:
        key, _, value = dep.node.partition("=")
        return {"labels": {key.strip(): value.strip()}}
    if node.labels.get(NODE_LABEL) == dep.node:
        return {"labels": {NODE_LABEL: dep.node}}
    return {"affinity": node.node_id, "soft": False}


def place_deployment(
    dep: DeploymentConfig,
    cluster: ClusterInventory,
    *,
    usable: Usable,
    advise: Advise | None = None,
    num_cpus: float = 1.0,
    spread: bool = True,
) -> ClusterPlacement:
    """Place ``dep``'s replicas (see the module docstring). ``advise`` chooses among devices for
    ``device: auto`` (None: the first usable device). Raises ``CapabilityError``."""
    nodes = [n for n in cluster.alive if n.inventory is not None]
    why_not: list[str] = [f"{n.name}: {n.reason or 'no inventory'}" for n in cluster.nodes if n not in nodes]
    if dep.node is not None:
        pinned = [n for n in nodes if n.matches(dep.node)]
        if not pinned:
            names = ", ".join(f"{n.name} ({n.node_ip}, labels {dict(n.labels)})" for n in nodes) or "none"
            raise CapabilityError(
                f"deployment '{dep.name}': node '{dep.node}' names no alive node; nodes: {names}",
                reasons=why_not,
            )
        nodes = pinned
    candidates: list[Resource] = []
    room: dict[str, Mapping[str, float]] = {}
    owner: dict[str, ClusterNode] = {}
    for node in nodes:
        found = _usable_on(node, usable)
        if not found:
            kinds = ", ".join(r.id for r in node.resources) or "none"
            why_not.append(f"{node.name}: backend '{dep.backend}' can use none of its devices ({kinds})")
            continue
        for resource in found:
            wanted = ray_resources_for(resource.type, num_cpus=num_cpus)
            refusal = node_has_room(node.ray_resources, wanted)
            if refusal is not None:
                why_not.append(f"{resource.id}: {refusal}")
                continue
            candidates.append(resource)
            room[resource.id] = wanted
            owner[resource.id] = node
    if dep.device != "auto":
        wanted_id = dep.device
        chosen = [r for r in candidates if r.id == wanted_id or _local_id(r) == wanted_id]
        if not chosen:
            fits = ", ".join(r.id for r in candidates) or "none"
            raise CapabilityError(
                f"deployment '{dep.name}': device '{wanted_id}' is on no node that can run it; devices "
                f"that would fit: {fits}; or device: auto" + (f" ({'; '.join(why_not)})" if why_not else ""),
                reasons=why_not,
            )
        reason = f"{wanted_id} as configured"
    else:
        if not candidates:
            raise CapabilityError(
                f"deployment '{dep.name}' fits on no node of the cluster: {'; '.join(why_not) or 'no nodes'}",
                reasons=why_not,
            )
        if advise is not None and len({_local_id(r) for r in candidates}) > 1:
            chosen_id, reason = advise(candidates)
        else:
            chosen_id, reason = candidates[0].id, f"{_local_id(candidates[0])}: the only kind of device"
        like = _local_id(next(r for r in candidates if r.id == chosen_id))
        chosen = [r for r in candidates if _local_id(r) == like]
    if not spread:
        chosen = chosen[:1]
    replicas = []
    for index in range(dep.replicas):
        resource = chosen[index % len(chosen)]
        node = owner[resource.id]
        replicas.append(ReplicaPlacement(index, node.name, node.node_id, resource, _scheduling(dep, node)))
    spread_over = ", ".join(sorted({r.node for r in replicas}))
    return ClusterPlacement(
        dep.name,
        dep.backend,
        tuple(replicas),
        room[chosen[0].id],
        f"{reason}; replicas on {spread_over}",
    )
