"""NpuProbe on fake sysfs trees, and the vendor CLIs through an injected runner."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pytest

from xpuflow.discovery.npu import (
    CLI_TIMEOUT_S,
    NpuProbe,
    parse_furiosa_smi_info,
    parse_npu_smi_info,
    parse_rbln_stat_json,
)
from xpuflow.types import ResourceType

if TYPE_CHECKING:
    from conftest import FakeSysfs

GIB = 1 << 30

# Shaped like `rbln-stat -j` from the RBLN driver package: bytes as strings, a KMD version, contexts.
RBLN_JSON = json.dumps(
    {
        "KMD_version": "1.3.73",
        "devices": [
            {
                "npu": "0",
                "name": "RBLN-CA12",
                "sid": "00000000000000",
                "uuid": "6A3E0B1C-5D2F-4A8B-9C7E-1F0A2B3C4D5E",
                "device": "rbln0",
                "status": "normal",
                "fw_ver": "1.3.73",
                "pci": {
                    "dev": "rbln0",
                    "bus_id": "0000:51:00.0",
                    "numa_node": "0",
                    "link_speed": "16.0GT/s",
                    "link_width": "16",
                },
                "temperature": "38C",
                "card_power": "43900mW",
                "pstate": "P2",
                "memory": {"used": "2576980378", "total": "16858370048"},
                "util": "98.7",
                "board_info": "RBLN-CA12",
                "location": 5,
            },
            {
                "npu": "1",
                "name": "RBLN-CA12",
                "uuid": "7B4F1C2D-6E3A-4B9C-8D1F-2A0B3C4D5E6F",
                "device": "rbln1",
                "pci": {"bus_id": "0000:d8:00.0"},
                "memory": {"used": "0", "total": "16858370048"},
            },
        ],
        "contexts": [],
    }
)

FURIOSA_INFO = """\
+------+--------+------------------+------------------+---------+---------+--------------+
| Arch | Device | Firmware         | PERT             | Temp.   | Power   | PCI-BDF      |
+------+--------+------------------+------------------+---------+---------+--------------+
| rngd | npu0   | 2025.1.0+696efad | 2025.1.0+1694e18 | 29.81°C | 35.00 W | 0000:30:00.0 |
+------+--------+------------------+------------------+---------+---------+--------------+
| rngd | npu1   | 2025.1.0+696efad | 2025.1.0+1694e18 | 30.44°C | 36.00 W | 0000:31:00.0 |
+------+--------+------------------+------------------+---------+---------+--------------+
"""

NPU_SMI_910B = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 24.1.rc1                 Version: 24.1.rc1                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 101.8       43                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          3318 / 65536         |
+===========================+===============+====================================================+
| 1     910B3               | OK            | 92.0        39                0    / 0             |
| 0                         | 0000:C2:00.0  | 0           0    / 0          59784/ 65536         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| 1       0                 | 6277          | python                   | 56485                   |
+===========================+===============+====================================================+
"""

NPU_SMI_310P = """\
+--------------------------------------------------------------------------------------------------------+
| npu-smi 23.0.0                                   Version: 23.0.0                                       |
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===============================+=================+======================================================+
| 0       310P3                 | OK              | NA           45                0     / 0             |
| 0       0                     | 0000:01:00.0    | 0            1782 / 21527                            |
+===============================+=================+======================================================+
"""


class Tools:
    """An injected ``which`` and ``run``: the CLIs on the fake PATH and what each prints (or raises)."""

    def __init__(self, outputs: dict[str, str | Exception]) -> None:
        self.outputs = outputs
        self.calls: list[tuple[list[str], float]] = []

    def which(self, name: str) -> str | None:
        return f"/opt/vendor/bin/{name}" if name in self.outputs else None

    def run(self, argv: Sequence[str], timeout_s: float) -> str:
        self.calls.append((list(argv), timeout_s))
        output = self.outputs[argv[0].rsplit("/", 1)[-1]]
        if isinstance(output, Exception):
            raise output
        return output


def _probe(root: object, tools: Tools | None = None) -> NpuProbe:
    tools = tools or Tools({})
    return NpuProbe(str(root), run=tools.run, which=tools.which)


