"""NPUs: accel-class devices in sysfs, and vendor NPU cards through their management CLIs.

Linux puts compute accelerators in the ``accel`` device class (``/sys/class/accel/accelN``, nodes
``/dev/accel/accelN``): Intel's NPU (driver ``intel_vpu``) and AMD's XDNA (driver ``amdxdna``) live
there. Inference cards with their own drivers are asked through their CLIs, each only when it is on
PATH and each with a short timeout: Rebellions ``rbln-smi``/``rbln-stat -j`` (JSON), FuriosaAI
``furiosa-smi info`` and Huawei Ascend ``npu-smi info`` (tables)::

    NpuProbe().probe().resources   # (Resource("npu:0", NPU, "Intel NPU (Meteor Lake)", ...),)

A CLI device on a PCI address already seen in sysfs enriches that device instead of adding another.
Every NPU is tagged ``low-power`` except Ascend 910-class training parts, whose board power (300 W and
up) is a GPU's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xpuflow.discovery.base import ProbeResult
from xpuflow.types import Resource, ResourceType

__all__ = [
    "CLI_TIMEOUT_S",
    "NpuProbe",
    "Runner",
    "parse_furiosa_smi_info",
    "parse_npu_smi_info",
    "parse_rbln_stat_json",
    "run_command",
]

log = logging.getLogger(__name__)

#: Runs ``argv`` with a timeout in seconds and returns its stdout; raises on failure or timeout.
Runner = Callable[[Sequence[str], float], str]

#: Seconds a vendor CLI may take before it is given up on (they answer in well under a second).
CLI_TIMEOUT_S = 2.0

_ACCEL = re.compile(r"^accel(\d+)$")
_BDF = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_PAIR = re.compile(r"(\d+)\s*/\s*(\d+)")
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_PCI_VENDORS = {0x8086: "intel", 0x1022: "amd", 0x19E5: "huawei", 0x1ED2: "furiosa", 0x1EFF: "rebellions"}
_DRIVER_VENDORS = {"intel_vpu": "intel", "amdxdna": "amd"}
_NPU_NAMES = {
    ("intel", 0x7D1D): "Intel NPU (Meteor Lake)",
    ("intel", 0xAD1D): "Intel NPU (Arrow Lake)",
    ("intel", 0x643E): "Intel NPU (Lunar Lake)",
    ("intel", 0xB03E): "Intel NPU (Panther Lake)",
    ("amd", 0x1502): "AMD XDNA NPU (Phoenix / Hawk Point)",
    ("amd", 0x17F0): "AMD XDNA 2 NPU (Strix / Krackan)",
}
# On-card memory from FuriosaAI's product specifications; furiosa-smi does not print it.
_FURIOSA_MEMORY_BYTES = {"rngd": 48 * 2**30, "warboy": 16 * 2**30}


def run_command(argv: Sequence[str], timeout_s: float) -> str:
    """The default ``Runner``: stdout of ``argv``; raises on a non-zero exit, a timeout or a missing file."""
    completed = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=True)
    return completed.stdout


def _size_bytes(value: Any) -> int | None:
    """A size as printed by the vendor tools ("16642998272", "15.7GiB", 48) in bytes, or None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE.match(str(value))
    if match is None:
        return None
    unit = (match.group(2) or "B").lower()
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _table_rows(text: str) -> list[list[str]]:
    """The cells of each ``| a | b |`` line of a box-drawn table (border lines are skipped)."""
    rows = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|"):
            rows.append([cell.strip() for cell in stripped[1:-1].split("|")])
    return rows


def parse_rbln_stat_json(text: str) -> list[dict[str, Any]]:
    """Devices from ``rbln-stat -j`` / ``rbln-smi -j``. Raises ``ValueError`` on output it cannot read.

    The JSON carries ``KMD_version`` and ``devices``: each with ``name`` ("RBLN-CA12"), ``uuid``,
    ``device`` ("rbln0"), ``pci.bus_id`` and ``memory.total`` / ``memory.used`` (bytes, as strings).
    """
    data = json.loads(text)
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, list):
        raise ValueError("no 'devices' list in the JSON")
    found = []
    for raw in devices:
        if not isinstance(raw, dict):
            continue
        memory: dict[str, Any] = raw["memory"] if isinstance(raw.get("memory"), dict) else {}
        pci: dict[str, Any] = raw["pci"] if isinstance(raw.get("pci"), dict) else {}
        entry: dict[str, Any] = {
            "name": f"Rebellions {raw.get('name') or 'NPU'}",
            "vendor": "rebellions",
            "device_name": str(raw.get("device") or ""),
        }
        if raw.get("uuid"):
            entry["uuid"] = str(raw["uuid"])
        if _BDF.match(str(pci.get("bus_id", ""))):
            entry["pci_bdf"] = str(pci["bus_id"]).lower()
        if data.get("KMD_version") not in (None, "", "N/A"):
            entry["driver_version"] = str(data["KMD_version"])
        total, used = _size_bytes(memory.get("total")), _size_bytes(memory.get("used"))
        if total:
            entry["memory_bytes"] = total
            if used is not None:
                entry["free_memory_bytes"] = max(total - used, 0)
        found.append(entry)
    return found


