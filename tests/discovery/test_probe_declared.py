"""DeclaredProbe: config entries become resources; invalid ones are skipped with a reason."""

from __future__ import annotations

from typing import Any

import pytest

from xpuflow.discovery.declared import DeclaredProbe
from xpuflow.types import ResourceType

PIM = {"id": "pim:0", "type": "pim", "name": "HBM-PIM", "memory_bytes": 16 << 30, "bandwidth_gbps": 1230}
REMOTE = {
    "id": "remote:vllm-a",
    "type": "remote",
    "name": "vLLM on gpu-node-3",
    "endpoint": "http://10.0.0.5:8000/v1",
    "tags": ["low-latency"],
}


def test_pim_and_remote_entries() -> None:
    result = DeclaredProbe([PIM, REMOTE]).probe()

    pim, remote = result.resources
    assert (pim.id, pim.type, pim.name) == ("pim:0", ResourceType.PIM, "HBM-PIM")
    assert pim.memory_bytes == 16 << 30
    assert pim.attributes["bandwidth_gbps"] == 1230
    assert "id" not in pim.attributes
    assert "type" not in pim.attributes
    assert remote.type is ResourceType.REMOTE
    assert remote.attributes["endpoint"] == "http://10.0.0.5:8000/v1"
    assert remote.tags == {"low-latency"}
    assert pim.source == remote.source == "declared"
    assert result.reason == "declared 2: pim:0, remote:vllm-a"


def test_nested_attributes_are_accepted() -> None:
    (resource,) = (
        DeclaredProbe([{"id": "pim:1", "type": "PIM", "attributes": {"vendor": "samsung"}}]).probe().resources
    )
    assert resource.vendor == "samsung"
    assert resource.type is ResourceType.PIM


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"type": "pim"}, "'id' must be a non-empty string"),
        ({"id": "x", "type": "fpga"}, "'type' must be one of gpu, igpu, npu, pim, cpu, remote, got 'fpga'"),
        (
            {"id": "x", "type": "pim", "memory_bytes": "16GiB"},
            "'memory_bytes' must be a whole number of bytes",
        ),
        ({"id": "x", "type": "pim", "memory_bytes": -1}, "'memory_bytes' must be a whole number of bytes"),
        ({"id": "x", "type": "pim", "tags": "low-power"}, "'tags' must be a list of strings"),
        ({"id": "x", "type": "pim", "name": 7}, "'name' must be a string"),
        ("pim:0", "must be a mapping"),
    ],
)
def test_invalid_entries_are_skipped_with_the_reason(entry: Any, message: str) -> None:
    result = DeclaredProbe([entry, PIM]).probe()

    assert [r.id for r in result.resources] == ["pim:0"]
    assert "skipped 1: entry 0" in result.reason
    assert message in result.reason
    assert len(result.details["skipped"]) == 1


def test_duplicate_ids_keep_the_first() -> None:
    result = DeclaredProbe([PIM, {**PIM, "name": "other"}]).probe()

    (pim,) = result.resources
    assert pim.name == "HBM-PIM"
    assert "declared twice" in result.reason


def test_nothing_declared() -> None:
    assert DeclaredProbe([]).probe().reason == "no devices declared in config"


def test_only_invalid_entries() -> None:
    result = DeclaredProbe([{"id": ""}]).probe()
    assert result.resources == ()
    assert result.reason.startswith("no valid declared devices; skipped 1: entry 0")
