"""Fake machines for the discovery tests: sysfs trees built in tmp_path, and the cpuinfo fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CPUINFO_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cpuinfo"


class FakeSysfs:
    """A root directory laid out like the parts of /sys, /dev and /proc the probes read."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def pci_device(self, bdf: str, vendor: int, device: int, driver: str | None = None) -> Path:
        """A PCI function under /sys/devices with its ids and, when bound, the ``driver`` symlink."""
        path = self.root / "sys" / "devices" / "pci0000:00" / bdf
        path.mkdir(parents=True, exist_ok=True)
        (path / "vendor").write_text(f"{vendor:#06x}\n")
        (path / "device").write_text(f"{device:#06x}\n")
        if driver is not None:
            target = self.root / "sys" / "bus" / "pci" / "drivers" / driver
            target.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(target, path), path / "driver")
        return path

    def _class_entry(self, klass: str, name: str, device: Path | None) -> Path:
        entry = self.root / "sys" / "class" / klass / name
        entry.mkdir(parents=True)
        if device is not None:
            os.symlink(os.path.relpath(device, entry), entry / "device")
        return entry

    def drm_card(self, name: str, device: Path | None) -> Path:
        return self._class_entry("drm", name, device)

    def accel(self, name: str, device: Path | None, *, dev_node: bool = True) -> Path:
        entry = self._class_entry("accel", name, device)
        if dev_node:
            self.dev_accel(name)
        return entry

    def dev_accel(self, name: str) -> Path:
        node = self.root / "dev" / "accel" / name
        node.parent.mkdir(parents=True, exist_ok=True)
        node.touch()
        return node

    def module(self, name: str) -> None:
        (self.root / "sys" / "module" / name).mkdir(parents=True)

    def meminfo(self, total_kib: int, available_kib: int) -> Path:
        path = self.root / "proc" / "meminfo"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"MemTotal:       {total_kib} kB\nMemFree:        {available_kib // 2} kB\n"
            f"MemAvailable:   {available_kib} kB\nBuffers:          123456 kB\n"
        )
        return path


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "root")


@pytest.fixture
def cpuinfo_fixtures() -> Path:
    return CPUINFO_FIXTURES
