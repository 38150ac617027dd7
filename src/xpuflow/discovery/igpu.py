"""Intel graphics found in sysfs: integrated GPUs ("igpu:N") and discrete Intel Arc cards ("xe:N").

Every DRM card lists its PCI ids under ``/sys/class/drm/cardN/device/{vendor,device}`` and its kernel
driver as the ``driver`` symlink, whichever driver (i915 or xe) is bound::

    IntegratedGpuProbe().probe().resources   # (Resource("igpu:0", IGPU, ...),) on a laptop

An integrated GPU has no memory of its own: it borrows host RAM, so its ``memory_bytes`` is
``INTEGRATED_GPU_HOST_MEMORY_SHARE`` of host RAM. AMD and NVIDIA cards are left to the amdsmi and NVML
probes, which read their memory and clocks properly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from xpuflow.discovery.base import ProbeResult
from xpuflow.discovery.cpu import host_memory_bytes
from xpuflow.types import Resource, ResourceType

__all__ = ["INTEGRATED_GPU_HOST_MEMORY_SHARE", "IntegratedGpuProbe", "is_discrete_intel_gpu"]

#: Share of host RAM an integrated GPU is taken to be able to use. Windows reports half of RAM as
#: "shared GPU memory" and Linux's i915/xe drivers can map about as much before the host starts to
#: swap, so half is the working figure; the other half stays for the OS and the serving process.
INTEGRATED_GPU_HOST_MEMORY_SHARE = 0.5

_INTEL = 0x8086
_OTHER_VENDORS = {0x10DE: "NVIDIA (left to the nvidia probe)", 0x1002: "AMD (left to the amd probe)"}
_CARD = re.compile(r"^card(\d+)$")
_BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")

# PCI device-id ranges of Intel's discrete GPUs; every other Intel display device is integrated.
_DISCRETE_INTEL_RANGES = (
    (0x4905, 0x4909, "Intel Iris Xe MAX (DG1)"),
    (0x5690, 0x56FF, "Intel Arc A-series / Flex (DG2)"),
    (0x0BD0, 0x0BDB, "Intel Data Center GPU Max (Ponte Vecchio)"),
    (0xE200, 0xE2FF, "Intel Arc B-series (Battlemage)"),
)


def is_discrete_intel_gpu(device_id: int) -> bool:
    """True for the PCI device ids of Intel's discrete GPUs (Arc A/B series, Flex, Max, DG1)."""
    return _discrete_name(device_id) is not None


def _discrete_name(device_id: int) -> str | None:
    for low, high, name in _DISCRETE_INTEL_RANGES:
        if low <= device_id <= high:
            return name
    return None


def _read_hex(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip(), 16)
    except (OSError, ValueError):
        return None


def _driver(device: Path) -> str:
    try:
        return os.path.basename(os.readlink(device / "driver"))
    except OSError:
        return ""


def _bdf(device: Path) -> str:
    """The PCI address the ``device`` symlink points at ("0000:00:02.0"), or "" off PCI."""
    try:
        name = os.path.basename(os.path.realpath(device))
    except OSError:
        return ""
    return name if _BDF.match(name) else ""


class IntegratedGpuProbe:
    """Finds Intel GPUs in sysfs under ``sysfs_root`` (tests build a fake tree). Never raises."""

    name = "igpu"

    def __init__(self, sysfs_root: str = "/") -> None:
        self.sysfs_root = Path(sysfs_root)

    def probe(self) -> ProbeResult:
        drm = self.sysfs_root / "sys" / "class" / "drm"
        try:
            entries = sorted(
                (int(match.group(1)), entry) for entry in drm.iterdir() if (match := _CARD.match(entry.name))
            )
        except OSError:
            return ProbeResult.none(
                "no /sys/class/drm: no GPU driver is loaded (or /sys is not visible here)"
            )
        if not entries:
            return ProbeResult.none("no GPU cards under /sys/class/drm")

        total, available = host_memory_bytes(self.sysfs_root / "proc" / "meminfo")
        resources: list[Resource] = []
        skipped: list[str] = []
        seen: set[str] = set()
        for _number, card in entries:
            device = card / "device"
            vendor, device_id = _read_hex(device / "vendor"), _read_hex(device / "device")
            if vendor is None or device_id is None:
                continue  # not a PCI GPU (a firmware framebuffer such as simpledrm)
            if vendor != _INTEL:
                skipped.append(f"{card.name}: {_OTHER_VENDORS.get(vendor, f'vendor {vendor:#06x}')}")
                continue
            bdf = _bdf(device)
            if bdf and bdf in seen:
                continue
            seen.add(bdf)
            resources.append(
                self._resource(
                    card.name,
                    device,
                    device_id,
                    bdf=bdf,
                    earlier=resources,
                    host_total=total,
                    host_available=available,
                )
            )

        skipped_text = "; ".join(skipped)
        if not resources:
            return ProbeResult.none(
                "no Intel GPU under /sys/class/drm" + (f" ({skipped_text})" if skipped_text else ""),
                skipped=skipped,
            )
        found = ", ".join(
            f"{r.id} {r.name} [{r.attributes.get('driver') or 'no driver bound'}]" for r in resources
        )
        reason = found + (f"; {skipped_text}" if skipped_text else "")
        return ProbeResult.found(resources, reason, skipped=skipped)

    @staticmethod
    def _resource(
        card: str,
        device: Path,
        device_id: int,
        *,
        bdf: str,
        earlier: list[Resource],
        host_total: int | None,
        host_available: int | None,
    ) -> Resource:
        attributes: dict[str, Any] = {
            "vendor": "intel",
            "vendor_id": f"{_INTEL:#06x}",
            "device_id": f"{device_id:#06x}",
            "driver": _driver(device),
            "card": card,
        }
        if bdf:
            attributes["pci_bdf"] = bdf
        discrete = _discrete_name(device_id)
        if discrete is not None:
            index = sum(1 for r in earlier if r.type is ResourceType.GPU)
            return Resource(f"xe:{index}", ResourceType.GPU, discrete, attributes, source="sysfs")

        index = sum(1 for r in earlier if r.type is ResourceType.IGPU)
        attributes["shares_host_memory"] = True
        attributes["host_memory_share"] = INTEGRATED_GPU_HOST_MEMORY_SHARE
        if host_total is not None:
            share = int(host_total * INTEGRATED_GPU_HOST_MEMORY_SHARE)
            attributes["memory_bytes"] = share
            if host_available is not None:
                attributes["free_memory_bytes"] = min(share, host_available)
        name = f"Intel integrated GPU ({device_id:#06x})"
        return Resource(
            f"igpu:{index}", ResourceType.IGPU, name, attributes, frozenset({"low-power"}), "sysfs"
        )
