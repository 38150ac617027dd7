"""The host CPU and its RAM, read from ``/proc/cpuinfo`` and ``/proc/meminfo``.

Reading the kernel's text files takes well under a millisecond; py-cpuinfo (about a second) is the
fallback only where ``/proc/cpuinfo`` does not exist (macOS, Windows), and its answer is cached::

    result = CpuProbe().probe()
    cpu = result.resources[0]
    cpu.attributes["isa_features"]   # ("avx", "avx2", "avx512f", ..., "sse4_2")
    "int8-accel" in cpu.tags         # True on VNNI, AMX, dotprod or i8mm parts
"""

from __future__ import annotations

import functools
import os
import platform
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from xpuflow.discovery.base import ProbeResult
from xpuflow.discovery.cgroup import CgroupLimits, affinity_cpus, read_cgroup_limits
from xpuflow.types import Resource, ResourceType

__all__ = [
    "BF16_ACCEL_FEATURES",
    "INT8_ACCEL_FEATURES",
    "CpuProbe",
    "host_memory_bytes",
    "normalise_isa_features",
    "parse_cpuinfo",
    "read_meminfo",
]

_PROC_CPUINFO = "/proc/cpuinfo"

# Kernel flag (x86 ``flags``, ARM ``Features``) -> the name xpuflow uses. x86 names are the kernel's own;
# ARM names follow the compilers' ``-march`` extensions (asimd is NEON, asimddp is dotprod).
_ISA_ALIASES: Mapping[str, str] = {
    "sse4_1": "sse4_1",
    "sse4_2": "sse4_2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16",
    "avx_vnni": "avx_vnni",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
    # py-cpuinfo spells some x86 flags without the underscore on macOS and Windows.
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
    "avxvnni": "avx_vnni",
    # ARM: 64-bit kernels say asimd, 32-bit kernels say neon.
    "asimd": "neon",
    "neon": "neon",
    "sve": "sve",
    "sve2": "sve2",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "bf16": "bf16",
}

#: Features that make int8 matmuls markedly faster (tag ``int8-accel``).
INT8_ACCEL_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "dotprod", "i8mm"})
#: Features that compute bf16 natively (tag ``bf16-accel``).
BF16_ACCEL_FEATURES = frozenset({"avx512_bf16", "amx_bf16", "bf16"})

_X86_VENDORS = {
    "GenuineIntel": "intel",
    "AuthenticAMD": "amd",
    "HygonGenuine": "hygon",
    "CentaurHauls": "centaur",
}

# ARM "CPU implementer" codes (Arm ARM, MIDR_EL1.Implementer).
_ARM_IMPLEMENTERS = {
    0x41: "arm",
    0x42: "broadcom",
    0x43: "cavium",
    0x46: "fujitsu",
    0x48: "hisilicon",
    0x4E: "nvidia",
    0x50: "apm",
    0x51: "qualcomm",
    0x61: "apple",
    0xC0: "ampere",
}

# Arm Ltd. "CPU part" numbers of the server cores an inference fleet meets; others keep a generic name.
_ARM_PARTS = {
    0xD0C: "Neoverse-N1",
    0xD40: "Neoverse-V1",
    0xD49: "Neoverse-N2",
    0xD4F: "Neoverse-V2",
    0xD8E: "Neoverse-N3",
    0xD84: "Neoverse-V3",
    0xD08: "Cortex-A72",
    0xD0B: "Cortex-A76",
    0xD41: "Cortex-A78",
}

_MODEL_GHZ = re.compile(r"@\s*([0-9.]+)\s*GHz", re.IGNORECASE)


def normalise_isa_features(flags: Iterable[str]) -> tuple[str, ...]:
    """The xpuflow names (sorted) of the ISA extensions among raw kernel or py-cpuinfo ``flags``."""
    return tuple(
        sorted({_ISA_ALIASES[f] for f in (flag.strip().lower() for flag in flags) if f in _ISA_ALIASES})
    )


