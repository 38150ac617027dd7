"""The shipped FakeNvml behaves like pynvml where xpuflow depends on it."""

from __future__ import annotations

import threading
import warnings

import pytest

from xpuflow.testing import FakeGpu, FakeNvml
from xpuflow.testing.fake_nvml import (
    NVML_DEVICE_MIG_ENABLE,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_UNINITIALIZED,
    NVML_TEMPERATURE_GPU,
    NVMLError,
)

GIB = 1 << 30


def test_calls_before_init_fail_like_nvml() -> None:
    nvml = FakeNvml([FakeGpu()])
    with pytest.raises(NVMLError) as caught:
        nvml.nvmlDeviceGetCount()
    assert caught.value.value == NVML_ERROR_UNINITIALIZED
    assert str(caught.value) == "Uninitialized"


def test_return_shapes_match_pynvml() -> None:
    nvml = FakeNvml(
        [FakeGpu("NVIDIA L4", 24 * GIB, 2 * GIB, cc=(8, 9), utilization_pct=7)], cuda_driver_version=12020
    )
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)

    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    assert (memory.total, memory.used, memory.free) == (24 * GIB, 2 * GIB, 22 * GIB)
    assert nvml.nvmlDeviceGetCudaComputeCapability(handle) == (8, 9)
    assert nvml.nvmlSystemGetCudaDriverVersion() == 12020
    assert isinstance(nvml.nvmlSystemGetDriverVersion(), str)
    assert nvml.nvmlDeviceGetUtilizationRates(handle).gpu == 7
    assert isinstance(nvml.nvmlDeviceGetTemperature(handle, NVML_TEMPERATURE_GPU), int)
    assert nvml.nvmlDeviceGetPowerUsage(handle) == 70_000  # milliwatts
    nvml.nvmlShutdown()


def test_mig_calls() -> None:
    nvml = FakeNvml([FakeGpu(mig_enabled=True, mig_devices=2), FakeGpu(mig_supported=False)])
    nvml.nvmlInit()
    h100, l4 = nvml.nvmlDeviceGetHandleByIndex(0), nvml.nvmlDeviceGetHandleByIndex(1)

    assert nvml.nvmlDeviceGetMigMode(h100) == [NVML_DEVICE_MIG_ENABLE, NVML_DEVICE_MIG_ENABLE]
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(h100) == 7
    nvml.nvmlDeviceGetMigDeviceHandleByIndex(h100, 1)
    with pytest.raises(NVMLError) as not_found:
        nvml.nvmlDeviceGetMigDeviceHandleByIndex(h100, 2)
    assert not_found.value.value == NVML_ERROR_NOT_FOUND
    with pytest.raises(NVMLError) as unsupported:
        nvml.nvmlDeviceGetMigMode(l4)
    assert unsupported.value.value == NVML_ERROR_NOT_SUPPORTED


def test_failures_can_be_switched_on_and_off() -> None:
    nvml = FakeNvml([FakeGpu(), FakeGpu()])
    nvml.nvmlInit()
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(2)]

    nvml.fail("nvmlDeviceGetTemperature", index=1)
    assert nvml.nvmlDeviceGetTemperature(handles[0], NVML_TEMPERATURE_GPU) == 35
    with pytest.raises(NVMLError):
        nvml.nvmlDeviceGetTemperature(handles[1], NVML_TEMPERATURE_GPU)

    nvml.recover("nvmlDeviceGetTemperature")
    assert nvml.nvmlDeviceGetTemperature(handles[1], NVML_TEMPERATURE_GPU) == 35
    with pytest.raises(ValueError, match="no call"):
        nvml.fail("nvmlDeviceGetBogus")


def test_setters_change_live_readings() -> None:
    nvml = FakeNvml([FakeGpu(memory_total_bytes=16 * GIB)])
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)

    nvml.set_memory_used(0, 12 * GIB)
    nvml.set_utilization(0, 99, memory_pct=80)
    nvml.set_temperature(0, 83)
    nvml.set_power_usage(0, 250_000)

    assert nvml.nvmlDeviceGetMemoryInfo(handle).free == 4 * GIB
    assert nvml.nvmlDeviceGetUtilizationRates(handle).memory == 80
    assert nvml.nvmlDeviceGetTemperature(handle, NVML_TEMPERATURE_GPU) == 83
    assert nvml.nvmlDeviceGetPowerUsage(handle) == 250_000
    with pytest.raises(ValueError, match="used_bytes"):
        nvml.set_memory_used(0, 17 * GIB)


def test_reads_while_another_thread_writes() -> None:
    nvml = FakeNvml([FakeGpu(memory_total_bytes=8 * GIB)])
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    stop = threading.Event()

    def writer() -> None:
        used = 0
        while not stop.is_set():
            used = (used + GIB) % (8 * GIB)
            nvml.set_memory_used(0, used)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(2000):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            assert memory.free + memory.used == memory.total
    finally:
        stop.set()
        thread.join()


def test_init_and_shutdown_are_reference_counted() -> None:
    nvml = FakeNvml([FakeGpu()])
    nvml.nvmlInit()
    nvml.nvmlInit()
    nvml.nvmlShutdown()
    assert nvml.initialized
    nvml.nvmlShutdown()
    assert not nvml.initialized
    with pytest.raises(NVMLError):
        nvml.nvmlShutdown()


def test_every_faked_call_exists_in_real_pynvml() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pynvml = pytest.importorskip("pynvml")
    missing = [name for name in FakeNvml.API if not callable(getattr(pynvml, name, None))]
    assert missing == []
    for constant in (
        "NVML_TEMPERATURE_GPU",
        "NVML_DEVICE_MIG_ENABLE",
        "NVML_ERROR_NOT_FOUND",
        "NVML_ERROR_NOT_SUPPORTED",
    ):
        assert getattr(pynvml, constant) == getattr(FakeNvml, constant), constant
