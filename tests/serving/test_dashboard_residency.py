"""The dashboard's "Model residency" table (docs/residency.md): every on_demand or budgeted model with
its state, size, share of the device's budget, idle time, loads and evictions, from the ``residency``
entry of ``status()`` that ``/admin/workers`` and ``/metrics`` also read."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import GIB, StatusEngine

from xpuflow.backends.base import GenerationParams
from xpuflow.config import parse_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.engine import InferenceCall
from xpuflow.orchestrator import Orchestrator
from xpuflow.serving.app import create_app
from xpuflow.serving.dashboard import DashboardFeed, dashboard_routes
from xpuflow.serving.settings import GatewaySettings
from xpuflow.testing.live_server import live_server
from xpuflow.types import RequestKind, Resource, ResourceType

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
INVENTORY = Inventory.of([Resource("cpu", ResourceType.CPU, "cpu", {"memory_bytes": 16 * GIB})])


def test_the_snapshot_carries_each_models_residency_from_the_orchestrator() -> None:
    deployments = [
        {"name": n, "backend": "fake", "device": "cpu", "load": "on_demand", "memory_gb": 0.3} for n in "ab"
    ]
    config = parse_config({"deployments": deployments, "residency": {"budget_gb": {"cpu": 0.5}}})

    async def go() -> list[dict[str, Any]]:
        async with Orchestrator(config, inventory=INVENTORY) as orch:
            for model in ("a", "b"):  # b evicts a
                call = InferenceCall(
                    model, RequestKind.CHAT, [{"role": "user", "content": "hi"}], GenerationParams()
                )
                await orch.complete(call)
            return DashboardFeed(orch).snapshot()["residency"]  # type: ignore[no-any-return]

    rows = {r["worker"]: r for r in asyncio.run(go())}
    assert set(rows) == {"a/0", "b/0"}
    assert rows["b/0"]["resident"] is True
    assert rows["a/0"]["resident"] is False
    assert rows["a/0"]["evictions"] == 1
    assert rows["a/0"]["budget_bytes"] == GIB // 2
    assert rows["b/0"]["size_bytes"] == int(0.3 * GIB)
    json.dumps(rows, allow_nan=False)


class ResidencyEngine(StatusEngine):
    def status(self) -> Any:
        models = [
            {"name": "chat/0", "resident": True, "pinned": False, "size_bytes": 300 << 20, "in_use": 1,
             "idle_s": None, "keep_alive_s": 300, "loads": 3, "evictions": 2, "load_ms_p50": 812.4},
            {"name": "embed/0", "resident": False, "size_bytes": 90 << 20, "loads": 1, "evictions": 1,
             "idle_s": None, "load_ms_p50": float("nan")},
            {"no": "name"},
        ]  # fmt: skip
        device = {"device": "cpu", "budget_bytes": GIB, "resident_bytes": 300 << 20, "models": models}
        return {**super().status(), "residency": [device]}


@pytest.mark.e2e
@pytest.mark.slow
def test_dashboard_in_headless_chromium_shows_the_residency_table() -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    worker = {"worker_id": "chat/0", "deployment": "chat", "model": "chat", "tier": "all", "device": "cpu"}
    engine = ResidencyEngine(workers=(worker,))
    app = create_app(engine, GatewaySettings(), routes=dashboard_routes(engine, interval_s=0.2))
    with live_server(app) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(bypass_csp=True).new_page()  # the test's own checks use eval
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(f"{base}/dashboard", wait_until="load")
            page.wait_for_function("Number(document.body.dataset.updates) >= 1", timeout=10_000)
            assert page.locator("#residency-section").is_visible()
            rows = page.locator("#residency tbody tr.residency-row")
            assert rows.count() == 2  # the row without a name is dropped
            loaded = page.locator("tr.residency-row[data-worker='chat/0']")
            assert loaded.get_attribute("data-resident") == "true"
            cells = loaded.locator("td").all_inner_texts()
            assert cells[2] == "loaded, in use"
            assert cells[6:9] == ["3", "2", "812"]
            assert "1.0 GiB" in cells[4] or "1 GiB" in cells[4] or "GiB" in cells[4]
            unloaded = page.locator("tr.residency-row[data-worker='embed/0'] td").all_inner_texts()
            assert unloaded[2] == "unloaded"
            assert unloaded[8] == "–"  # junk (NaN) is shown as "-", never as a number
            assert not problems, problems
        finally:
            browser.close()
