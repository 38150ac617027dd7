"""Container limits: cgroup v2 and v1 files, the affinity mask, and how they cap the CPU resource."""

from __future__ import annotations

from pathlib import Path

from xpuflow.discovery.cgroup import CgroupLimits, affinity_cpus, read_cgroup_limits
from xpuflow.discovery.cpu import CpuProbe

GIB = 1 << 30


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v2(tmp_path: Path, own: str = "/kubepods/pod1/ctr") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "cpu memory io\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_v2_takes_the_tightest_limit_of_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path)
    _write(root / "kubepods" / "cpu.max", "max 100000\n")
    _write(root / "kubepods" / "memory.max", str(16 * GIB))
    _write(root / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")  # 1.5 CPUs
    _write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "400000 100000\n")  # looser than the pod's
    _write(root / "kubepods" / "pod1" / "ctr" / "memory.max", str(8 * GIB))
    _write(root / "kubepods" / "pod1" / "ctr" / "memory.current", str(3 * GIB))
    limits = read_cgroup_limits(root, proc)
    assert limits == CgroupLimits(1.5, 8 * GIB, 3 * GIB, version=2)
    assert limits.usable_cpus == 2
    assert limits.memory_available_bytes == 5 * GIB


def test_v2_without_limits_says_none(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, own="/")
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "memory.max", "max\n")
    limits = read_cgroup_limits(root, proc)
    assert (limits.cpu_quota_cores, limits.memory_limit_bytes, limits.version) == (None, None, 2)
    assert limits.usable_cpus is None
    assert limits.memory_available_bytes is None


def test_v1_quota_and_limit_and_its_unlimited_marker(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "200000\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    _write(root / "memory" / "memory.limit_in_bytes", str(4 * GIB))
    _write(root / "memory" / "memory.usage_in_bytes", str(GIB))
    assert read_cgroup_limits(root, tmp_path / "none") == CgroupLimits(2.0, 4 * GIB, GIB, version=1)
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert read_cgroup_limits(root, tmp_path / "none") == CgroupLimits(version=1)


def test_no_cgroup_filesystem_or_junk_is_no_limit(tmp_path: Path) -> None:
    assert read_cgroup_limits(tmp_path / "absent", tmp_path / "absent") == CgroupLimits()
    root, proc = _v2(tmp_path)
    _write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "lots\n")
    _write(root / "kubepods" / "pod1" / "ctr" / "memory.max", "\n")
    assert read_cgroup_limits(root, proc) == CgroupLimits(version=2)


def test_affinity_is_a_positive_count_here() -> None:
    count = affinity_cpus()
    assert count is None or count >= 1


def _meminfo(tmp_path: Path) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal: {64 << 20} kB\nMemAvailable: {48 << 20} kB\n")
    return path


def test_the_cpu_resource_reports_what_the_container_may_use(cpuinfo_fixtures: Path, tmp_path: Path) -> None:
    root, proc = _v2(tmp_path)
    _write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "100000 100000\n")
    _write(root / "kubepods" / "pod1" / "ctr" / "memory.max", str(8 * GIB))
    _write(root / "kubepods" / "pod1" / "ctr" / "memory.current", str(2 * GIB))
    probe = CpuProbe(
        str(cpuinfo_fixtures / "sapphire_rapids_xeon_8480plus.txt"),
        str(_meminfo(tmp_path)),
        cgroup_root=str(root),
        proc_cgroup=str(proc),
    )
    result = probe.probe()
    (cpu,) = result.resources
    assert (cpu.attributes["logical_cores"], cpu.attributes["physical_cores"]) == (1, 1)
    assert (cpu.memory_bytes, cpu.free_memory_bytes) == (8 * GIB, 6 * GIB)
    assert cpu.attributes["host_logical_cores"] == 4
    assert cpu.attributes["host_physical_cores"] == 3
    assert cpu.attributes["host_memory_bytes"] == 64 * GIB
    assert "may use 1 CPUs (quota) and 8.0 GiB memory" in result.reason


def test_an_affinity_mask_caps_the_cores_and_no_limit_changes_nothing(
    cpuinfo_fixtures: Path, tmp_path: Path
) -> None:
    fixture = str(cpuinfo_fixtures / "sapphire_rapids_xeon_8480plus.txt")
    (cpu,) = CpuProbe(fixture, str(_meminfo(tmp_path)), affinity_cpus=2).probe().resources
    assert (cpu.attributes["logical_cores"], cpu.attributes["physical_cores"]) == (2, 2)
    assert cpu.memory_bytes == 64 * GIB
    (free,) = CpuProbe(fixture, str(_meminfo(tmp_path)), affinity_cpus=64).probe().resources
    assert free.attributes["logical_cores"] == 4
    assert "host_logical_cores" not in free.attributes
