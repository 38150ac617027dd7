"""Devices as PyTorch sees them: CUDA or ROCm GPUs, Apple MPS, Intel XPU, and DirectML.

Importing torch takes a second or more, so the probe first asks importlib whether torch is installed and
returns at once, without importing it, when it is not::

    TorchProbe().probe().details["torch_version"]   # "2.13.0+cpu"

Ids follow the rest of xpuflow, so ``Inventory`` merges them with the vendor probes' findings: CUDA
GPUs are "cuda:{i}", GPUs of a ROCm build of torch are "rocm:{i}", then "mps:0", "xpu:{i}" and
"dml:{i}". Torch numbers CUDA devices in its own order (``CUDA_DEVICE_ORDER``, ``CUDA_VISIBLE_DEVICES``),
which can differ from NVML's; each GPU carries its ``uuid`` where torch reports one, so it can be matched.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from xpuflow.discovery.base import ProbeResult
from xpuflow.discovery.igpu import is_discrete_intel_gpu
from xpuflow.types import Resource, ResourceType

__all__ = ["TorchProbe"]

log = logging.getLogger(__name__)


def _installed(module: str) -> bool:
    """Whether ``module`` could be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module without __spec__
        return False


def _vendor_from_name(name: str) -> str:
    lowered = name.lower()
    for needle, vendor in (
        ("nvidia", "nvidia"),
        ("geforce", "nvidia"),
        ("amd", "amd"),
        ("radeon", "amd"),
        ("intel", "intel"),
        ("qualcomm", "qualcomm"),
        ("adreno", "qualcomm"),
    ):
        if needle in lowered:
            return vendor
    return "unknown"


def _cuda(torch: Any, errors: list[dict[str, str]], query_free_memory: bool = False) -> list[Resource]:
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_available():
        return []
    hip = getattr(getattr(torch, "version", None), "hip", None)
    prefix, vendor = ("rocm", "amd") if hip else ("cuda", "nvidia")
    found = []
    for index in range(cuda.device_count()):
        resource_id = f"{prefix}:{index}"
        props = cuda.get_device_properties(index)
        attributes: dict[str, Any] = {
            "vendor": vendor,
            "index": index,
            "memory_bytes": int(props.total_memory),
        }
        if getattr(props, "multi_processor_count", None):
            attributes["multiprocessor_count"] = int(props.multi_processor_count)
        if getattr(props, "uuid", None):
            attributes["uuid"] = f"GPU-{props.uuid}" if not hip else str(props.uuid)
        if hip:
            attributes["hip_version"] = str(hip)
            arch = str(getattr(props, "gcnArchName", "") or "")
            if arch:
                attributes["gfx_target"] = arch.split(":", maxsplit=1)[0]
        else:
            attributes["compute_capability"] = f"{props.major}.{props.minor}"
        if query_free_memory:
            try:
                free, _total = cuda.mem_get_info(index)
                attributes["free_memory_bytes"] = int(free)
            except Exception as exc:  # a busy or lost device still counts; free memory stays unknown
                errors.append({"resource": resource_id, "call": "torch.cuda.mem_get_info", "error": str(exc)})
        found.append(Resource(resource_id, ResourceType.GPU, str(props.name), attributes, source="torch"))
    return found


def _mps(torch: Any, errors: list[dict[str, str]]) -> list[Resource]:
    mps_backend = getattr(getattr(torch, "backends", None), "mps", None)
    if mps_backend is None or not mps_backend.is_available():
        return []
    attributes: dict[str, Any] = {"vendor": "apple", "shares_host_memory": True}
    mps = getattr(torch, "mps", None)
    try:
        if mps is not None and hasattr(mps, "recommended_max_memory"):
            limit = int(mps.recommended_max_memory())
            attributes["memory_bytes"] = limit
            if hasattr(mps, "driver_allocated_memory"):
                attributes["free_memory_bytes"] = max(limit - int(mps.driver_allocated_memory()), 0)
    except Exception as exc:  # older torch or a Metal hiccup: the device is there, its budget unknown
        errors.append({"resource": "mps:0", "call": "torch.mps.recommended_max_memory", "error": str(exc)})
    return [
        Resource(
            "mps:0", ResourceType.IGPU, "Apple GPU (Metal)", attributes, frozenset({"low-power"}), "torch"
        )
    ]