def parse_furiosa_smi_info(text: str) -> list[dict[str, Any]]:
    """Devices from the ``furiosa-smi info`` table (columns Arch, Device, Firmware, ..., PCI-BDF).

    furiosa-smi does not print memory; it comes from the product specification of the ``Arch``.
    """
    header: list[str] | None = None
    found = []
    for cells in _table_rows(text):
        lowered = [cell.lower() for cell in cells]
        if header is None:
            if "arch" in lowered and "device" in lowered:
                header = lowered
            continue
        if len(cells) != len(header):
            continue
        row = dict(zip(header, cells, strict=True))
        arch, device = row.get("arch", "").lower(), row.get("device", "")
        if not arch or not device:
            continue
        entry: dict[str, Any] = {
            "name": f"FuriosaAI {arch.upper() if arch == 'rngd' else arch.capitalize()}",
            "vendor": "furiosa",
            "device_name": device,
        }
        if row.get("firmware"):
            entry["firmware_version"] = row["firmware"]
        if _BDF.match(row.get("pci-bdf", "")):
            entry["pci_bdf"] = row["pci-bdf"].lower()
        if arch in _FURIOSA_MEMORY_BYTES:
            entry["memory_bytes"] = _FURIOSA_MEMORY_BYTES[arch]
        found.append(entry)
    return found


def parse_npu_smi_info(text: str) -> list[dict[str, Any]]:
    """Chips from the ``npu-smi info`` table: two lines per chip, up to the process table.

    The first line reads ``| NPU Name | Health | Power Temp Hugepages |``, the second ``| Chip [Device] |
    Bus-Id | AICore Memory-Usage(MB) [HBM-Usage(MB)] |``. HBM is the card memory where it is printed
    (910 series); otherwise (310 series) the DDR pair is. Sizes are MiB.
    """
    found = []
    pending: dict[str, Any] | None = None
    for cells in _table_rows(text):
        if any("Process id" in cell or "Process name" in cell for cell in cells):
            break
        if len(cells) < 3:
            continue
        if pending is None:
            first = re.match(r"^(\d+)\s+(\S.*)$", cells[0])
            if first and cells[1] and not _BDF.match(cells[1]):
                name = first.group(2).strip()
                pending = {
                    "name": f"Ascend {name}" if name[:1].isdigit() else name,
                    "vendor": "huawei",
                    "npu_index": int(first.group(1)),
                    "health": cells[1],
                }
            continue
        if re.match(r"^\d+", cells[0]) and _BDF.match(cells[1]):
            pending["pci_bdf"] = cells[1].lower()
            pairs = [(int(used), int(total)) for used, total in _PAIR.findall(cells[2]) if int(total) > 0]
            if pairs:
                used_mib, total_mib = pairs[-1]
                pending["memory_bytes"] = total_mib * 2**20
                pending["free_memory_bytes"] = max(total_mib - used_mib, 0) * 2**20
            found.append(pending)
        pending = None
    return found


# (tool names to look for, argv after the executable, parser)
_CLIS: tuple[tuple[tuple[str, ...], tuple[str, ...], Callable[[str], list[dict[str, Any]]]], ...] = (
    (("rbln-smi", "rbln-stat"), ("-j",), parse_rbln_stat_json),
    (("furiosa-smi",), ("info",), parse_furiosa_smi_info),
    (("npu-smi",), ("info",), parse_npu_smi_info),
)


def _read_hex(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip(), 16)
    except (OSError, ValueError):
        return None


