"""Live host memory for the CPU device: psutil, bounded by a cgroup, cached for a second."""

from __future__ import annotations

from xpuflow.clock import FakeClock
from xpuflow.discovery.cgroup import CgroupLimits
from xpuflow.telemetry.host_memory import HostMemory

GIB = 1 << 30


def test_reads_the_host_and_caches_for_max_age() -> None:
    clock = FakeClock()
    readings = iter([(10 * GIB, 32 * GIB), (9 * GIB, 32 * GIB)])
    memory = HostMemory(clock=clock, host=lambda: next(readings), cgroup=CgroupLimits)
    assert memory.read() == (10 * GIB, 32 * GIB)
    clock.advance(0.5)
    assert memory.read() == (10 * GIB, 32 * GIB)  # cached
    clock.advance(0.6)
    assert memory.read() == (9 * GIB, 32 * GIB)


def test_a_cgroup_limit_is_the_total_and_bounds_the_free_memory() -> None:
    limits = CgroupLimits(memory_limit_bytes=8 * GIB, memory_used_bytes=6 * GIB, version=2)
    memory = HostMemory(host=lambda: (20 * GIB, 64 * GIB), cgroup=lambda: limits)
    assert memory.read() == (2 * GIB, 8 * GIB)


def test_unknown_readings_are_none_and_never_raise() -> None:
    def broken() -> CgroupLimits:
        raise OSError("no cgroup fs")

    memory = HostMemory(host=lambda: (None, None), cgroup=broken)
    assert memory.read() == (None, None)


def test_the_real_host_has_both_figures() -> None:
    free, total = HostMemory().read()
    assert total is not None
    assert free is not None
    assert 0 < free <= total
