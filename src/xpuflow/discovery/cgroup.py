"""What a container may use of the host: CPU quota and memory limit from its cgroup, CPUs from its
affinity mask.

``/proc/cpuinfo`` and ``/proc/meminfo`` describe the host. A process in a container (Kubernetes, Docker,
systemd slices) may be held to 2 of the host's 64 CPUs and 8 of its 512 GiB: sizing thread pools or
placing a model by the host's numbers then oversubscribes the CPU or gets the process OOM-killed. This
module reads the limits the kernel enforces:

- cgroup v2 (unified): ``cpu.max`` (``"quota period"`` or ``"max period"``), ``memory.max`` and
  ``memory.current``, in the process's own cgroup (``0::/path`` in ``/proc/self/cgroup``), and every
  ancestor up to the root, since a parent's limit binds too;
- cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` and ``memory.limit_in_bytes`` /
  ``memory.usage_in_bytes`` under the ``cpu`` and ``memory`` controllers' mount points;
- the affinity mask (``os.sched_getaffinity``), which ``taskset`` and cpusets narrow.

Every reader returns None for "no limit" or "cannot tell" and never raises::

    limits = read_cgroup_limits()
    limits.cpu_quota_cores      # 2.0, or None without a quota
    limits.memory_limit_bytes   # 8 GiB, or None without a limit
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CgroupLimits", "affinity_cpus", "read_cgroup_limits"]

# cgroup v1 writes "no limit" as a page-aligned huge number; anything past 2**60 bytes is no limit
_V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CgroupLimits:
    """The tightest limits over the process's cgroup and its ancestors; None where there is none."""

    cpu_quota_cores: float | None = None
    memory_limit_bytes: int | None = None
    memory_used_bytes: int | None = None
    version: int | None = None  # 1 or 2; None when no cgroup filesystem was found

    @property
    def usable_cpus(self) -> int | None:
        """The quota as whole CPUs (rounded up: 1.5 CPUs of quota keep two threads busy part-time)."""
        return None if self.cpu_quota_cores is None else max(1, math.ceil(self.cpu_quota_cores))

    @property
    def memory_available_bytes(self) -> int | None:
        if self.memory_limit_bytes is None or self.memory_used_bytes is None:
            return None
        return max(0, self.memory_limit_bytes - self.memory_used_bytes)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _own_v2_path(proc_cgroup: Path) -> str | None:
    text = _read(proc_cgroup)
    if text is None:
        return None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path or "/"
    return None


def _chain(root: Path, own: str) -> list[Path]:
    """The process's cgroup directory and its ancestors, innermost first (paths outside ``root`` are cut)."""
    parts = [p for p in own.split("/") if p and p != ".."]
    dirs = [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _min(values: list[float]) -> float | None:
    return min(values) if values else None


def _read_v2(root: Path, own: str) -> CgroupLimits:
    quotas: list[float] = []
    limits: list[float] = []
    used: int | None = None
    for directory in _chain(root, own):
        cpu = _read(directory / "cpu.max")
        if cpu:
            quota, _, period = cpu.partition(" ")
            q, p = _int(quota), _int(period) or 100_000
            if q is not None and q > 0 and p > 0:
                quotas.append(q / p)
        memory = _int(_read(directory / "memory.max"))
        if memory is not None and memory > 0:
            limits.append(memory)
        if used is None:
            used = _int(_read(directory / "memory.current"))
    limit = _min(limits)
    return CgroupLimits(
        cpu_quota_cores=_min(quotas),
        memory_limit_bytes=None if limit is None else int(limit),
        memory_used_bytes=used if limit is not None else None,
        version=2,
    )


def _read_v1(root: Path) -> CgroupLimits | None:
    cpu_dir = next((root / n for n in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / n).is_dir()), None)
    memory_dir = root / "memory" if (root / "memory").is_dir() else None
    if cpu_dir is None and memory_dir is None:
        return None
    quota_cores: float | None = None
    if cpu_dir is not None:
        quota = _int(_read(cpu_dir / "cpu.cfs_quota_us"))
        period = _int(_read(cpu_dir / "cpu.cfs_period_us"))
        if quota is not None and quota > 0 and period:
            quota_cores = quota / period
    limit: int | None = None
    used: int | None = None
    if memory_dir is not None:
        value = _int(_read(memory_dir / "memory.limit_in_bytes"))
        if value is not None and 0 < value < _V1_UNLIMITED:
            limit = value
            used = _int(_read(memory_dir / "memory.usage_in_bytes"))
    return CgroupLimits(
        cpu_quota_cores=quota_cores, memory_limit_bytes=limit, memory_used_bytes=used, version=1
    )


def read_cgroup_limits(
    root: str | os.PathLike[str] = "/sys/fs/cgroup",
    proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
) -> CgroupLimits:
    """The CPU quota and memory limit that bind this process (see the module docstring). Never raises."""
    base = Path(root)
    try:
        if (base / "cgroup.controllers").is_file():
            return _read_v2(base, _own_v2_path(Path(proc_cgroup)) or "/")
        return _read_v1(base) or CgroupLimits()
    except OSError:
        return CgroupLimits()


def affinity_cpus() -> int | None:
    """How many CPUs this process may run on (its affinity mask); None where the OS cannot say."""
    getter = getattr(os, "sched_getaffinity", None)
    if getter is None:
        return None
    try:
        return len(getter(0)) or None
    except OSError:
        return None
