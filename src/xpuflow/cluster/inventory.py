"""The cluster's hardware: discovery run on every node, merged into one inventory.

One Ray task per alive node, pinned to it (``NodeAffinitySchedulingStrategy``, not soft), runs the same
probes ``xpuflow info`` runs; each device comes back carrying its node (``node_id``, ``node_ip``,
``node`` attributes) and an id that names it (``cpu@node-a``, ``cuda:0@node-b``)::

    cluster = ClusterInventory.detect(declared=config.declared_resources())
    cluster.nodes                     # every node: name, id, IP, labels, Ray resources, devices or why none
    cluster.as_inventory().resources  # every device of every alive node, for the workload advisor
    cluster.to_dict()                 # what `xpuflow info --cluster --json` prints

A node's name is its ``xpuflow-node`` label when it has one, else its IP when that is unique in the
cluster, else the first 8 characters of its Ray node id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xpuflow.cluster.connection import import_ray
from xpuflow.cluster.messages import inventory_from_wire, inventory_to_wire, resource_from_wire
from xpuflow.discovery.inventory import Inventory
from xpuflow.types import Resource

__all__ = ["NODE_LABEL", "ClusterInventory", "ClusterNode", "discover_here"]

log = logging.getLogger(__name__)

#: The node label that names a node (``ray start --labels xpuflow-node=gpu-box-1``).
NODE_LABEL = "xpuflow-node"


def discover_here(declared: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """This node's inventory as plain data (what the pinned task runs). torch is not probed: it costs
    seconds per node and NVML already finds NVIDIA GPUs."""
    import ray

    inventory = Inventory.detect(declared=declared, torch=False)
    wire = inventory_to_wire(inventory)
    wire["node_id"] = ray.get_runtime_context().get_node_id()
    return wire


@dataclass(frozen=True)
class ClusterNode:
    """One Ray node: who it is, what Ray may place on it, and the devices discovery found there."""

    node_id: str
    node_ip: str
    name: str
    alive: bool
    labels: Mapping[str, str] = field(default_factory=dict)
    ray_resources: Mapping[str, float] = field(default_factory=dict)
    inventory: Inventory | None = None
    reason: str = ""  # why there is no inventory (dead, discovery failed or timed out)
    is_head: bool = False

    @property
    def resources(self) -> tuple[Resource, ...]:
        return self.inventory.resources if self.inventory is not None else ()

    def matches(self, selector: str) -> bool:
        """Whether ``selector`` (a name, node id, id prefix of 8+ characters, IP, or 'key=value'
        label) names this node."""
        if "=" in selector:
            key, _, value = selector.partition("=")
            return self.labels.get(key.strip()) == value.strip()
        return selector in (self.name, self.node_id, self.node_ip) or (
            len(selector) >= 8 and self.node_id.startswith(selector)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "alive": self.alive,
            "head": self.is_head,
            "labels": dict(self.labels),
            "ray_resources": dict(self.ray_resources),
            "devices": [r.to_dict() for r in self.resources],
            "probes": [r.to_dict() for r in self.inventory.reports] if self.inventory else [],
            "reason": self.reason,
        }


def _node_names(nodes: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    ips = [n.get("NodeManagerAddress", "") for n in nodes if n.get("Alive")]
    names = {}
    for node in nodes:
        labels = node.get("Labels") or {}
        ip = node.get("NodeManagerAddress", "")
        if labels.get(NODE_LABEL):
            names[node["NodeID"]] = str(labels[NODE_LABEL])
        elif ip and ips.count(ip) == 1:
            names[node["NodeID"]] = ip
        else:
            names[node["NodeID"]] = node["NodeID"][:8]
    return names


@dataclass(frozen=True)
class ClusterInventory:
    """Every node of the cluster with its devices. See the module docstring."""

    nodes: tuple[ClusterNode, ...]
    detected_at_s: float = 0.0

    @classmethod
    def detect(
        cls, *, declared: Sequence[Mapping[str, Any]] = (), timeout_s: float = 60.0
    ) -> ClusterInventory:
        """Run discovery on every alive node (in parallel) and merge. Never raises for one node: a node
        whose discovery fails or times out is listed with the reason."""
        ray = import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        listed = [n for n in ray.nodes() if n.get("NodeID")]
        names = _node_names(listed)
        task = ray.remote(num_cpus=0, max_retries=0)(discover_here)
        pending = {}
        for node in listed:
            if node.get("Alive"):
                strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                ref = task.options(scheduling_strategy=strategy).remote(list(declared))
                pending[node["NodeID"]] = ref
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout_s)
        ready_set = set(ready)
        nodes = []
        for node in listed:
            node_id = node["NodeID"]
            inventory, reason = None, "" if node.get("Alive") else "the node is dead"
            ref = pending.get(node_id)
            if ref is not None:
                if ref in ready_set:
                    try:
                        inventory = cls._localise(ray.get(ref), node, names[node_id])
                    except Exception as exc:  # one node's failure must not hide the others
                        reason = f"discovery failed: {type(exc).__name__}: {exc}"
                else:
                    ray.cancel(ref, force=True)
                    reason = f"discovery did not answer within {timeout_s:g} s"
            resources = {k: float(v) for k, v in (node.get("Resources") or {}).items()}
            nodes.append(
                ClusterNode(
                    node_id,
                    str(node.get("NodeManagerAddress", "")),
                    names[node_id],
                    bool(node.get("Alive")),
                    dict(node.get("Labels") or {}),
                    resources,
                    inventory,
                    reason,
                    is_head="node:__internal_head__" in resources,
                )
            )
        nodes.sort(key=lambda n: (not n.is_head, n.name))
        return cls(tuple(nodes), time.time())

    @staticmethod
    def _localise(wire: Mapping[str, Any], node: Mapping[str, Any], name: str) -> Inventory:
        """Give each device its node: attributes and a cluster-wide id."""
        ip = str(node.get("NodeManagerAddress", ""))
        resources = []
        for item in wire["resources"]:
            local = resource_from_wire(item)
            resources.append(
                resource_from_wire(
                    {**item, "id": f"{local.id}@{name}"},
                    node=name,
                    node_id=node["NodeID"],
                    node_ip=ip,
                    local_id=local.id,
                )
            )
        return inventory_from_wire(wire, resources)

    @property
    def alive(self) -> tuple[ClusterNode, ...]:
        return tuple(n for n in self.nodes if n.alive)

    @property
    def resources(self) -> tuple[Resource, ...]:
        return tuple(r for n in self.alive for r in n.resources)

    def as_inventory(self) -> Inventory:
        """Every alive node's devices as one ``Inventory`` (ids ``<device>@<node>``)."""
        return Inventory.of(self.resources)

    def node(self, selector: str) -> ClusterNode | None:
        return next((n for n in self.alive if n.matches(selector)), None)

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": [n.to_dict() for n in self.nodes]}
