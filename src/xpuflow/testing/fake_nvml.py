"""A fake NVML, shaped like the ``pynvml`` module (package nvidia-ml-py), for tests and simulation.

It answers the calls xpuflow makes with the same names, arguments and return shapes as pynvml, so it
can be passed wherever the module goes (``NvidiaProbe(nvml=FakeNvml(...))``)::

    nvml = FakeNvml(
        [FakeGpu("NVIDIA H100 80GB HBM3", 80 << 30, cc=(9, 0), mig_enabled=True, mig_devices=2),
         FakeGpu("NVIDIA L4", 24 << 30, cc=(8, 9), mig_supported=False)],
        failing_calls={"nvmlDeviceGetPowerUsage"},
    )
    nvml.set_memory_used(0, 40 << 30)     # a VRAM monitor sees the change on its next poll

Like the real library, every call but ``nvmlInit`` raises ``NVMLError`` (Uninitialized) until
``nvmlInit`` has been called, and init/shutdown are reference counted. All state changes are guarded by
a lock, so a poller thread may read while a test writes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "NVML_DEVICE_MIG_DISABLE",
    "NVML_DEVICE_MIG_ENABLE",
    "NVML_ERROR_DRIVER_NOT_LOADED",
    "NVML_ERROR_GPU_IS_LOST",
    "NVML_ERROR_INVALID_ARGUMENT",
    "NVML_ERROR_LIBRARY_NOT_FOUND",
    "NVML_ERROR_NOT_FOUND",
    "NVML_ERROR_NOT_SUPPORTED",
    "NVML_ERROR_UNINITIALIZED",
    "NVML_ERROR_UNKNOWN",
    "NVML_TEMPERATURE_GPU",
    "FakeGpu",
    "FakeMemoryInfo",
    "FakeNvml",
    "FakeUtilization",
    "NVMLError",
]

# Values from nvml.h, as pynvml exposes them.
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_TEMPERATURE_GPU = 0
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1

_ERROR_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}

_GIB = 1 << 30


class NVMLError(Exception):
    """pynvml's error: ``value`` is the nvmlReturn_t code, ``str()`` the library's message for it."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _ERROR_STRINGS.get(self.value, f"NVML Error with code {self.value}")


@dataclass(frozen=True)
class FakeMemoryInfo:
    """Shaped like pynvml's ``c_nvmlMemory_t``: bytes ``total``, ``free`` and ``used``."""

    total: int
    free: int
    used: int


@dataclass(frozen=True)
class FakeUtilization:
    """Shaped like pynvml's ``c_nvmlUtilization_t``: percent busy over the last sample period."""

    gpu: int
    memory: int


@dataclass
class FakeGpu:
    """One simulated GPU. ``uuid`` defaults to a stable value derived from the index.

    ``mig_supported=False`` makes ``nvmlDeviceGetMigMode`` raise Not Supported, as it does on GPUs
    without MIG (L4, consumer cards); ``mig_devices`` is how many MIG instances exist when enabled.
    """

    name: str = "NVIDIA H100 80GB HBM3"
    memory_total_bytes: int = 80 * _GIB
    memory_used_bytes: int = 0
    cc: tuple[int, int] = (9, 0)
    uuid: str = ""
    mig_supported: bool = True
    mig_enabled: bool = False
    mig_devices: int = 0
    max_mig_devices: int = 7
    utilization_pct: int = 0
    memory_utilization_pct: int = 0
    temperature_c: int = 35
    power_usage_mw: int = 70_000
    power_limit_mw: int = 700_000

    def __post_init__(self) -> None:
        if not 0 <= self.memory_used_bytes <= self.memory_total_bytes:
            raise ValueError(
                f"memory_used_bytes must be within 0..{self.memory_total_bytes}, got {self.memory_used_bytes}"
            )


@dataclass(frozen=True)
class _Handle:
    """A device handle (pynvml returns an opaque ctypes pointer); ``mig`` marks a MIG device handle."""

    index: int
    mig: int | None = None