class NpuProbe:
    """Finds NPUs in sysfs under ``sysfs_root`` and through vendor CLIs. Never raises.

    ``run`` runs a CLI (``Runner``; default ``run_command``) and ``which`` finds one on PATH (default
    ``shutil.which``); tests inject both, along with a fake sysfs tree.
    """

    name = "npu"

    def __init__(
        self,
        sysfs_root: str = "/",
        run: Runner | None = None,
        which: Callable[[str], str | None] | None = None,
    ) -> None:
        self.sysfs_root = Path(sysfs_root)
        self._run = run or run_command
        self._which = which or shutil.which

    def probe(self) -> ProbeResult:
        entries = self._sysfs_devices()
        notes: list[str] = []
        errors: list[dict[str, str]] = []
        for names, args, parse in _CLIS:
            tool, path = self._find(names)
            if path is None:
                continue
            try:
                devices = parse(self._run([path, *args], CLI_TIMEOUT_S))
            except Exception as exc:  # timeout, non-zero exit, output in a shape we do not know
                log.debug("%s failed: %s", tool, exc)
                errors.append({"tool": tool, "error": f"{type(exc).__name__}: {exc}"})
                continue
            if not devices:
                notes.append(f"{tool} lists no devices")
            for device in devices:
                self._merge(entries, device, tool)

        resources = [self._resource(index, entry) for index, entry in enumerate(entries)]
        failed = "; ".join(f"{e['tool']} failed ({e['error']})" for e in errors)
        extra = "; ".join(filter(None, [*notes, failed]))
        if not resources:
            return ProbeResult.none(self._why_none() + (f"; {extra}" if extra else ""), errors=errors)
        listed = ", ".join(f"{r.id} {r.name}" for r in resources)
        return ProbeResult.found(resources, listed + (f"; {extra}" if extra else ""), errors=errors)

    def _find(self, names: Sequence[str]) -> tuple[str, str | None]:
        for name in names:
            try:
                path = self._which(name)
            except Exception:  # a broken PATH entry must not stop discovery
                path = None
            if path:
                return name, path
        return names[0], None

    def _sysfs_devices(self) -> list[dict[str, Any]]:
        """Accel devices in sysfs, plus /dev/accel nodes sysfs does not show (as unknown devices)."""
        in_sysfs = {
            int(m.group(1)): path
            for path, m in self._accel_names(self.sysfs_root / "sys" / "class" / "accel")
        }
        in_dev = {int(m.group(1)) for _path, m in self._accel_names(self.sysfs_root / "dev" / "accel")}
        return [
            self._accel_entry(number, in_sysfs.get(number)) for number in sorted(in_sysfs.keys() | in_dev)
        ]

    @staticmethod
    def _accel_names(folder: Path) -> list[tuple[Path, re.Match[str]]]:
        try:
            return [(entry, match) for entry in folder.iterdir() if (match := _ACCEL.match(entry.name))]
        except OSError:
            return []

    def _accel_entry(self, number: int, sysfs: Path | None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "dev_path": f"/dev/accel/accel{number}",
            "source": "sysfs",
            "vendor": "unknown",
        }
        if sysfs is None:
            entry["name"] = f"accel{number} (no sysfs entry)"
            return entry
        device = sysfs / "device"
        vendor_id, device_id = _read_hex(device / "vendor"), _read_hex(device / "device")
        try:
            driver = os.path.basename(os.readlink(device / "driver"))
        except OSError:
            driver = ""
        vendor = _DRIVER_VENDORS.get(driver) or _PCI_VENDORS.get(vendor_id or -1, "unknown")
        entry.update(vendor=vendor, driver=driver)
        if vendor_id is not None:
            entry["vendor_id"] = f"{vendor_id:#06x}"
        if device_id is not None:
            entry["device_id"] = f"{device_id:#06x}"
        try:
            bdf = os.path.basename(os.path.realpath(device))
        except OSError:
            bdf = ""
        if _BDF.match(bdf):
            entry["pci_bdf"] = bdf.lower()
        if vendor in ("intel", "amd"):
            entry["shares_host_memory"] = True  # client NPUs compute out of host RAM
        default = f"{vendor.capitalize()} NPU" if vendor != "unknown" else f"accel{number}"
        entry["name"] = _NPU_NAMES.get((vendor, device_id or -1), default)
        return entry

    @staticmethod
    def _merge(entries: list[dict[str, Any]], device: dict[str, Any], tool: str) -> None:
        """Add a CLI's device, or enrich the sysfs device at the same PCI address."""
        bdf = device.get("pci_bdf")
        for entry in entries:
            if bdf and entry.get("pci_bdf") == bdf and entry["source"] == "sysfs":
                known_vendor = entry["vendor"]
                entry.update(device)
                if known_vendor != "unknown":
                    entry["vendor"] = known_vendor
                entry["source"] = f"sysfs+{tool}"
                return
        entries.append({**device, "source": tool})

    def _why_none(self) -> str:
        modules = self.sysfs_root / "sys" / "module"
        loaded = [name for name in ("intel_vpu", "amdxdna") if (modules / name).is_dir()]
        drivers = (
            f"{' and '.join(loaded)} loaded but bound to no device"
            if loaded
            else "intel_vpu / amdxdna drivers not loaded"
        )
        return (
            f"no accel devices under /sys/class/accel; {drivers}; "
            "no vendor NPU tool (rbln-smi, rbln-stat, furiosa-smi, npu-smi) on PATH answered with a device"
        )

    @staticmethod
    def _resource(index: int, entry: dict[str, Any]) -> Resource:
        attributes = {k: v for k, v in entry.items() if k not in ("name", "source")}
        attributes.setdefault("driver", "")
        low_power = not re.search(r"\b910", entry["name"])
        return Resource(
            f"npu:{index}",
            ResourceType.NPU,
            entry["name"],
            attributes,
            frozenset({"low-power"}) if low_power else frozenset(),
            entry["source"],
        )
