"""NvidiaProbe against the shipped FakeNvml, and against whatever NVML this machine has."""

from __future__ import annotations

import pytest

from xpuflow.discovery.nvidia import NvidiaProbe
from xpuflow.testing import FakeGpu, FakeNvml
from xpuflow.testing.fake_nvml import NVML_ERROR_LIBRARY_NOT_FOUND
from xpuflow.types import ResourceType

GIB = 1 << 30


def _h100(**overrides: object) -> FakeGpu:
    fields: dict[str, object] = {
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total_bytes": 80 * GIB,
        "memory_used_bytes": 20 * GIB,
        "cc": (9, 0),
        "mig_enabled": True,
        "mig_devices": 3,
        "utilization_pct": 42,
        "temperature_c": 51,
        "power_usage_mw": 312_450,
        "power_limit_mw": 700_000,
    }
    fields.update(overrides)
    return FakeGpu(**fields)  # type: ignore[arg-type]


def _l4() -> FakeGpu:
    return FakeGpu(
        name="NVIDIA L4",
        memory_total_bytes=24 * GIB,
        memory_used_bytes=1 * GIB,
        cc=(8, 9),
        mig_supported=False,
        power_usage_mw=35_000,
        power_limit_mw=72_000,
    )


def test_two_gpus_of_different_sizes() -> None:
    nvml = FakeNvml([_h100(), _l4()], driver_version="550.54.15", cuda_driver_version=12040)

    result = NvidiaProbe(nvml=nvml).probe()

    h100, l4 = result.resources
    assert (h100.id, l4.id) == ("cuda:0", "cuda:1")
    assert h100.type is l4.type is ResourceType.GPU
    assert h100.vendor == l4.vendor == "nvidia"
    assert h100.name == "NVIDIA H100 80GB HBM3"
    assert h100.memory_bytes == 80 * GIB
    assert h100.free_memory_bytes == 60 * GIB
    assert h100.attributes["used_memory_bytes"] == 20 * GIB
    assert h100.attributes["compute_capability"] == "9.0"
    assert l4.attributes["compute_capability"] == "8.9"
    assert l4.memory_bytes == 24 * GIB
    assert h100.attributes["driver_version"] == "550.54.15"
    assert h100.attributes["cuda_driver_version"] == "12.4"
    assert h100.attributes["utilization_pct"] == 42
    assert h100.attributes["temperature_c"] == 51
    assert h100.attributes["power_w"] == 312.4  # round(312.45, 1): milliwatts become watts
    assert h100.attributes["power_limit_w"] == 700.0
    assert h100.attributes["uuid"].startswith("GPU-")
    assert h100.attributes["uuid"] != l4.attributes["uuid"]
    assert result.details["errors"] == []
    assert "cuda:0 NVIDIA H100 80GB HBM3 80.0 GiB" in result.reason
    assert "CUDA 12.4" in result.reason


def test_mig_mode_and_mig_device_count() -> None:
    result = NvidiaProbe(nvml=FakeNvml([_h100(), _l4(), _h100(mig_enabled=False)])).probe()

    h100, l4, h100_no_mig = result.resources
    assert h100.attributes["mig_mode"] is True
    assert h100.attributes["mig_devices"] == 3
    # The L4 has no MIG at all: NVML answers Not Supported, which means "off", not a failure.
    assert l4.attributes["mig_mode"] is False
    assert "mig_devices" not in l4.attributes
    assert h100_no_mig.attributes["mig_mode"] is False
    assert result.details["errors"] == []


def test_one_failing_call_drops_the_field_not_the_gpu() -> None:
    nvml = FakeNvml([_h100(), _l4()], failing_calls={"nvmlDeviceGetPowerUsage"})

    result = NvidiaProbe(nvml=nvml).probe()

    assert [r.id for r in result.resources] == ["cuda:0", "cuda:1"]
    for gpu in result.resources:
        assert "power_w" not in gpu.attributes
        assert gpu.attributes["power_limit_w"] > 0
        assert gpu.memory_bytes is not None
    errors = result.details["errors"]
    assert [(e["resource"], e["call"]) for e in errors] == [
        ("cuda:0", "nvmlDeviceGetPowerUsage"),
        ("cuda:1", "nvmlDeviceGetPowerUsage"),
    ]
    assert "Unknown Error" in errors[0]["error"]
    assert "2 NVML calls failed" in result.reason


def test_a_call_failing_on_one_gpu_only() -> None:
    nvml = FakeNvml([_h100(), _l4()], failing_calls={("nvmlDeviceGetMemoryInfo", 1)})

    h100, l4 = NvidiaProbe(nvml=nvml).probe().resources

    assert h100.memory_bytes == 80 * GIB
    assert l4.memory_bytes is None
    assert l4.attributes["compute_capability"] == "8.9"


def test_a_gpu_whose_handle_fails_is_reported_as_missing() -> None:
    nvml = FakeNvml([_h100(), _l4()], failing_calls={("nvmlDeviceGetHandleByIndex", 0)})

    result = NvidiaProbe(nvml=nvml).probe()

    assert [r.id for r in result.resources] == ["cuda:1"]
    assert "1 of 2 could not be opened" in result.reason


def test_init_failure_says_what_to_install() -> None:
    nvml = FakeNvml([_h100()], fail_init=True, init_error=NVML_ERROR_LIBRARY_NOT_FOUND)

    result = NvidiaProbe(nvml=nvml).probe()

    assert result.resources == ()
    assert "NVML Shared Library Not Found" in result.reason
    assert "install the NVIDIA driver" in result.reason
    assert nvml.shutdown_count == 0  # nothing to shut down when init failed


def test_shutdown_always_follows_init() -> None:
    nvml = FakeNvml([_h100(), _l4()], failing_calls={"nvmlDeviceGetCount"})

    result = NvidiaProbe(nvml=nvml).probe()

    assert result.resources == ()
    assert "could not count GPUs" in result.reason
    assert nvml.init_count == nvml.shutdown_count == 1
    assert not nvml.initialized

    NvidiaProbe(nvml=nvml).probe()
    assert nvml.init_count == nvml.shutdown_count == 2


def test_no_gpus() -> None:
    result = NvidiaProbe(nvml=FakeNvml([])).probe()
    assert result.resources == ()
    assert "reports no NVIDIA GPUs" in result.reason


def test_live_memory_changes_are_seen_by_the_next_probe() -> None:
    nvml = FakeNvml([_h100(memory_used_bytes=0)])
    assert NvidiaProbe(nvml=nvml).probe().resources[0].free_memory_bytes == 80 * GIB

    nvml.set_memory_used(0, 70 * GIB)

    assert NvidiaProbe(nvml=nvml).probe().resources[0].free_memory_bytes == 10 * GIB


def test_on_this_machine_never_raises() -> None:
    result = NvidiaProbe().probe()
    assert result.reason
    for gpu in result.resources:
        assert gpu.id.startswith("cuda:")
        assert gpu.vendor == "nvidia"


@pytest.mark.gpu
def test_real_gpu_is_found() -> None:
    result = NvidiaProbe().probe()
    if not result.resources:
        pytest.skip(f"no NVIDIA GPU here: {result.reason}")
    gpu = result.resources[0]
    assert gpu.memory_bytes is not None
    assert gpu.memory_bytes > 0
    assert gpu.attributes["compute_capability"]
