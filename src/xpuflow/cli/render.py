"""Human output of the CLI: rich tables for inventories, backends and decisions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from xpuflow.backends.registry import BackendStatus
from xpuflow.discovery.inventory import Inventory
from xpuflow.types import Resource, RoutingDecision

__all__ = ["render_decision", "render_info"]


def _gib(value: Any) -> str:
    return "-" if value is None else f"{int(value) / (1 << 30):.1f} GiB"


def _resource_summary(resource: Resource) -> str:
    a = resource.attributes
    bits = []
    for key in ("arch", "physical_cores", "logical_cores", "compute_capability", "driver", "vendor"):
        if a.get(key) not in (None, ""):
            bits.append(f"{key}={a[key]}")
    if a.get("isa_features"):
        bits.append("isa=" + " ".join(a["isa_features"]))
    return ", ".join(bits)


def render_info(
    inventory: Inventory, backends: Sequence[BackendStatus], console: Console | None = None
) -> None:
    console = console or Console()
    devices = Table(title="Devices", show_lines=False)
    for column in ("id", "type", "name", "memory", "free", "details"):
        devices.add_column(column, overflow="fold")
    for r in inventory.resources:
        devices.add_row(
            escape(r.id),
            r.type.value,
            r.name,
            _gib(r.memory_bytes),
            _gib(r.free_memory_bytes),
            _resource_summary(r),
        )
    console.print(devices)

    probes = Table(title="Probes")
    for column in ("probe", "found", "ms", "reason"):
        probes.add_column(column, overflow="fold")
    for report in inventory.reports:
        probes.add_row(report.probe, str(report.found), f"{report.elapsed_ms:.1f}", escape(report.reason))
    console.print(probes)

    table = Table(title="Backends")
    for column in ("backend", "available", "version", "reason"):
        table.add_column(column, overflow="fold")
    for b in backends:
        table.add_row(
            b.name, "[green]yes[/]" if b.available else "[red]no[/]", b.version or "-", escape(b.reason)
        )
    console.print(table)


def render_decision(decision: RoutingDecision, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]device[/]      {decision.device}")
    console.print(f"[bold]reason[/]      {escape(decision.reason)}")
    console.print(
        f"[bold]precision[/]   {decision.precision}   [bold]AMP[/] {'yes' if decision.use_amp else 'no'}"
    )
    console.print(f"[bold]confidence[/]  {decision.confidence:.2f}")
    console.print(f"[bold]memory[/]      {_gib(decision.estimated_memory_bytes)} estimated")
    if decision.alternatives:
        table = Table(title="Alternatives")
        for column in ("device", "score", "why not"):
            table.add_column(column, overflow="fold")
        for alt in decision.alternatives:
            table.add_row(alt.candidate, "-" if alt.score is None else f"{alt.score:.3f}", escape(alt.reason))
        console.print(table)