@dataclass
class _Failures:
    everywhere: set[str] = field(default_factory=set)
    per_device: set[tuple[str, int]] = field(default_factory=set)


class FakeNvml:
    """A module-like stand-in for ``pynvml`` over a list of ``FakeGpu``.

    ``failing_calls`` names calls that raise ``NVMLError`` (Unknown Error): a plain name fails on every
    GPU, a ``(name, index)`` pair on that GPU only. ``fail_init=True`` makes ``nvmlInit`` raise Driver
    Not Loaded (or ``init_error`` when given), as on a machine without the NVIDIA driver.
    """

    NVMLError = NVMLError
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_DISABLE = NVML_DEVICE_MIG_DISABLE
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE

    #: The pynvml functions this fake implements (a test checks each exists in the real module).
    API: tuple[str, ...] = (
        "nvmlInit",
        "nvmlShutdown",
        "nvmlSystemGetDriverVersion",
        "nvmlSystemGetCudaDriverVersion",
        "nvmlDeviceGetCount",
        "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetName",
        "nvmlDeviceGetUUID",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetCudaComputeCapability",
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetMigMode",
        "nvmlDeviceGetMaxMigDeviceCount",
        "nvmlDeviceGetMigDeviceHandleByIndex",
    )

    def __init__(
        self,
        gpus: Sequence[FakeGpu] = (),
        *,
        driver_version: str = "550.54.15",
        cuda_driver_version: int = 12040,
        failing_calls: Iterable[str | tuple[str, int]] = (),
        fail_init: bool = False,
        init_error: int = NVML_ERROR_DRIVER_NOT_LOADED,
    ) -> None:
        self._gpus = list(gpus)
        self.driver_version = driver_version
        self.cuda_driver_version = cuda_driver_version
        self.fail_init = fail_init
        self.init_error = init_error
        self._lock = threading.Lock()
        self._failures = _Failures()
        for call in failing_calls:
            if isinstance(call, tuple):
                self.fail(*call)
            else:
                self.fail(call)
        self._refcount = 0
        #: How often ``nvmlInit`` succeeded and ``nvmlShutdown`` ran (tests check they balance).
        self.init_count = 0
        self.shutdown_count = 0

    # -- test controls -----------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self._refcount > 0

    @property
    def gpus(self) -> tuple[FakeGpu, ...]:
        return tuple(self._gpus)

    def fail(self, call: str, index: int | None = None) -> None:
        """Make ``call`` raise Unknown Error, on every GPU or only on GPU ``index``."""
        if call not in self.API:
            raise ValueError(f"FakeNvml has no call {call!r}; known calls: {', '.join(self.API)}")
        with self._lock:
            if index is None:
                self._failures.everywhere.add(call)
            else:
                self._failures.per_device.add((call, index))

    def recover(self, call: str | None = None) -> None:
        """Stop failing ``call`` (every call when None)."""
        with self._lock:
            if call is None:
                self._failures = _Failures()
                return
            self._failures.everywhere.discard(call)
            self._failures.per_device = {item for item in self._failures.per_device if item[0] != call}

    def set_memory_used(self, index: int, used_bytes: int) -> None:
        """Change GPU ``index``'s used memory, as a process allocating or freeing VRAM would."""
        with self._lock:
            gpu = self._gpu(index)
            if not 0 <= used_bytes <= gpu.memory_total_bytes:
                raise ValueError(f"used_bytes must be within 0..{gpu.memory_total_bytes}, got {used_bytes}")
            gpu.memory_used_bytes = used_bytes

    def set_utilization(self, index: int, gpu_pct: int, memory_pct: int | None = None) -> None:
        with self._lock:
            gpu = self._gpu(index)
            gpu.utilization_pct = gpu_pct
            if memory_pct is not None:
                gpu.memory_utilization_pct = memory_pct

    def set_temperature(self, index: int, temperature_c: int) -> None:
        with self._lock:
            self._gpu(index).temperature_c = temperature_c

    def set_power_usage(self, index: int, power_usage_mw: int) -> None:
        with self._lock:
            self._gpu(index).power_usage_mw = power_usage_mw

    # -- internals ---------------------------------------------------------------------------------

    def _gpu(self, index: int) -> FakeGpu:
        if not 0 <= index < len(self._gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self._gpus[index]

    def _check(self, call: str) -> None:
        """What every call shares: the library is initialised and the call is not told to fail."""
        if self._refcount <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        if call in self._failures.everywhere:
            raise NVMLError(NVML_ERROR_UNKNOWN)

    def _device(self, call: str, handle: _Handle) -> FakeGpu:
        """``_check`` plus a valid handle and no failure set for this GPU; the GPU behind the handle."""
        self._check(call)
        if not isinstance(handle, _Handle):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if (call, handle.index) in self._failures.per_device:
            raise NVMLError(NVML_ERROR_UNKNOWN)
        return self._gpu(handle.index)

    # -- the pynvml API ----------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError(self.init_error)
        with self._lock:
            self._refcount += 1
            self.init_count += 1

    def nvmlShutdown(self) -> None:
        with self._lock:
            if self._refcount <= 0:
                raise NVMLError(NVML_ERROR_UNINITIALIZED)
            self._refcount -= 1
            self.shutdown_count += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        """The CUDA version the driver supports, as ``major * 1000 + minor * 10`` (12040 is 12.4)."""
        self._check("nvmlSystemGetCudaDriverVersion")
        return self.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check("nvmlDeviceGetHandleByIndex")
        if ("nvmlDeviceGetHandleByIndex", index) in self._failures.per_device:
            raise NVMLError(NVML_ERROR_UNKNOWN)
        self._gpu(index)
        return _Handle(index)

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        gpu = self._device("nvmlDeviceGetName", handle)
        return gpu.name

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        gpu = self._device("nvmlDeviceGetUUID", handle)
        return gpu.uuid or f"GPU-{handle.index:08x}-0000-4000-8000-{handle.index:012x}"

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle) -> FakeMemoryInfo:
        gpu = self._device("nvmlDeviceGetMemoryInfo", handle)
        with self._lock:
            used = gpu.memory_used_bytes
            return FakeMemoryInfo(total=gpu.memory_total_bytes, free=gpu.memory_total_bytes - used, used=used)

    def nvmlDeviceGetCudaComputeCapability(self, handle: _Handle) -> tuple[int, int]:
        gpu = self._device("nvmlDeviceGetCudaComputeCapability", handle)
        return gpu.cc

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> FakeUtilization:
        gpu = self._device("nvmlDeviceGetUtilizationRates", handle)
        with self._lock:
            return FakeUtilization(gpu=gpu.utilization_pct, memory=gpu.memory_utilization_pct)

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        gpu = self._device("nvmlDeviceGetTemperature", handle)
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        """Board power draw in milliwatts."""
        gpu = self._device("nvmlDeviceGetPowerUsage", handle)
        return gpu.power_usage_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: _Handle) -> int:
        """The power cap in force, in milliwatts."""
        gpu = self._device("nvmlDeviceGetEnforcedPowerLimit", handle)
        return gpu.power_limit_mw

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        """``[current, pending]`` MIG mode (NVML_DEVICE_MIG_ENABLE or _DISABLE)."""
        gpu = self._device("nvmlDeviceGetMigMode", handle)
        if not gpu.mig_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        mode = NVML_DEVICE_MIG_ENABLE if gpu.mig_enabled else NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:
        gpu = self._device("nvmlDeviceGetMaxMigDeviceCount", handle)
        if not gpu.mig_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.max_mig_devices

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: _Handle, index: int) -> _Handle:
        """The MIG device at ``index`` on this GPU; Not Found where no MIG device sits at that index."""
        gpu = self._device("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if not gpu.mig_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= index < gpu.max_mig_devices:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if not gpu.mig_enabled or index >= gpu.mig_devices:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return _Handle(handle.index, mig=index)
