from __future__ import annotations

import pytest

from xpuflow.types import (
    Alternative,
    Capability,
    Precision,
    Resource,
    ResourceType,
    RoutingDecision,
)


def test_resource_is_immutable_and_typed() -> None:
    r = Resource("cuda:0", "gpu", "H100", {"memory_bytes": 80 << 30}, {"fast"})
    assert r.type is ResourceType.GPU
    assert r.memory_bytes == 80 << 30
    assert r.free_memory_bytes == 80 << 30  # falls back to total when free is unknown
    with pytest.raises(TypeError):
        r.attributes["memory_bytes"] = 1  # type: ignore[index]
    updated = r.with_attributes(free_memory_bytes=1 << 30)
    assert updated.free_memory_bytes == 1 << 30
    assert r.free_memory_bytes == 80 << 30


def test_resource_rejects_empty_id_and_unknown_type() -> None:
    with pytest.raises(ValueError, match="non-empty id"):
        Resource("", ResourceType.CPU)
    with pytest.raises(ValueError):
        Resource("x", "quantum")  # type: ignore[arg-type]


def test_resource_to_dict_is_json_ready() -> None:
    r = Resource("cpu", ResourceType.CPU, attributes={"isa_features": ("avx2", "fma")}, tags={"b", "a"})
    d = r.to_dict()
    assert d["type"] == "cpu"
    assert d["tags"] == ["a", "b"]
    assert d["attributes"]["isa_features"] == ["avx2", "fma"]


def test_precision_bytes() -> None:
    assert Precision("int4").bytes_per_param == 0.5
    assert Precision.BF16.is_float16
    assert Precision.INT8.is_integer


def test_capability_validates() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        Capability(max_batch_size=0)
    cap = Capability(unsupported={"embeddings": "not an encoder model"})
    assert cap.to_dict()["unsupported"] == {"embeddings": "not an encoder model"}


def test_routing_decision_confidence_bounds_and_dict() -> None:
    with pytest.raises(ValueError, match="confidence"):
        RoutingDecision("cpu", "r", 1.5)
    d = RoutingDecision("cpu", "fits", 0.7, (Alternative("cuda:0", "too small", 0.1),)).to_dict()
    assert d["alternatives"] == [{"candidate": "cuda:0", "reason": "too small", "score": 0.1}]
