"""The static hardware catalogue behind the device model: what a typical part of each device class can do.

Nothing here looks at a probed resource beyond a lookup key; ``device_model`` turns these tables into a
``DeviceProfile`` (derating peaks to what real kernels reach, scaling by the memory the probe found, and
letting a resource's stated ``bandwidth_gbps``, ``tops_int8``, ``tdp_w`` or ``power_limit_w`` win).
It holds:

- per resource type: the runtime's fixed memory overhead, the allocator's fragmentation factor and the
  cost of dispatching one step (``RUNTIME_OVERHEAD_BYTES``, ``FRAGMENTATION``, ``DISPATCH_S``);
- host RAM rules: the safety margin kept for the OS, the share an iGPU may map, and what an NPU that
  reports no memory may hold;
- GPU classes (``GpuClass``): NVIDIA by compute capability (``NVIDIA_CLASSES``, ``nvidia_class``), AMD
  by gfx target or memory size (``AMD_CLASSES``, ``amd_class``), and fallbacks for other vendors and
  remote servers; iGPU rates by vendor; NPU classes by vendor (``NpuClass``, ``NPU_CLASSES``).

All rates are dense **peaks** of a typical part, in tera-ops (tflops/tops), bandwidth in GB/s, power in
watts. ``docs/advisor.md`` explains every constant.

To add a device class, add one row to the matching table, and keep ``docs/advisor.md`` in step:

- an NVIDIA generation: a ``((major, minor), GpuClass(...))`` entry in ``NVIDIA_CLASSES``, kept sorted by
  compute capability (``nvidia_class`` picks the last threshold at or below the device's);
- an AMD generation: a ``"gfxNN": GpuClass(...)`` entry in ``AMD_CLASSES``; prefixes are tried in order,
  so put a longer prefix before a shorter one it starts with;
- an NPU vendor: a ``"vendor": NpuClass(...)`` entry in ``NPU_CLASSES``, keyed by the resource's
  lower-cased vendor; ``backend`` names the software path in reasons, ``fp32``/``bf16`` say whether the
  part computes those precisions instead of refusing them;
- an iGPU vendor: an ``(fp32, fp16, int8)`` entry in ``IGPU_RATES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from xpuflow.types import ResourceType

__all__ = [
    "AMD_CLASSES",
    "DISPATCH_S",
    "FRAGMENTATION",
    "GIB",
    "HOST_MARGIN_FRACTION",
    "HOST_MARGIN_MIN_BYTES",
    "HUAWEI_EDGE",
    "IGPU_DEFAULT_RATES",
    "IGPU_HOST_SHARE",
    "IGPU_RATES",
    "IGPU_WATTS",
    "MIB",
    "NPU_CLASSES",
    "NPU_DEFAULT",
    "NPU_DEFAULT_MEMORY_BYTES",
    "NVIDIA_CLASSES",
    "OTHER_GPU",
    "REMOTE_GPU",
    "RUNTIME_OVERHEAD_BYTES",
    "GpuClass",
    "NpuClass",
    "amd_class",
    "compute_capability",
    "nvidia_class",
]

GIB = 1 << 30
MIB = 1 << 20

#: Fixed bytes a runtime takes on a device before the first tensor: CUDA context and cuBLAS workspace on
#: a GPU, interpreter and kernel buffers on a CPU, firmware and command buffers on an NPU. A remote
#: server's overhead is the server's business.
RUNTIME_OVERHEAD_BYTES: Mapping[ResourceType, int] = MappingProxyType(
    {
        ResourceType.GPU: 512 * MIB,
        ResourceType.IGPU: 256 * MIB,
        ResourceType.CPU: 128 * MIB,
        ResourceType.NPU: 64 * MIB,
        ResourceType.PIM: 64 * MIB,
        ResourceType.REMOTE: 0,
    }
)
#: Multiplier on tensor bytes for allocator fragmentation and workspaces (caching allocators keep slack).
FRAGMENTATION: Mapping[ResourceType, float] = MappingProxyType(
    {
        ResourceType.GPU: 1.10,
        ResourceType.IGPU: 1.10,
        ResourceType.CPU: 1.05,
        ResourceType.NPU: 1.10,
        ResourceType.PIM: 1.10,
        ResourceType.REMOTE: 1.0,
    }
)
#: What an NPU that reports no memory size may hold: today's client NPUs run small models only.
NPU_DEFAULT_MEMORY_BYTES = 2 * GIB
#: Host RAM kept free for the OS and everything else: the larger of 1 GiB and 10% of total RAM.
HOST_MARGIN_MIN_BYTES = 1 * GIB
HOST_MARGIN_FRACTION = 0.10
#: The share of host RAM an integrated GPU may map (Windows' shared GPU memory, Linux GTT defaults).
IGPU_HOST_SHARE = 0.5

#: Seconds to get work onto a device and the result back, per step: ~0 on the CPU; kernel launches,
#: host<->device copies and a sync on a GPU; driver submission on an NPU; a network round trip remotely.
DISPATCH_S: Mapping[ResourceType, float] = {
    ResourceType.CPU: 20e-6,
    ResourceType.GPU: 200e-6,
    ResourceType.IGPU: 300e-6,
    ResourceType.NPU: 500e-6,
    ResourceType.PIM: 1e-3,
    ResourceType.REMOTE: 20e-3,
}


@dataclass(frozen=True, slots=True)
class GpuClass:
    """A typical discrete GPU of one generation: reference memory and dense peak rates."""

    label: str
    ref_memory_gib: float
    fp32_tflops: float
    fp16_tflops: float  # dense tensor-core rate (bf16 the same where supported)
    int8_tops: float
    fp8_tflops: float  # 0: no native fp8
    bandwidth_gbps: float
    watts: float


#: NVIDIA by compute capability: a typical part of each generation (dense peaks, no sparsity).
NVIDIA_CLASSES: tuple[tuple[tuple[int, int], GpuClass], ...] = (
    ((0, 0), GpuClass("pre-Pascal", 12, 5, 5, 5, 0, 250, 200)),
    ((6, 0), GpuClass("Pascal", 16, 10, 10, 20, 0, 500, 250)),
    ((7, 0), GpuClass("Volta", 32, 15, 120, 60, 0, 900, 300)),
    ((7, 5), GpuClass("Turing", 16, 10, 65, 130, 0, 450, 150)),
    ((8, 0), GpuClass("Ampere datacenter", 80, 19.5, 312, 624, 0, 2000, 400)),
    ((8, 6), GpuClass("Ampere", 24, 35, 100, 200, 0, 850, 300)),
    ((8, 7), GpuClass("Orin", 32, 5, 40, 80, 0, 200, 60)),
    ((8, 9), GpuClass("Ada", 24, 80, 250, 500, 500, 1000, 400)),
    ((9, 0), GpuClass("Hopper", 80, 60, 990, 1980, 1980, 3350, 700)),
    ((10, 0), GpuClass("Blackwell datacenter", 180, 80, 2250, 4500, 4500, 8000, 1000)),
    ((12, 0), GpuClass("Blackwell", 32, 105, 400, 800, 800, 1800, 575)),
)
#: AMD by gfx target prefix; without one, by memory size (see ``amd_class``).
AMD_CLASSES: Mapping[str, GpuClass] = {
    "gfx95": GpuClass("CDNA4", 288, 157, 2300, 4600, 4600, 8000, 1400),
    "gfx94": GpuClass("CDNA3", 192, 163, 1300, 2600, 2600, 5300, 750),
    "gfx90a": GpuClass("CDNA2", 128, 48, 383, 383, 0, 3200, 560),
    "gfx908": GpuClass("CDNA", 32, 23, 184, 184, 0, 1200, 300),
    "gfx12": GpuClass("RDNA4", 16, 49, 195, 390, 390, 640, 300),
    "gfx11": GpuClass("RDNA3", 24, 61, 123, 123, 0, 960, 355),
}
#: A GPU of another vendor, or an NVIDIA GPU that reports no compute capability.
OTHER_GPU = GpuClass("GPU", 16, 15, 60, 120, 0, 500, 200)
#: What a remote model server is assumed to run on.
REMOTE_GPU = GpuClass("remote server", 80, 19.5, 312, 624, 0, 2000, 400)

#: iGPU by vendor: (fp32, fp16, int8) peak tera-ops; bandwidth is the host's.
IGPU_RATES: Mapping[str, tuple[float, float, float]] = {
    "intel": (4.0, 8.0, 16.0),
    "amd": (8.0, 16.0, 16.0),
    "apple": (7.0, 14.0, 14.0),
}
IGPU_DEFAULT_RATES = (3.0, 6.0, 12.0)
IGPU_WATTS = 15.0


@dataclass(frozen=True, slots=True)
class NpuClass:
    """A typical NPU of one vendor: dense peak rates, power, software path and precision support."""

    label: str
    int8_tops: float
    fp16_tflops: float
    fp8_tflops: float  # 0: no fp8
    bandwidth_gbps: float  # 0: shares the host's RAM bandwidth
    watts: float
    backend: str  # the software path, named in reasons
    fp32: bool  # computes fp32 (slowly) instead of refusing it
    bf16: bool


#: NPU by lower-cased vendor.
NPU_CLASSES: Mapping[str, NpuClass] = {
    "intel": NpuClass("Intel NPU", 11, 5.5, 0, 0, 5, "OpenVINO", False, False),
    "amd": NpuClass("AMD XDNA", 16, 8, 0, 0, 5, "Ryzen AI (ONNX Runtime Vitis AI EP)", False, True),
    "rebellions": NpuClass("Rebellions ATOM", 128, 32, 0, 256, 60, "RBLN SDK", False, True),
    "furiosa": NpuClass("Furiosa RNGD", 512, 256, 512, 1500, 150, "Furiosa SDK", False, True),
    "huawei": NpuClass("Huawei Ascend", 640, 320, 0, 1600, 350, "CANN (torch_npu)", True, True),
}
#: A Huawei NPU with under 32 GiB of memory: the 310 (edge) class rather than the 910.
HUAWEI_EDGE = NpuClass("Huawei Ascend 310", 44, 22, 0, 200, 70, "CANN (torch_npu)", True, True)
#: An NPU of a vendor not in ``NPU_CLASSES``.
NPU_DEFAULT = NpuClass("NPU", 10, 5, 0, 0, 10, "the vendor runtime", False, False)


# ---------------------------------------------------------------------------------------------- lookups


def compute_capability(value: Any) -> tuple[int, int] | None:
    """Parse a compute capability ("8.9", 8.9, (8, 9) or [8, 9]) to (major, minor); None if unreadable."""
    if isinstance(value, (tuple, list)) and len(value) >= 2:
        try:
            return int(value[0]), int(value[1])
        except (TypeError, ValueError):
            return None
    text = str(value).strip() if value is not None else ""
    major, _, minor = text.partition(".")
    if not major.isdigit():
        return None
    return int(major), int(minor[:1]) if minor[:1].isdigit() else 0


def nvidia_class(cc: tuple[int, int] | None) -> GpuClass:
    """The NVIDIA class of a compute capability; ``OTHER_GPU`` when it is unknown."""
    if cc is None:
        return OTHER_GPU
    chosen = NVIDIA_CLASSES[0][1]
    for threshold, cls in NVIDIA_CLASSES:
        if cc >= threshold:
            chosen = cls
    return chosen


def amd_class(attributes: Mapping[str, Any], memory_bytes: int | None) -> GpuClass:
    """The AMD class of a resource: by gfx target (or architecture) prefix, else by memory size."""
    gfx = str(attributes.get("gfx_target") or attributes.get("architecture") or "").lower()
    for prefix, cls in AMD_CLASSES.items():
        if gfx.startswith(prefix):
            return cls
    gib = (memory_bytes or 0) / GIB
    if gib >= 150:
        return AMD_CLASSES["gfx94"]
    if gib >= 60:
        return AMD_CLASSES["gfx90a"]
    return AMD_CLASSES["gfx11"]
