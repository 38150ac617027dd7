"""NVIDIA GPUs through NVML (package nvidia-ml-py, module ``pynvml``, imported only when probing).

One ``Resource`` per GPU, id ``"cuda:{index}"`` in NVML's order::

    from xpuflow.testing import FakeGpu, FakeNvml

    result = NvidiaProbe(nvml=FakeNvml([FakeGpu("NVIDIA L4", 24 << 30, cc=(8, 9))])).probe()
    result.resources[0].attributes["compute_capability"]   # "8.9"

A call that fails for one GPU (power readings are not supported on every board, a GPU can fall off the
bus) leaves that field out and is listed in ``details["errors"]``; the GPU is still reported.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from xpuflow.discovery.base import ProbeResult
from xpuflow.types import Resource, ResourceType

__all__ = ["NvidiaProbe"]

log = logging.getLogger(__name__)

# nvml.h values, used when the injected module does not carry them.
_NVML_ERROR_NOT_SUPPORTED = 3
_NVML_ERROR_NOT_FOUND = 6
_NVML_DEVICE_MIG_ENABLE = 1
_NVML_TEMPERATURE_GPU = 0

_INSTALL_DRIVER = (
    "install the NVIDIA driver (it provides libnvidia-ml.so.1; `nvidia-smi` should list the GPUs) "
    "to use NVIDIA GPUs"
)


def _describe(exc: BaseException) -> str:
    """An NVML error as text. pynvml's ``__str__`` itself calls into the library, which may be absent."""
    try:
        text = str(exc)
    except Exception:  # the message lookup needs the library that just failed to load
        text = ""
    code = getattr(exc, "value", None)
    text = text or type(exc).__name__
    return f"{text} (code {code})" if isinstance(code, int) and str(code) not in text else text


def _text(value: Any) -> str:
    """Old pynvml releases return bytes where new ones return str."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Calls:
    """Runs NVML calls, turning each failure into an ``errors`` entry instead of an exception."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.errors: list[dict[str, str]] = []

    def code(self, name: str, default: int) -> int:
        value = getattr(self.nvml, name, default)
        return value if isinstance(value, int) else default

    def get(self, resource_id: str, call: str, *args: Any) -> Any:
        """The call's result, or None (recorded in ``errors``) when it raised."""
        try:
            return getattr(self.nvml, call)(*args)
        except Exception as exc:  # NVMLError or anything a broken binding raises: record it, keep going
            self.record(resource_id, call, exc)
            return None

    def record(self, resource_id: str, call: str, exc: BaseException) -> None:
        log.debug("NVML %s failed for %s: %s", call, resource_id, exc)
        self.errors.append({"resource": resource_id, "call": call, "error": _describe(exc)})


def _cuda_version(value: Any) -> str | None:
    """NVML encodes the CUDA version as ``major * 1000 + minor * 10``: 12040 is "12.4"."""
    if not isinstance(value, int) or value <= 0:
        return None
    return f"{value // 1000}.{(value % 1000) // 10}"


def _mig(calls: _Calls, resource_id: str, handle: Any) -> dict[str, Any]:
    """``mig_mode`` and, when MIG is on, ``mig_devices`` (the MIG instances that exist now)."""
    try:
        current, _pending = calls.nvml.nvmlDeviceGetMigMode(handle)
    except Exception as exc:
        if getattr(exc, "value", None) == calls.code("NVML_ERROR_NOT_SUPPORTED", _NVML_ERROR_NOT_SUPPORTED):
            return {"mig_mode": False}  # a GPU without MIG (L4, GeForce): the answer is "off", not an error
        calls.record(resource_id, "nvmlDeviceGetMigMode", exc)
        return {}
    enabled = current == calls.code("NVML_DEVICE_MIG_ENABLE", _NVML_DEVICE_MIG_ENABLE)
    if not enabled:
        return {"mig_mode": False}
    found: dict[str, Any] = {"mig_mode": True}
    slots = calls.get(resource_id, "nvmlDeviceGetMaxMigDeviceCount", handle)
    if not isinstance(slots, int):
        return found
    not_found = calls.code("NVML_ERROR_NOT_FOUND", _NVML_ERROR_NOT_FOUND)
    count = 0
    # MIG device indices can be sparse: NVML answers Not Found for an empty slot, as nvidia-smi expects.
    for slot in range(slots):
        try:
            calls.nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except Exception as exc:
            if getattr(exc, "value", None) == not_found:
                continue
            calls.record(resource_id, "nvmlDeviceGetMigDeviceHandleByIndex", exc)
            return found
        count += 1
    found["mig_devices"] = count
    return found


