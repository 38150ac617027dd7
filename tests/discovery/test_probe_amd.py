"""AmdProbe against a small stand-in for the amdsmi module (its real call names and return shapes)."""

from __future__ import annotations

import enum
from typing import Any

from xpuflow.discovery.amd import AmdProbe
from xpuflow.types import ResourceType

GIB = 1 << 30


class AmdSmiException(Exception):
    pass


class AmdSmiMemoryType(enum.IntEnum):
    VRAM = 0
    VIS_VRAM = 1
    GTT = 2


class FakeAmdSmi:
    """amdsmi's module surface as the probe uses it; ``failing`` names calls that raise."""

    AmdSmiException = AmdSmiException
    AmdSmiMemoryType = AmdSmiMemoryType

    def __init__(
        self, gpus: list[dict[str, Any]], *, fail_init: bool = False, failing: set[str] = frozenset()
    ):
        self.gpus = gpus
        self.fail_init = fail_init
        self.failing = failing
        self.initialized = False
        self.shut_down = 0

    def _check(self, call: str) -> None:
        if not self.initialized:
            raise AmdSmiException("AMDSMI_STATUS_NOT_INIT")
        if call in self.failing:
            raise AmdSmiException(f"{call}: AMDSMI_STATUS_NOT_SUPPORTED")

    def amdsmi_init(self, flags: int = 2) -> None:
        if self.fail_init:
            raise AmdSmiException("Error code:\n\t34 | AMDSMI_STATUS_DRIVER_NOT_LOADED - Driver not loaded")
        self.initialized = True

    def amdsmi_shut_down(self) -> None:
        self.initialized = False
        self.shut_down += 1

    def amdsmi_get_processor_handles(self) -> list[int]:
        self._check("amdsmi_get_processor_handles")
        return list(range(len(self.gpus)))

    def amdsmi_get_gpu_asic_info(self, handle: int) -> dict[str, Any]:
        self._check("amdsmi_get_gpu_asic_info")
        return dict(self.gpus[handle]["asic"])

    def amdsmi_get_gpu_memory_total(self, handle: int, mem_type: AmdSmiMemoryType) -> int:
        self._check("amdsmi_get_gpu_memory_total")
        assert mem_type is AmdSmiMemoryType.VRAM
        return int(self.gpus[handle]["vram_total"])

    def amdsmi_get_gpu_memory_usage(self, handle: int, mem_type: AmdSmiMemoryType) -> int:
        self._check("amdsmi_get_gpu_memory_usage")
        assert mem_type is AmdSmiMemoryType.VRAM
        return int(self.gpus[handle]["vram_used"])


MI300X = {
    "asic": {
        "market_name": "AMD Instinct MI300X",
        "vendor_id": "0x1002",
        "vendor_name": "Advanced Micro Devices Inc. [AMD/ATI]",
        "subvendor_id": "0x1002",
        "device_id": "0x74a1",
        "rev_id": "0x00",
        "asic_serial": "0x3F2B1C5D7E8A9B0C",
        "oam_id": 0,
        "num_compute_units": 304,
        "target_graphics_version": "gfx942",
    },
    "vram_total": 192 * GIB,
    "vram_used": 2 * GIB,
}
RX7900XTX = {
    "asic": {
        "market_name": "Radeon RX 7900 XTX",
        "vendor_id": "0x1002",
        "device_id": "0x744c",
        "num_compute_units": 96,
        "target_graphics_version": "gfx1100",
        "oam_id": "N/A",
    },
    "vram_total": 24 * GIB,
    "vram_used": 512 << 20,
}


def test_two_gpus() -> None:
    amdsmi = FakeAmdSmi([MI300X, RX7900XTX])

    result = AmdProbe(amdsmi=amdsmi).probe()

    mi300x, radeon = result.resources
    assert (mi300x.id, radeon.id) == ("rocm:0", "rocm:1")
    assert mi300x.type is ResourceType.GPU
    assert mi300x.vendor == "amd"
    assert mi300x.name == "AMD Instinct MI300X"
    assert mi300x.memory_bytes == 192 * GIB
    assert mi300x.free_memory_bytes == 190 * GIB
    assert mi300x.attributes["gfx_target"] == "gfx942"
    assert mi300x.attributes["device_id"] == "0x74a1"
    assert mi300x.attributes["compute_units"] == 304
    assert radeon.memory_bytes == 24 * GIB
    assert radeon.attributes["gfx_target"] == "gfx1100"
    assert result.details["errors"] == []
    assert amdsmi.shut_down == 1
    assert "rocm:0 AMD Instinct MI300X 192.0 GiB" in result.reason


def test_failing_memory_usage_keeps_the_gpu() -> None:
    amdsmi = FakeAmdSmi([MI300X], failing={"amdsmi_get_gpu_memory_usage"})

    result = AmdProbe(amdsmi=amdsmi).probe()

    (gpu,) = result.resources
    assert gpu.memory_bytes == 192 * GIB
    assert "used_memory_bytes" not in gpu.attributes
    assert result.details["errors"][0]["call"] == "amdsmi_get_gpu_memory_usage"
    assert "1 amdsmi call failed" in result.reason


def test_init_failure_names_the_driver() -> None:
    amdsmi = FakeAmdSmi([MI300X], fail_init=True)

    result = AmdProbe(amdsmi=amdsmi).probe()

    assert result.resources == ()
    assert "amdgpu driver" in result.reason
    assert "DRIVER_NOT_LOADED" in result.reason
    assert amdsmi.shut_down == 0


def test_shut_down_follows_a_failed_listing() -> None:
    amdsmi = FakeAmdSmi([MI300X], failing={"amdsmi_get_processor_handles"})

    result = AmdProbe(amdsmi=amdsmi).probe()

    assert result.resources == ()
    assert "could not list GPUs" in result.reason
    assert amdsmi.shut_down == 1


def test_no_gpus() -> None:
    result = AmdProbe(amdsmi=FakeAmdSmi([])).probe()
    assert result.resources == ()
    assert result.reason == "amdsmi reports no AMD GPUs"


def test_on_this_machine_never_raises() -> None:
    result = AmdProbe().probe()
    assert result.reason
    assert all(r.id.startswith("rocm:") for r in result.resources)
