"""``xpuflow info --cluster``: every node of a Ray cluster, its devices and how each probe fared."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from xpuflow.cluster.inventory import ClusterInventory

__all__ = ["cluster_inventory", "render_cluster"]


def cluster_inventory(address: str) -> ClusterInventory:
    """Join the cluster at ``address`` (auto, local, ray://host:port, host:port), run discovery on every
    node, leave. ConfigError when Ray is missing or the cluster cannot be reached."""
    from xpuflow.cluster.connection import connect, import_ray
    from xpuflow.config import ClusterConfig

    connected = connect(ClusterConfig(address=address))
    try:
        return ClusterInventory.detect()
    finally:
        if connected:
            import_ray().shutdown()


def render_cluster(cluster: ClusterInventory, console: Console | None = None) -> None:
    console = console or Console()
    nodes = Table(title="Nodes")
    for column in ("node", "id", "ip", "alive", "labels", "ray resources", "devices", "reason"):
        nodes.add_column(column, overflow="fold")
    for node in cluster.nodes:
        resources = ", ".join(
            f"{k}={v:g}" for k, v in sorted(node.ray_resources.items()) if not k.startswith("node:")
        )
        nodes.add_row(
            escape(node.name) + (" (head)" if node.is_head else ""),
            node.node_id[:8],
            node.node_ip,
            "[green]yes[/]" if node.alive else "[red]no[/]",
            escape(", ".join(f"{k}={v}" for k, v in sorted(node.labels.items()))),
            escape(resources),
            escape(", ".join(r.id for r in node.resources) or "-"),
            escape(node.reason),
        )
    console.print(nodes)
    probes = Table(title="Probes per node")
    for column in ("node", "probe", "found", "reason"):
        probes.add_column(column, overflow="fold")
    for node in cluster.alive:
        for report in node.inventory.reports if node.inventory is not None else ():
            probes.add_row(escape(node.name), report.probe, str(report.found), escape(report.reason))
    console.print(probes)
