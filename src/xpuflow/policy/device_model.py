"""Per-device performance, power and memory estimates for the workload advisor (pure).

A ``DeviceProfile`` is everything the advisor needs to know about one resource, worked out once from the
resource's attributes: effective compute per precision, memory bandwidth, active power, the fixed cost of
dispatching work to it, how much of its memory a model may use, and every precision, task or model
format it refuses, each with its reason::

    profiles = profile_inventory(inventory)      # computed once per Inventory object, then cached
    cpu = profiles[0]
    cpu.precisions[Precision.INT8].inference_ops_per_s   # 8.6e13 on a 32-core AMX part
    cpu.usable_memory_bytes                               # available RAM minus the safety margin

The numbers are class estimates (a compute capability or NPU vendor stands for a typical part), scaled
by what the probe measured. A resource may state its own ``bandwidth_gbps``, ``tops_int8``, ``tdp_w``
or ``power_limit_w`` and those win. ``docs/advisor.md`` explains every constant.

The class tables and per-type constants live in ``device_catalog`` (some re-exported here); this module
derates and scales them into profiles.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Protocol

from xpuflow.policy.device_catalog import (
    DISPATCH_S,
    FRAGMENTATION,
    GIB,
    HOST_MARGIN_FRACTION,
    HOST_MARGIN_MIN_BYTES,
    HUAWEI_EDGE,
    IGPU_DEFAULT_RATES,
    IGPU_HOST_SHARE,
    IGPU_RATES,
    IGPU_WATTS,
    NPU_CLASSES,
    NPU_DEFAULT,
    NPU_DEFAULT_MEMORY_BYTES,
    OTHER_GPU,
    REMOTE_GPU,
    RUNTIME_OVERHEAD_BYTES,
    GpuClass,
    NpuClass,
    amd_class,
    compute_capability,
    nvidia_class,
)
from xpuflow.types import Precision, Resource, ResourceType

__all__ = [
    "FRAGMENTATION",
    "NPU_DEFAULT_MEMORY_BYTES",
    "RUNTIME_OVERHEAD_BYTES",
    "DeviceProfile",
    "FormatSupport",
    "PrecisionSupport",
    "profile_inventory",
    "profile_resource",
]

# Fraction of peak that real kernels reach (compute, bandwidth). The device_catalog tables are peaks.
_ACCEL_COMPUTE_EFF, _ACCEL_BW_EFF = 0.5, 0.8
_CPU_COMPUTE_EFF, _CPU_BW_EFF = 0.6, 0.7

_T = 1e12  # tera


@dataclass(frozen=True, slots=True)
class PrecisionSupport:
    """How one device runs one precision: effective ops/s for inference and training, AMP, notes.

    ``refused`` is empty when the device can run the precision, else the reason it cannot;
    ``training_refused`` likewise for training. ``note`` says what is degraded (e.g. emulated bf16) and
    ``hints`` name precisions that compute much faster here (the advisor never switches on its own).
    """

    inference_ops_per_s: float
    training_ops_per_s: float
    use_amp: bool = False
    amp_dtype: str | None = None
    note: str = ""
    refused: str = ""
    training_refused: str = ""
    hints: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FormatSupport:
    """How a device runs a model file of one format: a score factor and the software path, or a refusal."""

    factor: float
    path: str
    refused: str = ""


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """Static estimates for one resource. Rates are effective (already derated from peak)."""

    resource_id: str
    resource_type: ResourceType
    name: str  # the resource's name, else the class label; used in reasons
    label: str  # the class the estimates stand for, e.g. "Hopper class, compute capability 9.0"
    low_power: bool  # CPU, iGPU, NPU or PIM: what the power strategy prefers over GPUs and remotes
    watts: float
    bandwidth_bytes_per_s: float
    dispatch_s: float
    usable_memory_bytes: int  # 0 when unknown (then inference_refused says so)
    memory_phrase: str  # how usable memory was derived, completes "X has 9.8 GiB ..."
    overhead_bytes: int
    fragmentation: float
    inference_refused: str
    training_refused: str
    precisions: Mapping[Precision, PrecisionSupport]
    formats: Mapping[str, FormatSupport]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "resource_id": self.resource_id,
            "type": self.resource_type.value,
            "name": self.name,
            "label": self.label,
            "low_power": self.low_power,
            "watts": self.watts,
            "bandwidth_gbps": round(self.bandwidth_bytes_per_s / 1e9, 1),
            "dispatch_ms": self.dispatch_s * 1e3,
            "usable_memory_bytes": self.usable_memory_bytes,
            "inference_refused": self.inference_refused,
            "training_refused": self.training_refused,
            "tops": {p.value: round(s.inference_ops_per_s / _T, 2) for p, s in self.precisions.items()},
            "notes": list(self.notes),
        }


class _HasResources(Protocol):
    @property
    def resources(self) -> tuple[Resource, ...]: ...


# ---------------------------------------------------------------------------------------------- helpers


def _num(attributes: Mapping[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = attributes.get(key)
        if value is None or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number) and number > 0:
            return number
    return None


def _fmt_gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB"


def _memory(resource: Resource) -> tuple[int | None, int | None]:
    """(total, free) bytes; free falls back to total. None where unknown or not a usable number."""
    total = _num(resource.attributes, "memory_bytes")
    free = _num(resource.attributes, "free_memory_bytes")
    if free is None and resource.attributes.get("free_memory_bytes") == 0:
        free = 0.0
    if free is None:
        free = total
    return (int(total) if total is not None else None), (int(free) if free is not None else None)


def _host_memory(host: Resource | None) -> tuple[int | None, int | None, int]:
    """(total, available, safety margin) of host RAM; None where the CPU probe could not tell."""
    if host is None:
        return None, None, HOST_MARGIN_MIN_BYTES
    total, available = _memory(host)
    margin = max(HOST_MARGIN_MIN_BYTES, int(HOST_MARGIN_FRACTION * (total or available or 0)))
    return total, available, margin


def _host_bandwidth_bytes(host: Resource | None) -> float:
    """Peak host RAM bandwidth: stated, else ~8 GB/s per physical core within [25, 400] GB/s."""
    if host is None:
        return 80e9
    stated = _num(host.attributes, "memory_bandwidth_gbps", "bandwidth_gbps")
    if stated is not None:
        return stated * 1e9
    cores = _num(host.attributes, "physical_cores") or 4.0
    return min(400.0, max(25.0, 8.0 * cores)) * 1e9


# ------------------------------------------------------------------------------------------ precisions

_HINT_CANDIDATES = (Precision.BF16, Precision.FP16, Precision.INT8)


def _with_hints(
    device_id: str, table: dict[Precision, PrecisionSupport]
) -> dict[Precision, PrecisionSupport]:
    """Add to each precision the (static) hints naming precisions that compute at least 2x faster."""
    out: dict[Precision, PrecisionSupport] = {}
    for precision, support in table.items():
        hints: list[str] = []
        if not support.refused and support.inference_ops_per_s > 0:
            for other in _HINT_CANDIDATES:
                alt = table.get(other)
                if other is precision or alt is None or alt.refused:
                    continue
                ratio = alt.inference_ops_per_s / support.inference_ops_per_s
                if ratio >= 2.0:
                    hints.append(
                        f"{other.value} computes about {ratio:.0f}x faster than {precision.value} on"
                        f" {device_id}; the advisor kept the requested {precision.value}"
                        f" (pass precision='{other.value}' to switch)"
                    )
        out[precision] = replace(support, hints=tuple(hints[:2]))
    return out


def _cpu_precisions(resource: Resource) -> tuple[dict[Precision, PrecisionSupport], str]:
    attrs = resource.attributes
    features = {str(f).lower() for f in (attrs.get("isa_features") or ())}
    cores = _num(attrs, "physical_cores") or (_num(attrs, "logical_cores") or 8.0) / 2.0
    ghz = (_num(attrs, "frequency_mhz") or 2500.0) / 1000.0
    if "avx512f" in features:
        width, flops_per_cycle = "avx512", 64.0
    elif "avx2" in features or "fma" in features:
        width, flops_per_cycle = "avx2", 32.0
    elif "sve" in features or "sve2" in features:
        width, flops_per_cycle = "sve", 32.0
    elif "neon" in features:
        width, flops_per_cycle = "neon", 16.0
    elif "avx" in features:
        width, flops_per_cycle = "avx", 16.0
    else:
        width, flops_per_cycle = "scalar/sse", 8.0
    fp32 = cores * ghz * 1e9 * flops_per_cycle * _CPU_COMPUTE_EFF

    def best(options: tuple[tuple[str, float], ...], fallback: float) -> tuple[float, str]:
        for feature, multiplier in options:
            if feature in features:
                return fp32 * multiplier, feature
        return fp32 * fallback, ""

    # Multipliers over the fp32 vector rate (effective, below the instruction's theoretical ratio).
    bf16, bf16_via = best((("amx_bf16", 8.0), ("avx512_bf16", 2.0), ("bf16", 2.0)), 1.0)
    fp16, fp16_via = best((("amx_fp16", 8.0), ("avx512_fp16", 2.0)), 1.0)
    int8, int8_via = best(
        (("amx_int8", 16.0), ("i8mm", 8.0), ("avx512_vnni", 4.0), ("avx_vnni", 4.0), ("dotprod", 4.0)), 2.0
    )

    def note(via: str, name: str) -> str:
        return f"{name} via {via}" if via else f"no native {name} arithmetic on this CPU; computed in fp32"

    table = {
        Precision.FP32: PrecisionSupport(fp32, fp32),
        Precision.BF16: PrecisionSupport(bf16, bf16, note=note(bf16_via, "bf16")),
        Precision.FP16: PrecisionSupport(fp16, fp16, note=note(fp16_via, "fp16")),
        Precision.FP8: PrecisionSupport(
            max(fp32, bf16), max(fp32, bf16), note="no native fp8 on CPUs; weights are upcast"
        ),
        Precision.INT8: PrecisionSupport(
            int8, fp32, note=f"int8 via {int8_via}" if int8_via else "no int8 dot-product instructions"
        ),
        Precision.INT4: PrecisionSupport(int8, fp32, note="int4 weights unpacked to int8 dot products"),
    }
    return table, f"{cores:.0f} cores at {ghz:.1f} GHz, {width}"


def _gpu_precisions(
    cls: GpuClass, scale: float, cc: tuple[int, int] | None, modern: bool
) -> dict[Precision, PrecisionSupport]:
    """Precisions on a GPU. NVIDIA features follow the compute capability; ``modern`` (AMD, other
    vendors, remote servers) assumes AMP, bf16 and int8 matmuls."""
    eff = _T * scale * _ACCEL_COMPUTE_EFF
    fp32 = cls.fp32_tflops * eff
    fp16 = max(cls.fp16_tflops * eff, fp32)
    int8 = max(cls.int8_tops * eff, fp16)
    fp8 = cls.fp8_tflops * eff
    cc_text = f" (this GPU has {cc[0]}.{cc[1]})" if cc is not None else " (not reported)"
    has_amp = modern or (cc is not None and cc >= (7, 0))
    has_bf16 = modern or (cc is not None and cc >= (8, 0))
    has_int8 = modern or (cc is not None and cc >= (7, 5))
    amp_rate = fp16 if has_amp else fp32
    table: dict[Precision, PrecisionSupport] = {}
    if has_amp:
        table[Precision.FP32] = PrecisionSupport(fp32, fp16, True, "bf16" if has_bf16 else "fp16")
        table[Precision.FP16] = PrecisionSupport(fp16, fp16, True, "fp16")
    else:
        table[Precision.FP32] = PrecisionSupport(
            fp32, fp32, note=f"no AMP before compute capability 7.0{cc_text}"
        )
        table[Precision.FP16] = PrecisionSupport(
            fp16, fp16, note=f"no tensor cores before compute capability 7.0{cc_text}"
        )
    if has_bf16:
        table[Precision.BF16] = PrecisionSupport(fp16, fp16, True, "bf16")
    else:
        table[Precision.BF16] = PrecisionSupport(
            fp32,
            fp32,
            note=f"no native bf16 before compute capability 8.0{cc_text}; runs at fp32 speed without AMP",
        )
    if fp8 > 0:
        table[Precision.FP8] = PrecisionSupport(fp8, fp8, note="fp8 matmuls on tensor cores")
    else:
        why = "on this GPU" if modern else f"before compute capability 8.9{cc_text}"
        table[Precision.FP8] = PrecisionSupport(
            fp16,
            0.0,
            note=f"no native fp8 {why}; weights are dequantised to fp16",
            training_refused=f"fp8 training needs native fp8 matmuls; there are none {why}",
        )
    table[Precision.INT8] = PrecisionSupport(
        int8 if has_int8 else fp16,
        amp_rate,
        note="" if has_int8 else f"no int8 tensor cores before compute capability 7.5{cc_text}",
    )
    table[Precision.INT4] = PrecisionSupport(
        fp16, amp_rate, note="int4 weights are dequantised to fp16 (weight-only quantisation)"
    )
    return table


def _accel_precisions(
    int8_ops: float, fp16_ops: float, fp8_ops: float, fp32_ops: float, refusals: Mapping[Precision, str]
) -> dict[Precision, PrecisionSupport]:
    rates = {
        Precision.FP32: fp32_ops,
        Precision.FP16: fp16_ops,
        Precision.BF16: fp16_ops,
        Precision.FP8: fp8_ops or fp16_ops,
        Precision.INT8: int8_ops,
        Precision.INT4: int8_ops,
    }
    return {
        p: PrecisionSupport(
            rate,
            0.0,
            refused=refusals.get(p, ""),
            note="int4 weights computed in int8" if p is Precision.INT4 else "",
        )
        for p, rate in rates.items()
    }


# ------------------------------------------------------------------------------------------- formats

_ONNX_BONUS = 1.2  # a first-class ONNX Runtime path: no conversion, the most tuned kernels


def _formats(resource: Resource, npu: NpuClass | None) -> dict[str, FormatSupport]:
    kind = resource.type
    vendor = resource.vendor.lower()
    rid = resource.id
    if kind is ResourceType.CPU:
        onnx = FormatSupport(_ONNX_BONUS, "ONNX Runtime's CPU execution provider")
        gguf = FormatSupport(1.0, "llama.cpp's CPU backend")
    elif kind is ResourceType.GPU:
        if vendor == "nvidia" or rid.startswith("cuda"):
            onnx = FormatSupport(_ONNX_BONUS, "ONNX Runtime's CUDA execution provider")
            gguf = FormatSupport(1.0, "llama.cpp's CUDA backend")
        elif vendor == "amd" or rid.startswith("rocm"):
            onnx = FormatSupport(1.0, "ONNX Runtime's MIGraphX execution provider")
            gguf = FormatSupport(1.0, "llama.cpp's HIP backend")
        else:
            onnx = FormatSupport(1.0, "ONNX Runtime's DirectML or OpenVINO execution provider")
            gguf = FormatSupport(1.0, "llama.cpp's Vulkan backend")
    elif kind is ResourceType.IGPU:
        path = "OpenVINO's GPU plugin" if vendor == "intel" else "ONNX Runtime's DirectML execution provider"
        onnx = FormatSupport(1.0, path)
        gguf = FormatSupport(1.0, "llama.cpp's Vulkan backend")
    elif kind is ResourceType.NPU:
        if vendor == "intel":
            onnx = FormatSupport(_ONNX_BONUS, "OpenVINO's NPU plugin")
        elif vendor == "amd":
            onnx = FormatSupport(1.1, "ONNX Runtime's Vitis AI execution provider")
        else:
            onnx = FormatSupport(1.0, f"{npu.backend if npu else 'the vendor'} compiler's ONNX import")
        gguf = FormatSupport(0.0, "", f"llama.cpp has no backend for {rid}; export the model to ONNX")
    elif kind is ResourceType.PIM:
        onnx = FormatSupport(0.0, "", f"{rid} has no ONNX Runtime execution provider")
        gguf = FormatSupport(0.0, "", f"llama.cpp has no backend for {rid}")
    else:  # remote: the server hosts its own copy of the model, whatever the local file's format
        onnx = gguf = FormatSupport(1.0, "the remote server's own copy of the model")
    return {"onnx": onnx, "gguf": gguf}


# ------------------------------------------------------------------------------------------- profiles


def profile_resource(resource: Resource, host: Resource | None = None) -> DeviceProfile:
    """Estimate one resource. ``host`` is the inventory's CPU (host RAM for iGPUs and NPUs, the margin).

    Pure and total: a resource with odd or missing attributes gets conservative defaults, or a refusal
    with its reason, never an exception.
    """
    attrs = resource.attributes
    kind = resource.type
    rid = resource.id
    vendor = resource.vendor.lower()
    total, free = _memory(resource)
    stated_watts = _num(attrs, "power_limit_w", "tdp_w")
    stated_bw = _num(attrs, "bandwidth_gbps", "memory_bandwidth_gbps")
    dispatch = DISPATCH_S[kind]
    host_total, host_available, margin = _host_memory(resource if kind is ResourceType.CPU else host)
    usable, phrase = 0, ""
    inference_refused = training_refused = ""
    notes: list[str] = []
    npu: NpuClass | None = None

    if kind is ResourceType.CPU:
        precisions, label = _cpu_precisions(resource)
        bandwidth = (stated_bw * 1e9 if stated_bw else _host_bandwidth_bytes(resource)) * _CPU_BW_EFF
        watts = stated_watts or min(350.0, max(15.0, 6.0 * (_num(attrs, "physical_cores") or 8.0)))
        if host_available is None:
            inference_refused = f"{rid} reports no RAM size, so nothing can be fitted to it"
        else:
            usable = max(0, host_available - margin)
            phrase = f"usable (available RAM minus a {_fmt_gib(margin)} safety margin)"

    elif kind is ResourceType.GPU or kind is ResourceType.REMOTE:
        remote = kind is ResourceType.REMOTE
        nvidia = not remote and (vendor == "nvidia" or rid.startswith("cuda"))
        amd = not remote and (vendor == "amd" or rid.startswith("rocm"))
        cc = compute_capability(attrs.get("compute_capability")) if nvidia else None
        if remote:
            cls = REMOTE_GPU
            rtt_ms = _num(attrs, "rtt_ms", "latency_ms")
            dispatch = rtt_ms / 1e3 if rtt_ms is not None else dispatch
        else:
            cls = amd_class(attrs, total) if amd else nvidia_class(cc) if nvidia else OTHER_GPU
        # Parts of one generation differ mostly in size: scale a smaller part's compute and bandwidth.
        scale = (
            min(1.0, max(0.35, math.sqrt(total / GIB / cls.ref_memory_gib))) if total and not remote else 1.0
        )
        utilisation = _num(attrs, "utilization_pct") or 0.0
        if utilisation >= 50:
            notes.append(f"{utilisation:.0f}% utilised by other work")
        live = 1.0 - min(0.8, 0.8 * utilisation / 100.0)
        precisions = _gpu_precisions(cls, scale * live, cc, modern=not nvidia)
        bandwidth = (
            (stated_bw * 1e9 if stated_bw else cls.bandwidth_gbps * 1e9 * scale) * _ACCEL_BW_EFF * live
        )
        watts = stated_watts or max(50.0, cls.watts * scale)
        label = f"{cls.label} class" + (f", compute capability {cc[0]}.{cc[1]}" if cc else "")
        if remote:
            training_refused = f"{rid} is a remote model server; it serves inference only"
            if free is None:
                inference_refused = (
                    f"{rid} declares no capacity (memory_bytes), so the advisor cannot tell whether the"
                    " model fits; declare memory_bytes to make it eligible"
                )
            else:
                usable, phrase = free, "of declared capacity"
        elif free is None:
            inference_refused = f"{rid} reports no memory size, so nothing can be fitted to it"
        else:
            usable, phrase = free, "free"

    elif kind is ResourceType.IGPU:
        fp32_t, fp16_t, int8_t = IGPU_RATES.get(vendor, IGPU_DEFAULT_RATES)
        eff = _T * _ACCEL_COMPUTE_EFF
        precisions = {
            Precision.FP32: PrecisionSupport(fp32_t * eff, fp32_t * eff),
            Precision.FP16: PrecisionSupport(fp16_t * eff, fp16_t * eff),
            Precision.BF16: PrecisionSupport(fp16_t * eff, fp16_t * eff),
            Precision.FP8: PrecisionSupport(
                fp16_t * eff, fp16_t * eff, note="fp8 weights are dequantised to fp16"
            ),
            Precision.INT8: PrecisionSupport(int8_t * eff, fp16_t * eff),
            Precision.INT4: PrecisionSupport(
                int8_t * eff, fp16_t * eff, note="int4 weights computed in int8"
            ),
        }
        bandwidth = (stated_bw * 1e9 if stated_bw else _host_bandwidth_bytes(host)) * _ACCEL_BW_EFF
        watts = stated_watts or IGPU_WATTS
        label = f"{vendor or 'integrated'} iGPU sharing host RAM"
        if host_available is not None and host_total is not None:
            usable = max(0, min(int(IGPU_HOST_SHARE * host_total), host_available - margin))
            if free is not None:
                usable = min(usable, free)
            phrase = f"usable (its share of host RAM: {IGPU_HOST_SHARE:.0%} at most, after the safety margin)"
        elif free is not None:
            usable, phrase = free, "free"
        else:
            inference_refused = f"{rid} shares host RAM but the host's RAM size is unknown"

    elif kind is ResourceType.NPU:
        npu = NPU_CLASSES.get(vendor, NPU_DEFAULT)
        if vendor == "huawei" and total is not None and total < 32 * GIB:
            npu = HUAWEI_EDGE
        int8_ops = (_num(attrs, "tops_int8") or npu.int8_tops) * _T * _ACCEL_COMPUTE_EFF
        fp16_ops = int8_ops * npu.fp16_tflops / npu.int8_tops
        fp8_ops = int8_ops * npu.fp8_tflops / npu.int8_tops
        refusals: dict[Precision, str] = {}
        if not npu.fp32:
            refusals[Precision.FP32] = (
                f"{rid} ({npu.label}) computes in fp16/int8, not fp32; use precision fp16 or int8 to use it"
            )
        if not npu.bf16:
            refusals[Precision.BF16] = (
                f"{rid} ({npu.label}) has no bf16; use precision fp16 or int8 to use it"
            )
        if not npu.fp8_tflops:
            refusals[Precision.FP8] = f"{rid} ({npu.label}) has no fp8; use precision int8 or fp16 to use it"
        precisions = _accel_precisions(int8_ops, fp16_ops, fp8_ops, fp16_ops / 4.0, refusals)
        bandwidth = stated_bw * 1e9 if stated_bw else npu.bandwidth_gbps * 1e9 or _host_bandwidth_bytes(host)
        bandwidth *= _ACCEL_BW_EFF
        watts = stated_watts or npu.watts
        label = f"{npu.label} via {npu.backend}"
        training_refused = f"{rid} ({npu.label}) runs inference only; training needs a GPU or the CPU"
        if free is not None:
            usable, phrase = free, "free"
        else:
            usable = NPU_DEFAULT_MEMORY_BYTES
            if host_available is not None:
                usable = max(0, min(usable, host_available - margin))
            phrase = "usable (no memory size reported; the conservative NPU limit)"

    else:  # PIM
        int8_ops = (_num(attrs, "tops_int8") or 2.0) * _T * _ACCEL_COMPUTE_EFF
        precisions = _accel_precisions(int8_ops, int8_ops / 2, 0.0, int8_ops / 16, {})
        for emulated in (Precision.FP32, Precision.FP8):
            precisions[emulated] = replace(
                precisions[emulated], note=f"{emulated.value} is emulated on PIM units"
            )
        bandwidth = (stated_bw or 1000.0) * 1e9 * _ACCEL_BW_EFF
        watts = stated_watts or 30.0
        label = "processing-in-memory"
        training_refused = f"{rid} (processing-in-memory) accelerates inference kernels only"
        if free is not None:
            usable, phrase = free, "free"
        else:
            inference_refused = (
                f"{rid} declares no memory_bytes, so the advisor cannot tell whether a model fits"
            )

    return DeviceProfile(
        resource_id=rid,
        resource_type=kind,
        name=resource.name or label,
        label=label,
        low_power=kind in _LOW_POWER,
        watts=float(watts),
        bandwidth_bytes_per_s=float(bandwidth),
        dispatch_s=dispatch,
        usable_memory_bytes=int(usable),
        memory_phrase=phrase,
        overhead_bytes=RUNTIME_OVERHEAD_BYTES[kind],
        fragmentation=FRAGMENTATION[kind],
        inference_refused=inference_refused,
        training_refused=training_refused or inference_refused,
        precisions=MappingProxyType(_with_hints(rid, precisions)),
        formats=MappingProxyType(_formats(resource, npu)),
        notes=tuple(notes),
    )


_LOW_POWER = frozenset({ResourceType.CPU, ResourceType.IGPU, ResourceType.NPU, ResourceType.PIM})


# The advisor calls profile_inventory on every decision; profiles depend only on the (immutable) resources,
# so they are computed once per Inventory object. Keyed by identity with a weak reference, because
# Inventory is not hashable (its attributes are mappings) and must not be kept alive by this cache.
_CACHE_MAX = 64
_cache: dict[int, tuple[weakref.ref[Any], tuple[DeviceProfile, ...]]] = {}


def _build(inventory: _HasResources) -> tuple[DeviceProfile, ...]:
    resources = tuple(inventory.resources)
    host = next((r for r in resources if r.type is ResourceType.CPU), None)
    return tuple(profile_resource(r, host) for r in resources)


def profile_inventory(inventory: _HasResources) -> tuple[DeviceProfile, ...]:
    """The profiles of every resource, in inventory order; cached per inventory object (a pure memo)."""
    key = id(inventory)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is inventory:
        return hit[1]
    profiles = _build(inventory)
    try:
        ref: weakref.ref[Any] = weakref.ref(inventory, functools.partial(_forget, key))
    except TypeError:  # an object that cannot be weakly referenced: no caching, still correct
        return profiles
    if len(_cache) >= _CACHE_MAX:
        # Evict the oldest. Another thread may be changing the dict; then eviction waits for the next miss.
        with contextlib.suppress(RuntimeError, StopIteration, KeyError):
            del _cache[next(iter(_cache))]
    _cache[key] = (ref, profiles)
    return profiles


def _forget(key: int, dead: weakref.ref[Any]) -> None:
    entry = _cache.get(key)
    if entry is not None and entry[0] is dead:
        _cache.pop(key, None)
