"""AMD GPUs through amdsmi (ROCm's AMD SMI Python binding, imported only when probing).

One ``Resource`` per GPU processor handle, id ``"rocm:{i}"`` in amdsmi's order::

    result = AmdProbe().probe()
    result.resources[0].attributes["gfx_target"]   # "gfx942" on an MI300X

As with NVML, a query that fails for one GPU leaves that field out and is listed in
``details["errors"]``; the GPU is still reported.
"""

from __future__ import annotations

import logging
from typing import Any

from xpuflow.discovery.base import ProbeResult
from xpuflow.types import Resource, ResourceType

__all__ = ["AmdProbe"]

log = logging.getLogger(__name__)

# amdsmi marks a field it cannot read with these (strings in the Python binding, all-ones in C).
_UNSUPPORTED = {"N/A", "", "0xffffffff", "0xffffffffffffffff", 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF}


def _known(value: Any) -> bool:
    """False for None and amdsmi's not-supported markers."""
    try:
        return value is not None and value not in _UNSUPPORTED
    except TypeError:  # an unhashable value is at least not a marker
        return True


def _describe(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def _hex_id(value: Any) -> str | None:
    """amdsmi returns PCI ids as ints or as hex strings ("0x74a1"); xpuflow keeps "0x74a1"."""
    if not _known(value):
        return None
    if isinstance(value, int):
        return f"{value:#06x}"
    text = str(value).strip().lower()
    try:
        return f"{int(text, 16):#06x}"
    except ValueError:
        return text or None


class AmdProbe:
    """Finds AMD GPUs with amdsmi. Never raises.

    ``amdsmi`` is a module-like object with amdsmi's functions (tests pass a small fake); by default
    ``amdsmi`` is imported when ``probe()`` runs. ``amdsmi_shut_down`` always follows a successful
    ``amdsmi_init``.
    """

    name = "amd"

    def __init__(self, amdsmi: Any | None = None) -> None:
        self._amdsmi = amdsmi

    def _load(self) -> tuple[Any | None, str]:
        if self._amdsmi is not None:
            return self._amdsmi, ""
        try:
            import amdsmi
        except ImportError:
            return None, "amdsmi is not installed; pip install 'xpuflow[amd]' (it needs ROCm's libamd_smi)"
        except Exception as exc:  # the binding imports but its C library does not load
            return (
                None,
                f"amdsmi is installed but does not load ({_describe(exc)}); install ROCm's AMD SMI library",
            )
        return amdsmi, ""

    def probe(self) -> ProbeResult:
        amdsmi, why = self._load()
        if amdsmi is None:
            return ProbeResult.none(why)
        try:
            amdsmi.amdsmi_init()
        except Exception as exc:  # AmdSmiException: no amdgpu driver, or no permission on /dev/kfd
            return ProbeResult.none(
                f"amdsmi did not start ({_describe(exc)}): load the amdgpu driver (ROCm) and make sure this "
                "user may open /dev/kfd and /dev/dri (groups video and render)"
            )
        try:
            return self._inventory(amdsmi)
        finally:
            try:
                amdsmi.amdsmi_shut_down()
            except Exception as exc:  # nothing left to undo; the inventory is already taken
                log.debug("amdsmi_shut_down failed: %s", exc)

    def _inventory(self, amdsmi: Any) -> ProbeResult:
        errors: list[dict[str, str]] = []

        def get(resource_id: str, call: str, *args: Any) -> Any:
            try:
                return getattr(amdsmi, call)(*args)
            except Exception as exc:  # AmdSmiException or a missing function in an older binding
                log.debug("amdsmi %s failed for %s: %s", call, resource_id, exc)
                errors.append({"resource": resource_id, "call": call, "error": _describe(exc)})
                return None

        handles = get("system", "amdsmi_get_processor_handles")
        if handles is None:
            return ProbeResult.none(
                f"amdsmi started but could not list GPUs ({errors[-1]['error']})", errors=errors
            )
        if not handles:
            return ProbeResult.none("amdsmi reports no AMD GPUs", errors=errors)

        memory_types = getattr(amdsmi, "AmdSmiMemoryType", None)
        vram = getattr(memory_types, "VRAM", None)
        gpus: list[Resource] = []
        for index, handle in enumerate(handles):
            resource_id = f"rocm:{index}"
            attributes: dict[str, Any] = {"vendor": "amd", "index": index}
            asic = get(resource_id, "amdsmi_get_gpu_asic_info", handle) or {}
            name = str(asic.get("market_name") or "").strip()
            device_id = _hex_id(asic.get("device_id"))
            if device_id is not None:
                attributes["device_id"] = device_id
            gfx = asic.get("target_graphics_version")
            if _known(gfx):
                attributes["gfx_target"] = str(gfx).lower()
            units = asic.get("num_compute_units")
            if isinstance(units, int) and _known(units):
                attributes["compute_units"] = units
            if vram is None:
                errors.append(
                    {"resource": resource_id, "call": "AmdSmiMemoryType.VRAM", "error": "not in amdsmi"}
                )
            else:
                total = get(resource_id, "amdsmi_get_gpu_memory_total", handle, vram)
                if isinstance(total, int):
                    attributes["memory_bytes"] = total
                used = get(resource_id, "amdsmi_get_gpu_memory_usage", handle, vram)
                if isinstance(used, int):
                    attributes["used_memory_bytes"] = used
                    if isinstance(total, int):
                        attributes["free_memory_bytes"] = max(total - used, 0)
            gpus.append(
                Resource(resource_id, ResourceType.GPU, name or "AMD GPU", attributes, source="amdsmi")
            )

        listed = ", ".join(
            f"{gpu.id} {gpu.name}" + (f" {gpu.memory_bytes / 2**30:.1f} GiB" if gpu.memory_bytes else "")
            for gpu in gpus
        )
        reason = f"{len(gpus)} AMD GPU{'s' if len(gpus) != 1 else ''}: {listed}"
        if errors:
            reason += (
                f"; {len(errors)} amdsmi call{'s' if len(errors) != 1 else ''} failed (see details.errors)"
            )
        return ProbeResult.found(gpus, reason, errors=errors)
