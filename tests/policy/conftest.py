"""Hand-built inventories for the advisor tests: a workstation, a laptop, a bare CPU box."""

from __future__ import annotations

import pytest

from xpuflow.discovery.inventory import Inventory
from xpuflow.types import Resource, ResourceType

GIB = 1 << 30

AMX_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def xeon(free_gib: float = 480, total_gib: float = 512) -> Resource:
    return Resource(
        "cpu",
        ResourceType.CPU,
        "Intel Xeon Platinum 8480+",
        {
            "vendor": "intel",
            "memory_bytes": int(total_gib * GIB),
            "free_memory_bytes": int(free_gib * GIB),
            "physical_cores": 56,
            "logical_cores": 112,
            "frequency_mhz": 2000.0,
            "isa_features": AMX_FEATURES,
        },
    )


def nvidia(rid: str, *, total_gib: float, free_gib: float, cc: str, name: str, watts: float) -> Resource:
    return Resource(
        rid,
        ResourceType.GPU,
        name,
        {
            "vendor": "nvidia",
            "memory_bytes": int(total_gib * GIB),
            "free_memory_bytes": int(free_gib * GIB),
            "compute_capability": cc,
            "power_limit_w": watts,
        },
    )


def workstation_resources() -> list[Resource]:
    """An 8 GB GPU, an 80 GB GPU and a CPU with AMX."""
    return [
        xeon(),
        nvidia("cuda:0", total_gib=8, free_gib=7.5, cc="8.6", name="NVIDIA GeForce RTX 3070", watts=220),
        nvidia("cuda:1", total_gib=80, free_gib=79, cc="9.0", name="NVIDIA H100 80GB HBM3", watts=700),
    ]


def laptop_resources() -> list[Resource]:
    """A laptop: 16 GiB of RAM shared by the CPU, an Intel iGPU and an Intel NPU of unknown memory."""
    return [
        Resource(
            "cpu",
            ResourceType.CPU,
            "Intel Core Ultra 7 155H",
            {
                "vendor": "intel",
                "memory_bytes": 16 * GIB,
                "free_memory_bytes": 10 * GIB,
                "physical_cores": 16,
                "logical_cores": 22,
                "frequency_mhz": 3800.0,
                "isa_features": ("avx2", "fma", "avx_vnni"),
            },
        ),
        Resource("igpu:0", ResourceType.IGPU, "Intel Arc Graphics", {"vendor": "intel"}),
        Resource(
            "npu:0", ResourceType.NPU, "Intel AI Boost", {"vendor": "intel", "shares_host_memory": True}
        ),
    ]


@pytest.fixture
def workstation() -> Inventory:
    return Inventory.of(workstation_resources())


@pytest.fixture
def laptop() -> Inventory:
    return Inventory.of(laptop_resources())


@pytest.fixture
def cpu_only() -> Inventory:
    return Inventory.of([xeon(free_gib=60, total_gib=64)])
