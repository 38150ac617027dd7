"""The hardware inventory: every probe's resources merged into one list, with each probe's report.

inv = Inventory.detect()
inv.overview()["cpu"]        # [{"id": "cpu", ...}]
inv.get("cuda:0")            # Resource or None
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xpuflow.discovery.base import Probe, ProbeReport, ProbeResult
from xpuflow.types import Resource, ResourceType

__all__ = ["OVERVIEW_KINDS", "Inventory", "default_probes"]

log = logging.getLogger(__name__)

#: Keys of ``Inventory.overview()``, always present (empty lists when nothing of that kind exists).
OVERVIEW_KINDS = ("cuda", "rocm", "gpu", "igpu", "npu", "pim", "cpu", "remote")


def default_probes(declared: Sequence[Mapping[str, Any]] = (), *, torch: bool = True) -> list[Probe]:
    """The built-in probes in merge order: vendor management libraries first, torch last.

    ``torch=False`` leaves the torch probe out: importing torch costs seconds and ~150 MB, and only the
    torch-based backends need the devices only torch sees (MPS, XPU, DirectML); NVML finds NVIDIA GPUs.
    """
    from xpuflow.discovery.amd import AmdProbe
    from xpuflow.discovery.cpu import CpuProbe
    from xpuflow.discovery.declared import DeclaredProbe
    from xpuflow.discovery.igpu import IntegratedGpuProbe
    from xpuflow.discovery.npu import NpuProbe
    from xpuflow.discovery.nvidia import NvidiaProbe
    from xpuflow.discovery.torch_devices import TorchProbe

    probes: list[Probe] = [CpuProbe(), NvidiaProbe(), AmdProbe(), IntegratedGpuProbe(), NpuProbe()]
    if torch:
        probes.append(TorchProbe())
    probes.append(DeclaredProbe(declared))
    return probes


def _run_probe(probe: Probe) -> tuple[ProbeResult, float]:
    start = time.perf_counter()
    try:
        result = probe.probe()
    except Exception as exc:  # a probe must never take discovery down; record why it failed
        log.warning("probe %s raised %s; recorded and skipped", getattr(probe, "name", probe), exc)
        result = ProbeResult.none(f"probe failed: {type(exc).__name__}: {exc}")
    return result, (time.perf_counter() - start) * 1000.0


def _merge(existing: Resource, new: Resource) -> Resource:
    """Two probes saw the same device (NVML and torch both see cuda:0): keep the first, add what is new."""
    attributes = dict(new.attributes)
    attributes.update(existing.attributes)
    return Resource(
        existing.id,
        existing.type,
        existing.name or new.name,
        attributes,
        existing.tags | new.tags,
        f"{existing.source}+{new.source}"
        if new.source and new.source not in existing.source
        else existing.source,
    )


def _same_device(merged: Mapping[str, Resource], resource: Resource) -> str:
    uuid = resource.attributes.get("uuid")
    if uuid:
        for key, existing in merged.items():
            if existing.attributes.get("uuid") == uuid:
                return key
    return resource.id


def _overview_kind(resource: Resource) -> str:
    if resource.type is ResourceType.GPU:
        if resource.id.startswith("cuda"):
            return "cuda"
        if resource.id.startswith("rocm"):
            return "rocm"
        return "gpu"
    return str(resource.type.value)


@dataclass(frozen=True)
class Inventory:
    """Resources found on this machine (and declared in config), and how each probe fared."""

    resources: tuple[Resource, ...]
    reports: tuple[ProbeReport, ...] = ()

    @classmethod
    def detect(
        cls,
        probes: Iterable[Probe] | None = None,
        *,
        declared: Sequence[Mapping[str, Any]] = (),
        torch: bool = True,
    ) -> Inventory:
        """Run every probe (never raises) and merge what they found, first probe first.
        ``torch=False`` skips the torch probe (see ``default_probes``)."""
        chosen = list(probes) if probes is not None else default_probes(declared, torch=torch)
        merged: dict[str, Resource] = {}
        reports: list[ProbeReport] = []
        for probe in chosen:
            result, elapsed_ms = _run_probe(probe)
            for resource in result.resources:
                # The same device seen twice (NVML and torch): match by UUID first, because torch numbers
                # CUDA devices in its own order (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER), then by id.
                key = _same_device(merged, resource)
                merged[key] = _merge(merged[key], resource) if key in merged else resource
            reports.append(
                ProbeReport(
                    getattr(probe, "name", type(probe).__name__),
                    len(result.resources),
                    result.reason,
                    elapsed_ms,
                    result.details,
                )
            )
        return cls(tuple(merged.values()), tuple(reports))

    @classmethod
    def of(cls, resources: Iterable[Resource]) -> Inventory:
        """An inventory from resources you already have (tests, simulation, declared fleets)."""
        return cls(tuple(resources))

    def get(self, resource_id: str) -> Resource | None:
        for resource in self.resources:
            if resource.id == resource_id:
                return resource
        return None

    def by_type(self, resource_type: ResourceType | str) -> list[Resource]:
        wanted = ResourceType(resource_type)
        return [r for r in self.resources if r.type is wanted]

    @property
    def cpu(self) -> Resource | None:
        found = self.by_type(ResourceType.CPU)
        return found[0] if found else None

    def report(self, probe: str) -> ProbeReport | None:
        for item in self.reports:
            if item.probe == probe:
                return item
        return None

    def overview(self) -> dict[str, list[dict[str, Any]]]:
        """Resources grouped by kind: cuda, rocm, gpu, igpu, npu, pim, cpu, remote (every key present)."""
        grouped: dict[str, list[dict[str, Any]]] = {kind: [] for kind in OVERVIEW_KINDS}
        for resource in self.resources:
            grouped.setdefault(_overview_kind(resource), []).append(resource.to_dict())
        return grouped

    def to_dict(self) -> dict[str, Any]:
        return {
            "resources": [r.to_dict() for r in self.resources],
            "overview": {kind: [r["id"] for r in items] for kind, items in self.overview().items()},
            "probes": [r.to_dict() for r in self.reports],
        }
