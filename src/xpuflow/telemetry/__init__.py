"""Live device state: background pollers that publish immutable snapshots for the router to read.

    from xpuflow.telemetry import VRAMMonitor
    with VRAMMonitor.auto(poll_interval_ms=15) as monitor:
        monitor.snapshot().get("cuda:0")   # GpuMemory(free_bytes=..., used_bytes=..., ...) or None

Importing this package imports no vendor library; each source imports its own when it opens.
"""

from __future__ import annotations

from xpuflow.telemetry.vram import (
    GIB,
    GpuMemory,
    MonitorStats,
    NvmlSource,
    TorchCudaSource,
    VRAMMonitor,
    VramSnapshot,
    VramSource,
)

__all__ = [
    "GIB",
    "GpuMemory",
    "MonitorStats",
    "NvmlSource",
    "TorchCudaSource",
    "VRAMMonitor",
    "VramSnapshot",
    "VramSource",
]