def test_intel_and_amd_npus_in_sysfs(sysfs: FakeSysfs) -> None:
    sysfs.accel("accel0", sysfs.pci_device("0000:00:0b.0", 0x8086, 0x7D1D, driver="intel_vpu"))
    sysfs.accel("accel1", sysfs.pci_device("0000:c5:00.1", 0x1022, 0x17F0, driver="amdxdna"))

    result = _probe(sysfs.root).probe()

    intel, amd = result.resources
    assert (intel.id, amd.id) == ("npu:0", "npu:1")
    assert intel.type is amd.type is ResourceType.NPU
    assert (intel.vendor, intel.attributes["driver"], intel.attributes["device_id"]) == (
        "intel",
        "intel_vpu",
        "0x7d1d",
    )
    assert intel.name == "Intel NPU (Meteor Lake)"
    assert intel.attributes["dev_path"] == "/dev/accel/accel0"
    assert intel.attributes["pci_bdf"] == "0000:00:0b.0"
    assert (amd.vendor, amd.attributes["driver"]) == ("amd", "amdxdna")
    assert amd.name == "AMD XDNA 2 NPU (Strix / Krackan)"
    assert intel.tags == amd.tags == {"low-power"}
    assert "npu:0 Intel NPU (Meteor Lake)" in result.reason


def test_unknown_accel_vendor_is_still_listed(sysfs: FakeSysfs) -> None:
    sysfs.accel("accel0", sysfs.pci_device("0000:17:00.0", 0x1E2F, 0x0100, driver="vendor_accel"))
    sysfs.dev_accel("accel3")  # a node whose sysfs entry this container cannot see

    result = _probe(sysfs.root).probe()

    known, bare = result.resources
    assert known.vendor == "unknown"
    assert (known.attributes["vendor_id"], known.attributes["device_id"]) == ("0x1e2f", "0x0100")
    assert known.attributes["driver"] == "vendor_accel"
    assert bare.attributes["dev_path"] == "/dev/accel/accel3"
    assert bare.vendor == "unknown"


def test_nothing_found_says_why(sysfs: FakeSysfs) -> None:
    result = _probe(sysfs.root).probe()

    assert result.resources == ()
    assert result.reason.startswith(
        "no accel devices under /sys/class/accel; intel_vpu / amdxdna drivers not loaded"
    )


def test_loaded_driver_without_device_is_named(sysfs: FakeSysfs) -> None:
    sysfs.module("intel_vpu")
    assert "intel_vpu loaded but bound to no device" in _probe(sysfs.root).probe().reason


def test_vendor_clis(sysfs: FakeSysfs) -> None:
    tools = Tools({"rbln-stat": RBLN_JSON, "furiosa-smi": FURIOSA_INFO, "npu-smi": NPU_SMI_910B})

    result = _probe(sysfs.root, tools).probe()

    names = [(r.id, r.name, r.vendor) for r in result.resources]
    assert names == [
        ("npu:0", "Rebellions RBLN-CA12", "rebellions"),
        ("npu:1", "Rebellions RBLN-CA12", "rebellions"),
        ("npu:2", "FuriosaAI RNGD", "furiosa"),
        ("npu:3", "FuriosaAI RNGD", "furiosa"),
        ("npu:4", "Ascend 910B3", "huawei"),
        ("npu:5", "Ascend 910B3", "huawei"),
    ]
    rbln, furiosa, ascend = result.resources[0], result.resources[2], result.resources[5]
    assert rbln.memory_bytes == 16858370048
    assert rbln.free_memory_bytes == 16858370048 - 2576980378
    assert rbln.attributes["pci_bdf"] == "0000:51:00.0"
    assert rbln.source == "rbln-stat"
    assert furiosa.memory_bytes == 48 * GIB
    assert furiosa.attributes["firmware_version"] == "2025.1.0+696efad"
    assert ascend.memory_bytes == 65536 << 20
    assert ascend.free_memory_bytes == (65536 - 59784) << 20
    assert ascend.attributes["pci_bdf"] == "0000:c2:00.0"
    assert "low-power" in rbln.tags
    assert "low-power" in furiosa.tags
    assert "low-power" not in ascend.tags  # a 910 draws as much as a datacenter GPU
    assert [call for call, _ in tools.calls] == [
        ["/opt/vendor/bin/rbln-stat", "-j"],
        ["/opt/vendor/bin/furiosa-smi", "info"],
        ["/opt/vendor/bin/npu-smi", "info"],
    ]
    assert {timeout for _, timeout in tools.calls} == {CLI_TIMEOUT_S}


