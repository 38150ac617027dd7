"""The discovery package as a whole: its exports, its imports, and a real run on this machine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import xpuflow.discovery
from xpuflow.discovery import Inventory, detect
from xpuflow.types import ResourceType

DEFAULT_PROBES = {"cpu", "nvidia", "amd", "igpu", "npu", "torch", "declared"}


def test_public_names_are_pinned() -> None:
    assert sorted(xpuflow.discovery.__all__) == [
        "AmdProbe",
        "CpuProbe",
        "DeclaredProbe",
        "IntegratedGpuProbe",
        "Inventory",
        "NpuProbe",
        "NvidiaProbe",
        "Probe",
        "ProbeReport",
        "ProbeResult",
        "TorchProbe",
        "default_probes",
        "detect",
    ]


def test_importing_discovery_imports_no_vendor_library() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        import xpuflow.discovery
        from xpuflow.discovery import default_probes
        default_probes()
        vendor = ("torch", "pynvml", "amdsmi", "torch_directml")
        print(json.dumps(sorted(m for m in vendor if m in sys.modules)))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(completed.stdout) == []


def test_detect_on_this_machine() -> None:
    inventory = Inventory.detect()

    assert {report.probe for report in inventory.reports} == DEFAULT_PROBES
    assert all(report.reason for report in inventory.reports)
    cpu = inventory.cpu
    assert cpu is not None
    assert cpu.type is ResourceType.CPU
    assert cpu.memory_bytes is not None
    assert cpu.memory_bytes > 0
    assert len({r.id for r in inventory.resources}) == len(inventory.resources)
    json.dumps(inventory.to_dict())  # the CLI prints this as JSON


def test_probes_other_than_torch_are_fast() -> None:
    inventory = Inventory.detect()
    elapsed_ms = sum(r.elapsed_ms for r in inventory.reports if r.probe != "torch")
    assert elapsed_ms < 1000, [(r.probe, round(r.elapsed_ms)) for r in inventory.reports]


def test_detect_includes_declared_devices() -> None:
    inventory = detect(
        declared=[{"id": "remote:vllm-a", "type": "remote", "endpoint": "http://127.0.0.1:9/v1"}]
    )

    remote = inventory.get("remote:vllm-a")
    assert remote is not None
    assert remote.type is ResourceType.REMOTE
    assert inventory.overview()["remote"][0]["id"] == "remote:vllm-a"
