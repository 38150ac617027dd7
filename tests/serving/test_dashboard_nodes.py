"""The dashboard in cluster mode: workers grouped by the node they run on (their status names it), and
one machine's page unchanged (no nodes in the snapshot, one card per device)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import GIB, StatusEngine

from xpuflow.serving.app import create_app
from xpuflow.serving.dashboard import DashboardFeed, dashboard_routes
from xpuflow.serving.settings import GatewaySettings
from xpuflow.testing.live_server import live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def _remote(worker_id: str, node: str, device: str = "cpu") -> dict[str, Any]:
    return {
        "worker_id": worker_id,
        "deployment": worker_id.split("/", maxsplit=1)[0],
        "model": "chat",
        "tier": "all",
        "device": f"{device}@{node}",
        "node": node,
        "free_memory_bytes": 4 * GIB,
        "total_memory_bytes": 16 * GIB,
    }


CLUSTER_WORKERS = (
    _remote("fast/0", "a"),
    _remote("slow/0", "b"),
    _remote("slow/1", "c"),
    _remote("gpu/0", "a", "cuda:0"),
)


def test_cluster_snapshot_groups_devices_by_node() -> None:
    snapshot = DashboardFeed(StatusEngine(workers=CLUSTER_WORKERS)).snapshot()
    json.dumps(snapshot, allow_nan=False)
    nodes = snapshot["nodes"]
    assert [n["node"] for n in nodes] == ["a", "b", "c"]
    assert nodes[0]["devices"] == ["cpu@a", "cuda:0@a"]
    assert (nodes[0]["workers"], nodes[0]["healthy_workers"]) == (2, 2)
    assert {d["device"]: d["node"] for d in snapshot["devices"]}["cpu@b"] == "b"
    assert snapshot["devices"][0]["workers"][0]["node"] == "a"


def test_one_machine_snapshot_has_no_nodes() -> None:
    snapshot = DashboardFeed(StatusEngine()).snapshot()
    assert snapshot["nodes"] == []
    assert all(d["node"] is None for d in snapshot["devices"])


@pytest.mark.e2e
@pytest.mark.slow
def test_cluster_dashboard_in_headless_chromium_shows_a_group_per_node() -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed (pip install playwright)"
    )
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")

    def open_page(engine: StatusEngine, check: Any) -> None:
        app = create_app(engine, GatewaySettings(), routes=dashboard_routes(engine, interval_s=0.2))
        with live_server(app) as base, sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_context(bypass_csp=True).new_page()
                problems: list[str] = []
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.goto(f"{base}/dashboard", wait_until="load")
                page.wait_for_function("Number(document.body.dataset.updates) >= 1", timeout=10_000)
                check(page)
                assert not problems, problems
            finally:
                browser.close()

    def cluster(page: Any) -> None:
        assert page.locator("#devices-title").inner_text() == "Workers by node and device"
        assert page.locator(".node").count() == 3
        node_a = page.locator(".node[data-node='a']")
        assert node_a.locator(".node-name").inner_text() == "node a"
        assert "2 of 2 workers healthy" in node_a.locator(".node-head").inner_text()
        assert node_a.locator(".device").count() == 2
        assert (
            node_a.locator(".device[data-device='cuda:0@a'] .worker-row[data-worker-id='gpu/0']").count() == 1
        )
        assert page.locator(".node[data-node='c'] .worker-row[data-worker-id='slow/1']").count() == 1

    def one_machine(page: Any) -> None:
        assert page.locator("#devices-title").inner_text() == "Workers by device"
        assert page.locator(".node").count() == 0
        assert page.locator("#devices > .device").count() == 2
        assert page.locator(".worker-row").count() == 3

    open_page(StatusEngine(workers=CLUSTER_WORKERS), cluster)
    open_page(StatusEngine(), one_machine)