def _gpu(calls: _Calls, index: int, system: dict[str, Any]) -> Resource | None:
    resource_id = f"cuda:{index}"
    handle = calls.get(resource_id, "nvmlDeviceGetHandleByIndex", index)
    if handle is None:
        return None
    attributes: dict[str, Any] = {"vendor": "nvidia", "index": index, **system}

    name = calls.get(resource_id, "nvmlDeviceGetName", handle)
    uuid = calls.get(resource_id, "nvmlDeviceGetUUID", handle)
    if uuid is not None:
        attributes["uuid"] = _text(uuid)
    memory = calls.get(resource_id, "nvmlDeviceGetMemoryInfo", handle)
    if memory is not None:
        attributes["memory_bytes"] = int(memory.total)
        attributes["free_memory_bytes"] = int(memory.free)
        attributes["used_memory_bytes"] = int(memory.used)
    capability = calls.get(resource_id, "nvmlDeviceGetCudaComputeCapability", handle)
    if capability is not None:
        major, minor = capability
        attributes["compute_capability"] = f"{major}.{minor}"
    utilization = calls.get(resource_id, "nvmlDeviceGetUtilizationRates", handle)
    if utilization is not None:
        attributes["utilization_pct"] = int(utilization.gpu)
    sensor = calls.code("NVML_TEMPERATURE_GPU", _NVML_TEMPERATURE_GPU)
    temperature = calls.get(resource_id, "nvmlDeviceGetTemperature", handle, sensor)
    if temperature is not None:
        attributes["temperature_c"] = int(temperature)
    power_mw = calls.get(resource_id, "nvmlDeviceGetPowerUsage", handle)
    if power_mw is not None:
        attributes["power_w"] = round(power_mw / 1000.0, 1)
    limit_mw = calls.get(resource_id, "nvmlDeviceGetEnforcedPowerLimit", handle)
    if limit_mw is not None:
        attributes["power_limit_w"] = round(limit_mw / 1000.0, 1)
    attributes.update(_mig(calls, resource_id, handle))
    return Resource(
        resource_id,
        ResourceType.GPU,
        _text(name) if name is not None else "NVIDIA GPU",
        attributes,
        source="nvml",
    )


class NvidiaProbe:
    """Finds NVIDIA GPUs with NVML. Never raises.

    ``nvml`` is a module-like object with pynvml's functions (``xpuflow.testing.FakeNvml`` in tests);
    by default ``pynvml`` is imported when ``probe()`` runs. ``nvmlShutdown`` always follows a
    successful ``nvmlInit``.
    """

    name = "nvidia"

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml

    def _load(self) -> Any | None:
        if self._nvml is not None:
            return self._nvml
        try:
            # The deprecated `pynvml` wrapper package warns on import; the probe's answer is the reason.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pynvml
        except Exception:  # ImportError, or a broken install: either way NVML is not usable here
            return None
        return pynvml

    def probe(self) -> ProbeResult:
        nvml = self._load()
        if nvml is None:
            return ProbeResult.none(
                "nvidia-ml-py is not installed; pip install 'xpuflow[nvidia]' to see NVIDIA GPUs"
            )
        try:
            nvml.nvmlInit()
        except Exception as exc:  # no driver, no library, no permission
            return ProbeResult.none(f"NVML did not start ({_describe(exc)}): {_INSTALL_DRIVER}")
        try:
            return self._inventory(_Calls(nvml))
        finally:
            try:
                nvml.nvmlShutdown()
            except Exception as exc:  # nothing left to undo; the inventory is already taken
                log.debug("nvmlShutdown failed: %s", exc)

    def _inventory(self, calls: _Calls) -> ProbeResult:
        system: dict[str, Any] = {}
        driver = calls.get("system", "nvmlSystemGetDriverVersion")
        if driver is not None:
            system["driver_version"] = _text(driver)
        cuda = _cuda_version(calls.get("system", "nvmlSystemGetCudaDriverVersion"))
        if cuda is not None:
            system["cuda_driver_version"] = cuda
        versions = ", ".join(
            f"{label} {system[key]}"
            for label, key in (("driver", "driver_version"), ("CUDA", "cuda_driver_version"))
            if key in system
        )

        count = calls.get("system", "nvmlDeviceGetCount")
        if not isinstance(count, int):
            return ProbeResult.none(
                f"NVML started but could not count GPUs ({calls.errors[-1]['error']})",
                **system,
                errors=calls.errors,
            )
        if count == 0:
            return ProbeResult.none(
                f"NVML ({versions or 'driver loaded'}) reports no NVIDIA GPUs", **system, errors=calls.errors
            )

        gpus = [gpu for index in range(count) if (gpu := _gpu(calls, index, system)) is not None]
        listed = ", ".join(
            f"{gpu.id} {gpu.name}" + (f" {gpu.memory_bytes / 2**30:.1f} GiB" if gpu.memory_bytes else "")
            for gpu in gpus
        )
        reason = f"{len(gpus)} NVIDIA GPU{'s' if len(gpus) != 1 else ''}"
        reason += f" ({versions})" if versions else ""
        reason += f": {listed}" if listed else ""
        if len(gpus) < count:
            reason += f"; {count - len(gpus)} of {count} could not be opened"
        if calls.errors:
            failed = len(calls.errors)
            reason += f"; {failed} NVML call{'s' if failed != 1 else ''} failed (see details.errors)"
        if not gpus:
            return ProbeResult.none(reason, **system, errors=calls.errors)
        return ProbeResult.found(gpus, reason, **system, errors=calls.errors)
