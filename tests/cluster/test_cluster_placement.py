"""Cluster placement, messages and config without a cluster (pure parts)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from xpuflow.backends.base import GenerationParams
from xpuflow.cluster.inventory import ClusterInventory, ClusterNode
from xpuflow.cluster.messages import (
    error_from_wire,
    error_to_wire,
    request_from_wire,
    request_to_wire,
    resource_from_wire,
    resource_to_wire,
)
from xpuflow.cluster.placement import place_deployment
from xpuflow.cluster.resources import node_has_room, ray_resources_for
from xpuflow.config import DeploymentConfig, parse_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.errors import (
    AdmissionRejected,
    CapabilityError,
    ConfigError,
    QueueFull,
    RemoteError,
    SessionError,
)
from xpuflow.scheduling.request import Priority, WorkRequest
from xpuflow.types import Resource, ResourceType


def _node(name: str, *devices: tuple[str, ResourceType], cpus: float = 4, **extra: float) -> ClusterNode:
    node_id = (name * 8)[:8] + "0" * 48
    resources = [
        Resource(f"{local}@{name}", kind, attributes={"local_id": local, "node": name, "node_id": node_id})
        for local, kind in devices
    ]
    return ClusterNode(
        node_id,
        "10.0.0." + str(len(name)),
        name,
        True,
        {"xpuflow-node": name, "zone": "z-" + name},
        {"CPU": cpus, **extra},
        Inventory.of(resources),
    )


def _all(resources: Sequence[Resource]) -> Sequence[Resource]:
    return resources


CPU = ("cpu", ResourceType.CPU)
NPU = ("npu:0", ResourceType.NPU)


def test_replicas_spread_over_the_nodes_with_a_like_device() -> None:
    cluster = ClusterInventory((_node("a", CPU), _node("b", CPU), _node("c", CPU)))
    dep = DeploymentConfig(name="chat", backend="fake", device="cpu", replicas=4)
    placement = place_deployment(dep, cluster, usable=_all)
    assert [r.node for r in placement.replicas] == ["a", "b", "c", "a"]
    assert placement.ray_resources == {"CPU": 1.0}
    assert placement.replicas[0].scheduling == {"affinity": cluster.nodes[0].node_id, "soft": True}


def test_auto_asks_the_advisor_over_every_node() -> None:
    cluster = ClusterInventory((_node("a", CPU), _node("b", CPU, NPU, accel_npu=1)))
    dep = DeploymentConfig(name="chat", backend="fake", replicas=2)
    placement = place_deployment(dep, cluster, usable=_all, advise=lambda d: ("npu:0@b", "npu wins"))
    assert {r.resource.id for r in placement.replicas} == {"npu:0@b"}
    assert placement.ray_resources == {"accel_npu": 1.0}
    assert placement.reason.startswith("npu wins")


def test_a_pinned_label_keeps_replicas_on_like_nodes() -> None:
    cluster = ClusterInventory((_node("a", CPU), _node("b", CPU)))
    dep = DeploymentConfig(name="chat", backend="fake", device="cpu", node="zone=z-b", replicas=2)
    placement = place_deployment(dep, cluster, usable=_all)
    assert {r.node for r in placement.replicas} == {"b"}
    assert placement.replicas[0].scheduling == {"labels": {"zone": "z-b"}}
    by_name = place_deployment(dep.model_copy(update={"node": "a"}), cluster, usable=_all)
    assert by_name.replicas[0].scheduling == {"labels": {"xpuflow-node": "a"}}


def test_what_fits_nowhere_says_what_would() -> None:
    cluster = ClusterInventory((_node("a", CPU), _node("b", CPU, NPU)))  # b has no accel_npu resource
    with pytest.raises(CapabilityError, match="would fit: cpu@a, cpu@b") as caught:
        place_deployment(DeploymentConfig(name="x", backend="fake", device="npu:0"), cluster, usable=_all)
    assert any("accel_npu" in r for r in caught.value.reasons)
    with pytest.raises(CapabilityError, match="names no alive node"):
        place_deployment(DeploymentConfig(name="x", backend="fake", node="zz"), cluster, usable=_all)
    with pytest.raises(CapabilityError, match="fits on no node"):
        place_deployment(
            DeploymentConfig(name="x", backend="fake"),
            ClusterInventory((_node("a", CPU, cpus=0),)),
            usable=_all,
        )


def test_ray_resources_of_device_types() -> None:
    assert ray_resources_for(ResourceType.GPU) == {"GPU": 1.0}
    assert ray_resources_for(ResourceType.CPU, num_cpus=0) == {}
    assert ray_resources_for(ResourceType.NPU, memory_bytes=10) == {"accel_npu": 1.0, "memory": 10.0}
    assert node_has_room({"CPU": 1}, {"CPU": 2.0}) == "needs CPU=2, the node offers 1"


def test_requests_results_and_errors_cross_intact() -> None:
    request = WorkRequest.chat(
        [{"role": "user", "content": "hi"}],
        GenerationParams(max_tokens=3),
        priority=Priority.HIGH,
        deadline_s=15.0,
        queued_since_s=7.5,
    )
    back = request_from_wire(request_to_wire(request, now_s=10.0), now_s=100.0)
    assert (back.priority, back.deadline_s, back.queued_since_s, back.request_id, back.payload) == (
        Priority.HIGH,
        105.0,
        97.5,  # waited 2.5 s before it crossed: a retry keeps its place in the next queue
        request.request_id,
        request.payload,
    )
    assert isinstance(error_from_wire(error_to_wire(ConfigError("bad", field="x"))), ConfigError)
    full = error_from_wire(error_to_wire(QueueFull("full", retry_after_s=2.0)))
    assert isinstance(full, AdmissionRejected)
    assert full.retry_after_s == 2.0
    remote = error_from_wire(error_to_wire(RemoteError("503", status=503, retryable=True)))
    assert isinstance(remote, RemoteError)
    assert remote.retryable
    assert isinstance(error_from_wire(error_to_wire(RuntimeError("boom"))), SessionError)
    resource = Resource("cpu", ResourceType.CPU, attributes={"memory_bytes": 5}, tags=frozenset({"x"}))
    assert resource_from_wire(resource_to_wire(resource)) == resource


def test_cluster_config_section() -> None:
    assert parse_config({}).cluster is None
    cfg = parse_config({"cluster": {"address": "local"}})
    assert cfg.cluster is not None
    assert cfg.cluster.engine == "ray"
    assert parse_config({"cluster": {"address": "ray://head:10001"}}).cluster is not None
    with pytest.raises(ConfigError, match=r"cluster.address"):
        parse_config({"cluster": {"address": "somewhere"}})
    with pytest.raises(ConfigError, match=r"cluster.engine"):
        parse_config({"cluster": {"engine": "k8s"}})