def _xpu(torch: Any, errors: list[dict[str, str]]) -> list[Resource]:
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        return []
    found = []
    for index in range(xpu.device_count()):
        resource_id = f"xpu:{index}"
        props = xpu.get_device_properties(index)
        attributes: dict[str, Any] = {
            "vendor": "intel",
            "index": index,
            "memory_bytes": int(props.total_memory),
        }
        device_id = getattr(props, "device_id", None)
        integrated = isinstance(device_id, int) and not is_discrete_intel_gpu(device_id)
        if isinstance(device_id, int):
            attributes["device_id"] = f"{device_id:#06x}"
        if integrated:
            attributes["shares_host_memory"] = True
        if hasattr(xpu, "mem_get_info"):
            try:
                free, _total = xpu.mem_get_info(index)
                attributes["free_memory_bytes"] = int(free)
            except Exception as exc:  # not every driver reports free memory
                errors.append({"resource": resource_id, "call": "torch.xpu.mem_get_info", "error": str(exc)})
        kind = ResourceType.IGPU if integrated else ResourceType.GPU
        found.append(Resource(resource_id, kind, str(props.name), attributes, source="torch"))
    return found


def _directml(_torch: Any, _errors: list[dict[str, str]]) -> list[Resource]:
    if not _installed("torch_directml"):
        return []
    import torch_directml

    found = []
    for index in range(int(torch_directml.device_count())):
        name = str(torch_directml.device_name(index))
        attributes = {"vendor": _vendor_from_name(name), "index": index}
        found.append(Resource(f"dml:{index}", ResourceType.IGPU, name, attributes, source="torch-directml"))
    return found


class TorchProbe:
    """Finds the accelerators torch can use. Never raises; never imports torch when it is not installed."""

    name = "torch"

    def __init__(self, *, query_free_memory: bool = False) -> None:
        # torch.cuda.mem_get_info creates a CUDA context on every device it asks (hundreds of MB of VRAM
        # each, and seconds); NVML reports free memory without that cost, so it is off unless asked.
        self.query_free_memory = query_free_memory

    def probe(self) -> ProbeResult:
        if not _installed("torch"):
            return ProbeResult.none(
                "torch is not installed (pip install 'xpuflow[torch]'); CUDA, MPS and XPU devices are also "
                "seen through torch when it is"
            )
        try:
            import torch
        except Exception as exc:  # a torch whose native libraries do not load
            return ProbeResult.none(f"torch is installed but does not import ({type(exc).__name__}: {exc})")

        version = str(getattr(torch, "__version__", "unknown"))
        resources: list[Resource] = []
        errors: list[dict[str, str]] = []
        for backend, find in (("cuda", _cuda), ("mps", _mps), ("xpu", _xpu), ("directml", _directml)):
            try:
                if find is _cuda:
                    resources.extend(_cuda(torch, errors, self.query_free_memory))
                else:
                    resources.extend(find(torch, errors))
            except Exception as exc:  # one backend failing (a driver mismatch) must not hide the others
                log.debug("torch %s probe failed: %s", backend, exc)
                errors.append({"resource": backend, "call": f"torch {backend} probe", "error": str(exc)})

        failed = f"; {len(errors)} torch call{'s' if len(errors) != 1 else ''} failed (see details.errors)"
        failed = failed if errors else ""
        if not resources:
            build = (
                "CPU-only build"
                if not getattr(torch.version, "cuda", None) and not getattr(torch.version, "hip", None)
                else "built with GPU support"
            )
            return ProbeResult.none(
                f"torch {version} ({build}) sees no CUDA, ROCm, MPS, XPU or DirectML device{failed}",
                torch_version=version,
                errors=errors,
            )
        listed = ", ".join(f"{r.id} {r.name}" for r in resources)
        return ProbeResult.found(
            resources, f"torch {version}: {listed}{failed}", torch_version=version, errors=errors
        )