def _split_blocks(text: str) -> list[dict[str, str]]:
    """``/proc/cpuinfo`` as one ``{key: value}`` per processor (blank lines separate them)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def _int(value: str | None, base: int = 10) -> int | None:
    if value is None:
        return None
    try:
        return int(value, base)
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Parse the text of ``/proc/cpuinfo`` (x86 or ARM) without touching the machine.

    Returns a dict with ``arch`` (``"x86_64"``, ``"aarch64"``... or None when the text does not say),
    ``vendor`` (lower case: intel, amd, arm, ampere...), ``model_name``, ``logical_cores`` (processor
    entries), ``physical_cores`` (unique ``(physical id, core id)`` pairs; None when the kernel does not
    print them, as on ARM), ``frequency_mhz`` (the nominal clock in the model name, else the highest
    ``cpu MHz`` seen; None when neither is printed) and ``isa_features`` (normalised names present on
    *every* processor, so that work placed on any core may use them). Never raises.
    """
    blocks = [b for b in _split_blocks(text) if "processor" in b]
    first = blocks[0] if blocks else {}
    info: dict[str, Any] = {
        "arch": None,
        "vendor": "",
        "model_name": "",
        "logical_cores": len(blocks),
        "physical_cores": None,
        "frequency_mhz": None,
        "isa_features": (),
    }
    if not blocks:
        return info

    flag_key = "flags" if "flags" in first else "Features" if "Features" in first else None
    if flag_key is not None:
        common = set(first.get(flag_key, "").split())
        for block in blocks[1:]:
            common &= set(block.get(flag_key, "").split())
        info["isa_features"] = normalise_isa_features(common)

    if "vendor_id" in first:  # x86
        raw_flags = set(first.get("flags", "").split())
        info["arch"] = "x86_64" if "lm" in raw_flags else "i686"
        info["vendor"] = _X86_VENDORS.get(first["vendor_id"], first["vendor_id"].lower())
        info["model_name"] = first.get("model name", "")
        pairs = {(b["physical id"], b["core id"]) for b in blocks if "physical id" in b and "core id" in b}
        if pairs:
            info["physical_cores"] = len(pairs)
    elif "CPU implementer" in first:  # ARM
        arch_version = _int(first.get("CPU architecture"))
        info["arch"] = "aarch64" if arch_version is not None and arch_version >= 8 else "armv7l"
        implementer = _int(first.get("CPU implementer"), 16)
        part = _int(first.get("CPU part"), 16)
        vendor = (
            _ARM_IMPLEMENTERS.get(implementer, f"arm-{implementer:#x}") if implementer is not None else ""
        )
        info["vendor"] = vendor
        if first.get("model name"):
            info["model_name"] = first["model name"]
        elif implementer == 0x41 and part in _ARM_PARTS:
            info["model_name"] = f"ARM {_ARM_PARTS[part]}"
        elif part is not None:
            info["model_name"] = f"{vendor or 'ARM'} CPU part {part:#x}"

    nominal = _MODEL_GHZ.search(info["model_name"])
    if nominal is not None:
        info["frequency_mhz"] = round(float(nominal.group(1)) * 1000.0, 1)
    else:
        clocks = [mhz for b in blocks if (mhz := _float(b.get("cpu MHz"))) is not None]
        if clocks:
            info["frequency_mhz"] = round(max(clocks), 1)
    return info