def test_cli_device_on_a_known_pci_address_enriches_the_sysfs_device(sysfs: FakeSysfs) -> None:
    sysfs.accel("accel0", sysfs.pci_device("0000:30:00.0", 0x1ED2, 0x0001, driver="rngd"))
    tools = Tools({"furiosa-smi": FURIOSA_INFO})

    result = _probe(sysfs.root, tools).probe()

    merged, other = result.resources
    assert merged.id == "npu:0"
    assert merged.name == "FuriosaAI RNGD"
    assert merged.vendor == "furiosa"
    assert merged.attributes["driver"] == "rngd"
    assert merged.attributes["dev_path"] == "/dev/accel/accel0"
    assert merged.memory_bytes == 48 * GIB
    assert merged.source == "sysfs+furiosa-smi"
    assert other.attributes["pci_bdf"] == "0000:31:00.0"


def test_failing_clis_are_recorded_not_raised(sysfs: FakeSysfs) -> None:
    tools = Tools(
        {
            "rbln-smi": subprocess.TimeoutExpired(["rbln-smi", "-j"], CLI_TIMEOUT_S),
            "furiosa-smi": subprocess.CalledProcessError(1, ["furiosa-smi", "info"], stderr="no device"),
            "npu-smi": "dcmi model initialized failed, because the device is used. ret is -8020\n",
        }
    )

    result = _probe(sysfs.root, tools).probe()

    assert result.resources == ()
    assert [e["tool"] for e in result.details["errors"]] == ["rbln-smi", "furiosa-smi"]
    assert "rbln-smi failed (TimeoutExpired" in result.reason
    assert "npu-smi lists no devices" in result.reason


def test_rbln_output_that_is_not_json_is_recorded(sysfs: FakeSysfs) -> None:
    result = _probe(sysfs.root, Tools({"rbln-stat": "+-----+\n| NPU | Name |\n"})).probe()
    assert result.details["errors"][0]["tool"] == "rbln-stat"
    assert "JSONDecodeError" in result.details["errors"][0]["error"]


def test_parse_npu_smi_310p_uses_ddr_memory() -> None:
    (chip,) = parse_npu_smi_info(NPU_SMI_310P)
    assert chip["name"] == "Ascend 310P3"
    assert chip["memory_bytes"] == 21527 << 20
    assert chip["pci_bdf"] == "0000:01:00.0"


def test_parse_npu_smi_stops_at_the_process_table() -> None:
    chips = parse_npu_smi_info(NPU_SMI_910B)
    assert [c["npu_index"] for c in chips] == [0, 1]
    assert chips[0]["health"] == "OK"


@pytest.mark.parametrize("text", ["", "garbage", "| a | b |\n| 1 2 | 3 |"])
def test_table_parsers_tolerate_garbage(text: str) -> None:
    assert parse_furiosa_smi_info(text) == []
    assert parse_npu_smi_info(text) == []


def test_parse_rbln_rejects_json_without_devices() -> None:
    with pytest.raises(ValueError, match="devices"):
        parse_rbln_stat_json('{"KMD_version": "1.0"}')


def test_parse_rbln_reads_sizes_with_units() -> None:
    text = json.dumps({"devices": [{"name": "RBLN-CA22", "memory": {"total": "15.7GiB", "used": "0.0B"}}]})
    (device,) = parse_rbln_stat_json(text)
    assert device["memory_bytes"] == int(15.7 * GIB)
    assert device["free_memory_bytes"] == int(15.7 * GIB)


def test_on_this_machine_never_raises() -> None:
    result = NpuProbe().probe()
    assert result.reason
    assert all(r.type is ResourceType.NPU for r in result.resources)
