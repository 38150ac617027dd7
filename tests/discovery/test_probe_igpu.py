"""IntegratedGpuProbe on fake sysfs trees."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xpuflow.discovery.igpu import INTEGRATED_GPU_HOST_MEMORY_SHARE, IntegratedGpuProbe, is_discrete_intel_gpu
from xpuflow.types import ResourceType

if TYPE_CHECKING:
    from conftest import FakeSysfs

KIB = 1024


def test_intel_integrated_gpu_shares_host_memory(sysfs: FakeSysfs) -> None:
    sysfs.drm_card("card0", sysfs.pci_device("0000:00:02.0", 0x8086, 0xA7A0, driver="i915"))
    sysfs.meminfo(total_kib=32 << 20, available_kib=20 << 20)

    result = IntegratedGpuProbe(str(sysfs.root)).probe()

    (igpu,) = result.resources
    assert igpu.id == "igpu:0"
    assert igpu.type is ResourceType.IGPU
    assert igpu.vendor == "intel"
    assert igpu.attributes["driver"] == "i915"
    assert igpu.attributes["device_id"] == "0xa7a0"
    assert igpu.attributes["pci_bdf"] == "0000:00:02.0"
    assert igpu.attributes["shares_host_memory"] is True
    assert igpu.memory_bytes == int((32 << 20) * KIB * INTEGRATED_GPU_HOST_MEMORY_SHARE)
    assert igpu.free_memory_bytes == 16 << 30  # the share, since 20 GiB are available
    assert "low-power" in igpu.tags
    assert "igpu:0" in result.reason


def test_free_memory_is_capped_by_what_the_host_has_left(sysfs: FakeSysfs) -> None:
    sysfs.drm_card("card0", sysfs.pci_device("0000:00:02.0", 0x8086, 0x7D55, driver="xe"))
    sysfs.meminfo(total_kib=16 << 20, available_kib=3 << 20)

    (igpu,) = IntegratedGpuProbe(str(sysfs.root)).probe().resources

    assert igpu.memory_bytes == 8 << 30
    assert igpu.free_memory_bytes == 3 << 30
    assert igpu.attributes["driver"] == "xe"


def test_discrete_arc_is_a_gpu_and_other_vendors_are_left_alone(sysfs: FakeSysfs) -> None:
    sysfs.drm_card("card0", sysfs.pci_device("0000:00:02.0", 0x8086, 0x4680, driver="i915"))
    sysfs.drm_card("card1", sysfs.pci_device("0000:03:00.0", 0x8086, 0x56A0, driver="i915"))
    sysfs.drm_card("card2", sysfs.pci_device("0000:41:00.0", 0x10DE, 0x2684, driver="nvidia"))
    sysfs.drm_card("card3", sysfs.pci_device("0000:c1:00.0", 0x1002, 0x744C, driver="amdgpu"))
    sysfs.drm_card("card1-DP-1", None)  # a connector, not a card
    sysfs.drm_card("renderD128", None)
    sysfs.meminfo(total_kib=64 << 20, available_kib=60 << 20)

    result = IntegratedGpuProbe(str(sysfs.root)).probe()

    igpu, arc = result.resources
    assert (igpu.id, igpu.type) == ("igpu:0", ResourceType.IGPU)
    assert (arc.id, arc.type) == ("xe:0", ResourceType.GPU)
    assert arc.name == "Intel Arc A-series / Flex (DG2)"
    assert "shares_host_memory" not in arc.attributes
    assert arc.memory_bytes is None  # sysfs does not say how much VRAM a discrete card has
    assert "card2: NVIDIA (left to the nvidia probe)" in result.reason
    assert "card3: AMD (left to the amd probe)" in result.reason


def test_cards_without_pci_ids_or_driver(sysfs: FakeSysfs) -> None:
    sysfs.drm_card("card0", None)  # simpledrm: a firmware framebuffer with no PCI device
    sysfs.drm_card("card1", sysfs.pci_device("0000:00:02.0", 0x8086, 0x9A49))  # no driver bound

    result = IntegratedGpuProbe(str(sysfs.root)).probe()

    (igpu,) = result.resources
    assert igpu.attributes["driver"] == ""
    assert "no driver bound" in result.reason


def test_no_drm_class(sysfs: FakeSysfs) -> None:
    result = IntegratedGpuProbe(str(sysfs.root)).probe()
    assert result.resources == ()
    assert "no /sys/class/drm" in result.reason


def test_only_other_vendors(sysfs: FakeSysfs) -> None:
    sysfs.drm_card("card0", sysfs.pci_device("0000:41:00.0", 0x10DE, 0x2330, driver="nvidia"))

    result = IntegratedGpuProbe(str(sysfs.root)).probe()

    assert result.resources == ()
    assert result.reason == "no Intel GPU under /sys/class/drm (card0: NVIDIA (left to the nvidia probe))"


def test_discrete_id_table() -> None:
    assert is_discrete_intel_gpu(0x56A0)  # Arc A770
    assert is_discrete_intel_gpu(0xE20B)  # Arc B580
    assert is_discrete_intel_gpu(0x0BD5)  # Data Center GPU Max 1550
    assert not is_discrete_intel_gpu(0xA7A0)  # Raptor Lake-P Iris Xe
    assert not is_discrete_intel_gpu(0x7D55)  # Meteor Lake Arc graphics (integrated)


def test_on_this_machine_never_raises() -> None:
    result = IntegratedGpuProbe().probe()
    assert result.reason
