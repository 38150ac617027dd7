"""CpuProbe and parse_cpuinfo on real-format /proc/cpuinfo samples and on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xpuflow.discovery.cpu import (
    CpuProbe,
    host_memory_bytes,
    normalise_isa_features,
    parse_cpuinfo,
    read_meminfo,
)
from xpuflow.types import ResourceType

X86_ISA = {
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
}  # fmt: skip
ARM_ISA = {"neon", "sve", "sve2", "dotprod", "i8mm", "bf16"}


def _meminfo(tmp_path: Path, total_kib: int = 64 << 20, available_kib: int = 48 << 20) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(
        f"MemTotal:       {total_kib} kB\nMemFree:         1024 kB\nMemAvailable:   {available_kib} kB\n"
        "HugePages_Total:       0\nHugepagesize:       2048 kB\n"
    )
    return path


def test_sapphire_rapids_has_avx512_and_amx(cpuinfo_fixtures: Path) -> None:
    info = parse_cpuinfo((cpuinfo_fixtures / "sapphire_rapids_xeon_8480plus.txt").read_text())

    assert info["arch"] == "x86_64"
    assert info["vendor"] == "intel"
    assert info["model_name"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["logical_cores"] == 4
    # CPUs 0 and 112 are hyper-threads of socket 0's core 0; socket 1's core 0 is a different core.
    assert info["physical_cores"] == 3
    assert info["frequency_mhz"] == 2000.0
    assert set(info["isa_features"]) == X86_ISA
    assert list(info["isa_features"]) == sorted(info["isa_features"])


def test_zen3_has_avx2_but_no_avx512(cpuinfo_fixtures: Path) -> None:
    info = parse_cpuinfo((cpuinfo_fixtures / "zen3_ryzen9_5950x.txt").read_text())

    assert (info["arch"], info["vendor"]) == ("x86_64", "amd")
    assert info["model_name"] == "AMD Ryzen 9 5950X 16-Core Processor"
    assert (info["logical_cores"], info["physical_cores"]) == (4, 2)
    assert info["isa_features"] == ("avx", "avx2", "f16c", "fma", "sse4_1", "sse4_2")
    assert info["frequency_mhz"] == 3593.2  # the fastest "cpu MHz" seen: no nominal clock in the model name


def test_graviton3_reads_arm_features(cpuinfo_fixtures: Path) -> None:
    info = parse_cpuinfo((cpuinfo_fixtures / "graviton3_neoverse_v1.txt").read_text())

    assert (info["arch"], info["vendor"]) == ("aarch64", "arm")
    assert info["model_name"] == "ARM Neoverse-V1"
    assert info["logical_cores"] == 4
    assert info["physical_cores"] is None  # ARM kernels print no physical id / core id
    assert info["frequency_mhz"] is None
    # Neoverse-V1 has SVE but not SVE2; svei8mm / svebf16 are not separate xpuflow features.
    assert info["isa_features"] == ("bf16", "dotprod", "i8mm", "neon", "sve")


def test_features_are_the_ones_every_processor_has() -> None:
    text = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: lm sse4_2 avx avx2 avx512f\n\n"
        "processor\t: 1\nvendor_id\t: GenuineIntel\nflags\t\t: lm sse4_2 avx avx2\n\n"
    )
    assert parse_cpuinfo(text)["isa_features"] == ("avx", "avx2", "sse4_2")


def test_nominal_clock_in_the_model_name_wins_over_current_clock() -> None:
    text = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz\n"
        "cpu MHz\t\t: 1000.000\nflags\t\t: lm\n\n"
    )
    assert parse_cpuinfo(text)["frequency_mhz"] == 2500.0


@pytest.mark.parametrize("text", ["", "garbage without colons\n\x00\x01", "processor : x\n"])
def test_parse_cpuinfo_never_raises(text: str) -> None:
    info = parse_cpuinfo(text)
    assert isinstance(info["isa_features"], tuple)


def test_normalise_maps_arm_and_py_cpuinfo_spellings() -> None:
    assert normalise_isa_features(["asimd", "asimddp", "sve2", "AVX512VNNI", "sse4.2", "mmx"]) == (
        "avx512_vnni",
        "dotprod",
        "neon",
        "sse4_2",
        "sve2",
    )


def test_probe_on_sapphire_rapids_fixture(cpuinfo_fixtures: Path, tmp_path: Path) -> None:
    probe = CpuProbe(str(cpuinfo_fixtures / "sapphire_rapids_xeon_8480plus.txt"), str(_meminfo(tmp_path)))

    result = probe.probe()

    (cpu,) = result.resources
    assert (cpu.id, cpu.type, cpu.vendor) == ("cpu", ResourceType.CPU, "intel")
    assert cpu.name == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu.attributes["physical_cores"] == 3
    assert cpu.attributes["logical_cores"] == 4
    assert cpu.memory_bytes == 64 << 30
    assert cpu.free_memory_bytes == 48 << 30
    assert {"int8-accel", "bf16-accel"} <= cpu.tags
    assert "Platinum 8480+" in result.reason
    assert result.details["source"] == "cpuinfo"


def test_probe_on_zen3_has_no_accel_tags(cpuinfo_fixtures: Path, tmp_path: Path) -> None:
    (cpu,) = (
        CpuProbe(str(cpuinfo_fixtures / "zen3_ryzen9_5950x.txt"), str(_meminfo(tmp_path))).probe().resources
    )
    assert cpu.tags == frozenset()
    assert cpu.attributes["isa_features"] == ("avx", "avx2", "f16c", "fma", "sse4_1", "sse4_2")


def test_probe_on_graviton3_counts_processors_as_cores(cpuinfo_fixtures: Path, tmp_path: Path) -> None:
    (cpu,) = (
        CpuProbe(str(cpuinfo_fixtures / "graviton3_neoverse_v1.txt"), str(_meminfo(tmp_path)))
        .probe()
        .resources
    )
    assert cpu.attributes["arch"] == "aarch64"
    assert (
        cpu.attributes["physical_cores"] == 4
    )  # a fixture, not this machine: psutil would describe the wrong CPU
    assert cpu.tags == {"int8-accel", "bf16-accel"}
    assert "frequency_mhz" not in cpu.attributes


def test_probe_on_this_machine() -> None:
    result = CpuProbe().probe()

    (cpu,) = result.resources
    attributes = cpu.attributes
    assert cpu.id == "cpu"
    assert cpu.type is ResourceType.CPU
    assert 1 <= attributes["physical_cores"] <= attributes["logical_cores"]
    if os.path.exists("/proc/cpuinfo"):
        assert attributes["logical_cores"] == os.cpu_count()
    assert attributes["arch"]
    assert attributes["memory_bytes"] > 0
    assert 0 < attributes["free_memory_bytes"] <= attributes["memory_bytes"]
    assert set(attributes["isa_features"]) <= X86_ISA | ARM_ISA
    assert result.reason


def test_meminfo_is_read_in_bytes(tmp_path: Path) -> None:
    path = _meminfo(tmp_path, total_kib=1000, available_kib=600)
    fields = read_meminfo(path)
    assert fields["MemTotal"] == 1000 * 1024
    assert fields["HugePages_Total"] == 0  # a count, not kB
    assert host_memory_bytes(path) == (1000 * 1024, 600 * 1024)


def test_missing_meminfo_falls_back_to_psutil(tmp_path: Path) -> None:
    total, available = host_memory_bytes(tmp_path / "absent")
    assert total is not None
    assert available is not None
    assert 0 < available <= total


def test_unreadable_cpuinfo_still_yields_a_cpu(tmp_path: Path) -> None:
    directory = tmp_path / "cpuinfo_is_a_directory"
    directory.mkdir()

    result = CpuProbe(str(directory), str(_meminfo(tmp_path))).probe()

    (cpu,) = result.resources
    assert cpu.attributes["logical_cores"] >= 1
    assert "cannot read" in result.reason


def test_missing_cpuinfo_falls_back_to_py_cpuinfo(tmp_path: Path) -> None:
    pytest.importorskip("cpuinfo")

    result = CpuProbe(str(tmp_path / "no-such-cpuinfo"), str(_meminfo(tmp_path))).probe()

    (cpu,) = result.resources
    assert result.details["source"] == "py-cpuinfo"
    assert cpu.source == "py-cpuinfo"
    assert cpu.attributes["logical_cores"] >= 1
    assert cpu.attributes["physical_cores"] >= 1
    assert set(cpu.attributes["isa_features"]) <= X86_ISA | ARM_ISA
