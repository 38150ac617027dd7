"""Live host memory for the CPU "device": what a process here may still allocate, and of how much.

NVML and torch report a GPU's free memory; the CPU has no such poller, so the dashboard showed the
free figure discovery read at start-up and no total. This reads ``psutil.virtual_memory()`` and, in a
container, the cgroup's limit and usage (the tighter of the two wins), at most once per ``max_age_s``::

    memory = HostMemory()
    memory.read()   # (free_bytes, total_bytes), e.g. (23.1 GiB, 23.4 GiB); never raises
"""

from __future__ import annotations

from collections.abc import Callable

from xpuflow.clock import Clock, SystemClock
from xpuflow.discovery.cgroup import CgroupLimits, read_cgroup_limits

__all__ = ["HostMemory", "release_freed_memory"]


def _psutil_memory() -> tuple[int | None, int | None]:
    try:
        import psutil

        vm = psutil.virtual_memory()
    except Exception:
        return None, None
    return int(vm.available), int(vm.total)


class HostMemory:
    """Free and total host memory bytes, cached for ``max_age_s`` (a read costs tens of microseconds
    plus, in a container, two small file reads; the scorer asks on every request)."""

    def __init__(
        self,
        *,
        max_age_s: float = 1.0,
        clock: Clock | None = None,
        host: Callable[[], tuple[int | None, int | None]] = _psutil_memory,
        cgroup: Callable[[], CgroupLimits | None] = read_cgroup_limits,
    ) -> None:
        self.max_age_s = max_age_s
        self._clock = clock or SystemClock()
        self._host = host
        self._cgroup = cgroup
        self._read_at_s: float | None = None
        self._value: tuple[int | None, int | None] = (None, None)

    def read(self) -> tuple[int | None, int | None]:
        """``(free_bytes, total_bytes)``; either is None when it cannot be told."""
        now = self._clock.monotonic()
        if self._read_at_s is not None and now - self._read_at_s < self.max_age_s:
            return self._value
        free, total = self._host()
        try:
            limits = self._cgroup()
        except Exception:
            limits = None
        if limits is not None and limits.memory_limit_bytes is not None:
            total = limits.memory_limit_bytes if total is None else min(total, limits.memory_limit_bytes)
            available = limits.memory_available_bytes
            if available is not None:
                free = available if free is None else min(free, available)
        self._read_at_s, self._value = now, (free, total)
        return self._value


def release_freed_memory() -> None:
    """Give freed heap back to the system after a model is unloaded (glibc keeps it otherwise), so that
    a re-measurement of the process sees the room the unload made. A no-op where there is no glibc."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