def read_meminfo(path: str | os.PathLike[str] = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` as ``{field: bytes}`` (the kernel prints kB, meaning KiB). Empty if unreadable."""
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError:
        return {}
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts or not parts[0].isdigit():
            continue
        scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
        fields[key.strip()] = int(parts[0]) * scale
    return fields


def host_memory_bytes(
    meminfo_path: str | os.PathLike[str] = "/proc/meminfo",
) -> tuple[int | None, int | None]:
    """``(total, available)`` host RAM in bytes: ``/proc/meminfo`` first, psutil where it is missing.

    Either value is None when neither source can say. Never raises.
    """
    fields = read_meminfo(meminfo_path)
    total = fields.get("MemTotal")
    available = fields.get("MemAvailable", fields.get("MemFree"))
    if total is not None:
        return total, available
    try:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.total), int(memory.available)
    except Exception:  # psutil missing or unsupported here: memory stays unknown, the CPU is still listed
        return None, None


@functools.lru_cache(maxsize=1)
def _py_cpuinfo() -> dict[str, Any]:
    """py-cpuinfo's answer, computed once per process (it takes about a second)."""
    import cpuinfo

    return dict(cpuinfo.get_cpu_info())


def _from_py_cpuinfo() -> dict[str, Any]:
    raw = _py_cpuinfo()
    vendor_raw = str(raw.get("vendor_id_raw", ""))
    hz = raw.get("hz_advertised") or raw.get("hz_actual")
    frequency_mhz = round(hz[0] / 1e6, 1) if isinstance(hz, (list, tuple)) and hz and hz[0] else None
    return {
        "arch": str(raw.get("arch_string_raw", "")) or None,
        "vendor": _X86_VENDORS.get(vendor_raw, vendor_raw.lower()),
        "model_name": str(raw.get("brand_raw", "")),
        "logical_cores": int(raw.get("count") or 0),
        "physical_cores": None,
        "frequency_mhz": frequency_mhz,
        "isa_features": normalise_isa_features(raw.get("flags", [])),
    }


def _physical_cores_from_psutil() -> int | None:
    try:
        import psutil

        count = psutil.cpu_count(logical=False)
    except Exception:  # psutil cannot tell on some platforms; the caller falls back to a count it has
        return None
    return int(count) if count else None


class CpuProbe:
    """Finds the host CPU: one ``Resource`` with id ``"cpu"``. It always finds one and never raises.

    ``cpuinfo_path`` and ``meminfo_path`` point at the kernel's files (tests pass fixtures). When
    ``cpuinfo_path`` does not exist, py-cpuinfo answers instead. Physical cores come from the
    ``(physical id, core id)`` pairs; where the kernel does not print them (ARM), from psutil when the
    probe reads this machine's own ``/proc/cpuinfo``, else the processor count.

    Inside a container the CPU quota, the affinity mask and the memory limit (``discovery/cgroup.py``)
    cap ``physical_cores``, ``logical_cores``, ``memory_bytes`` and ``free_memory_bytes``: what this
    process can use, which is what thread pools and placement need. The host's own figures stay in
    ``host_physical_cores``, ``host_logical_cores`` and ``host_memory_bytes``. ``cgroup_root`` and
    ``affinity_cpus`` default to this process's own (``/sys/fs/cgroup``, its affinity mask) when the
    probe reads this machine's ``/proc/cpuinfo``; tests pass fixtures.
    """

    name = "cpu"

    def __init__(
        self,
        cpuinfo_path: str = _PROC_CPUINFO,
        meminfo_path: str = "/proc/meminfo",
        *,
        cgroup_root: str | None = None,
        proc_cgroup: str = "/proc/self/cgroup",
        affinity_cpus: int | None = None,
    ) -> None:
        self.cpuinfo_path = cpuinfo_path
        self.meminfo_path = meminfo_path
        self.cgroup_root = cgroup_root
        self.proc_cgroup = proc_cgroup
        self.affinity_cpus = affinity_cpus

    def _read(self) -> tuple[dict[str, Any], str, list[str]]:
        notes: list[str] = []
        try:
            text = Path(self.cpuinfo_path).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            try:
                return _from_py_cpuinfo(), "py-cpuinfo", notes
            except Exception as exc:  # py-cpuinfo missing or failing: fall through to the bare minimum
                notes.append(f"{self.cpuinfo_path} is missing and py-cpuinfo failed ({exc})")
                text = ""
        except OSError as exc:
            notes.append(f"cannot read {self.cpuinfo_path} ({exc})")
            text = ""
        return parse_cpuinfo(text), "cpuinfo", notes

    def probe(self) -> ProbeResult:
        info, source, notes = self._read()
        live = os.path.abspath(self.cpuinfo_path) == _PROC_CPUINFO or source == "py-cpuinfo"
        logical = info["logical_cores"] or (os.cpu_count() if live else None) or 1
        physical = info["physical_cores"]
        if physical is None:
            physical = (_physical_cores_from_psutil() if live else None) or logical
        arch = info["arch"] or platform.machine() or "unknown"
        features: tuple[str, ...] = info["isa_features"]
        total, available = host_memory_bytes(self.meminfo_path)
        host = {"host_physical_cores": physical, "host_logical_cores": logical, "host_memory_bytes": total}
        root = self.cgroup_root or ("/sys/fs/cgroup" if live else None)
        limits = read_cgroup_limits(root, self.proc_cgroup) if root else CgroupLimits()
        allowed = (
            self.affinity_cpus if self.affinity_cpus is not None else (affinity_cpus() if live else None)
        )
        caps = [n for n in (allowed, limits.usable_cpus) if n is not None]
        limited: list[str] = []
        if caps and min(caps) < logical:
            logical = min(caps)
            limited.append(f"{logical} CPUs ({'quota' if limits.usable_cpus == logical else 'affinity'})")
        physical = min(physical, logical)
        if limits.memory_limit_bytes is not None and (total is None or limits.memory_limit_bytes < total):
            total = limits.memory_limit_bytes
            free = limits.memory_available_bytes
            available = free if available is None or free is None else min(available, free)
            limited.append(f"{total / 2**30:.1f} GiB memory")

        attributes: dict[str, Any] = {
            "arch": arch,
            "vendor": info["vendor"] or "unknown",
            "model_name": info["model_name"] or platform.processor() or arch,
            "physical_cores": physical,
            "logical_cores": logical,
            "isa_features": features,
        }
        if limited:
            attributes.update({k: v for k, v in host.items() if v is not None})
        if info["frequency_mhz"] is not None:
            attributes["frequency_mhz"] = info["frequency_mhz"]
        if total is not None:
            attributes["memory_bytes"] = total
        if available is not None:
            attributes["free_memory_bytes"] = available

        tags: set[str] = set()
        if INT8_ACCEL_FEATURES.intersection(features):
            tags.add("int8-accel")
        if BF16_ACCEL_FEATURES.intersection(features):
            tags.add("bf16-accel")

        cpu = Resource("cpu", ResourceType.CPU, attributes["model_name"], attributes, frozenset(tags), source)
        memory = f"{total / 2**30:.1f} GiB RAM" if total is not None else "RAM size unknown"
        accel = f"; {', '.join(sorted(tags))}" if tags else ""
        reason = f"{cpu.name} ({arch}): {physical} cores / {logical} threads, {memory}{accel}"
        if limited:
            reason += f"; this process may use {' and '.join(limited)} (cgroup limits / affinity)"
        if notes:
            reason += "; " + "; ".join(notes)
        return ProbeResult.found([cpu], reason, source=source)
