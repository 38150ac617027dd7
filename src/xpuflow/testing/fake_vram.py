"""A ``VramSource`` whose GPUs a test controls, for ``VRAMMonitor`` and the router's VRAM rule.

    source = FakeVramSource({"cuda:0": 24 << 30, "cuda:1": 80 << 30})
    monitor = VRAMMonitor(source, clock=clock)
    source.set_used("cuda:0", 23 << 30)   # the next poll sees 1 GiB free
    monitor.poll_once().get("cuda:0").free_bytes   # 1073741824

``fail_reads(n)`` makes the next ``n`` reads raise (``n=None``: until ``recover()``), ``fail_open`` makes
``open`` raise ``DiscoveryError`` as a source without its library would. State changes take a lock, so a
poller thread may read while a test writes. Prefer ``FakeNvml`` behind ``NvmlSource`` where the NVML
call path itself is under test; this fake is the cheap one for everything above it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from xpuflow.errors import DiscoveryError
from xpuflow.telemetry.vram import GpuMemory

__all__ = ["FakeVramSource"]


class FakeVramSource:
    """GPUs given as ``{device_id: total_bytes}``; every GPU starts empty (all memory free)."""

    name = "fake"

    def __init__(
        self,
        totals: Mapping[str, int],
        *,
        fail_open: bool = False,
        open_error: str = "fake VRAM source told to fail",
    ) -> None:
        for device, total in totals.items():
            if total <= 0:
                raise ValueError(f"total bytes for {device} must be positive, got {total}")
        self._totals = dict(totals)
        self._used = dict.fromkeys(totals, 0)
        self._util: dict[str, float | None] = dict.fromkeys(totals, 0.0)
        self._lock = threading.Lock()
        self._failures_left: int | None = 0
        self.fail_open = fail_open
        self.open_error = open_error
        #: Calls seen, so tests can check the monitor's lifecycle.
        self.opens = 0
        self.closes = 0
        self.reads = 0

    @property
    def is_open(self) -> bool:
        return self.opens > self.closes

    # -- test controls -----------------------------------------------------------------------------

    def set_used(self, device: str, used_bytes: int) -> None:
        with self._lock:
            total = self._total(device)
            if not 0 <= used_bytes <= total:
                raise ValueError(f"used_bytes for {device} must be within 0..{total}, got {used_bytes}")
            self._used[device] = used_bytes

    def set_free(self, device: str, free_bytes: int) -> None:
        self.set_used(device, self._total(device) - free_bytes)

    def set_utilization(self, device: str, pct: float | None) -> None:
        with self._lock:
            self._total(device)
            self._util[device] = pct

    def fail_reads(self, count: int | None = None) -> None:
        """Make the next ``count`` reads raise (every read until ``recover()`` when None)."""
        with self._lock:
            self._failures_left = count

    def recover(self) -> None:
        with self._lock:
            self._failures_left = 0

    def _total(self, device: str) -> int:
        if device not in self._totals:
            raise KeyError(f"no fake GPU {device!r}; known: {', '.join(self._totals) or 'none'}")
        return self._totals[device]

    # -- the VramSource contract -------------------------------------------------------------------

    def open(self) -> None:
        if self.fail_open:
            raise DiscoveryError(self.open_error)
        self.opens += 1

    def read(self, now_s: float) -> list[GpuMemory]:
        with self._lock:
            self.reads += 1
            if self._failures_left is None or self._failures_left > 0:
                if self._failures_left is not None:
                    self._failures_left -= 1
                raise RuntimeError("fake VRAM read failure")
            return [
                GpuMemory(device, total - used, used, total, self._util[device], now_s)
                for device, total in self._totals.items()
                for used in (self._used[device],)
            ]

    def close(self) -> None:
        self.closes += 1
