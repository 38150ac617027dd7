"""Hardware discovery: one probe per kind of hardware, merged into an ``Inventory``.

    from xpuflow.discovery import detect
    inventory = detect(declared=[{"id": "remote:vllm-a", "type": "remote", "endpoint": "http://..."}])
    inventory.cpu.attributes["isa_features"]
    [report.reason for report in inventory.reports]   # what each probe found, or why it found nothing

Importing this package imports no vendor library (torch, pynvml, amdsmi); each probe imports its own
when it runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from xpuflow.discovery.amd import AmdProbe
from xpuflow.discovery.base import Probe, ProbeReport, ProbeResult
from xpuflow.discovery.cpu import CpuProbe
from xpuflow.discovery.declared import DeclaredProbe
from xpuflow.discovery.igpu import IntegratedGpuProbe
from xpuflow.discovery.inventory import Inventory, default_probes
from xpuflow.discovery.npu import NpuProbe
from xpuflow.discovery.nvidia import NvidiaProbe
from xpuflow.discovery.torch_devices import TorchProbe

__all__ = [
    "AmdProbe",
    "CpuProbe",
    "DeclaredProbe",
    "IntegratedGpuProbe",
    "Inventory",
    "NpuProbe",
    "NvidiaProbe",
    "Probe",
    "ProbeReport",
    "ProbeResult",
    "TorchProbe",
    "default_probes",
    "detect",
]


def detect(declared: Sequence[Mapping[str, Any]] = ()) -> Inventory:
    """Run the built-in probes (and the ``declared`` config entries) on this machine. Never raises."""
    return Inventory.detect(declared=declared)
