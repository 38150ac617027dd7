"""The dashboard shows the model servers that managed workers run (docs/managed_engines.md): state, pid,
restarts (and the last error as a tooltip), from the ``managed`` entry that ``/admin/workers`` also
returns; a device whose workers are not managed keeps its table unchanged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import GIB, StatusEngine

from xpuflow.backends.remote.managed_engine import EngineState, ManagedEngine
from xpuflow.serving.app import create_app
from xpuflow.serving.dashboard import DashboardFeed, dashboard_routes
from xpuflow.serving.settings import GatewaySettings
from xpuflow.testing.live_server import live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
CRASH_LOOP = "crashed 6 times within 300 s (last exit code 1); gave up after 5 restarts"


def _managed_status(state: EngineState, restarts: int, **fields: Any) -> dict[str, Any]:
    """What the orchestrator puts under a managed worker's ``managed`` key: ``ManagedEngine.status()``."""
    engine = ManagedEngine(
        "chat/0", ["llama-server", "--api-key", "sk-secret"], port=8081, ready_path="/health",
        log_path=Path("/var/log/xpuflow/chat-0.log"),
    )  # fmt: skip
    engine.state, engine.restarts = state, restarts
    for name, value in fields.items():
        setattr(engine, name, value)
    return engine.status()


def _worker(worker_id: str, device: str, managed: dict[str, Any] | None = None) -> dict[str, Any]:
    worker = {
        "worker_id": worker_id,
        "deployment": worker_id.split("/", maxsplit=1)[0],
        "model": worker_id.split("/", maxsplit=1)[0],
        "tier": "all",
        "device": device,
        "free_memory_bytes": 4 * GIB,
        "total_memory_bytes": 16 * GIB,
    }
    if managed is not None:
        worker["managed"] = managed
    return worker


def _workers() -> tuple[dict[str, Any], ...]:
    running = _managed_status(EngineState.RUNNING, 2, last_exit_code=-9)
    running["pid"] = 4242  # a started engine's process id (this one never started)
    failed = _managed_status(EngineState.FAILED, 5, last_exit_code=1, last_error=CRASH_LOOP)
    return (
        _worker("chat/0", "remote:chat", running),
        _worker("chat/1", "remote:chat", failed),
        _worker("embed/0", "cpu"),
    )


def test_snapshot_carries_the_managed_process_and_not_its_argv_or_log() -> None:
    snapshot = DashboardFeed(StatusEngine(workers=_workers())).snapshot()
    text = json.dumps(snapshot, allow_nan=False)
    workers = {w["worker_id"]: w for d in snapshot["devices"] for w in d["workers"]}
    assert workers["chat/0"]["managed"] == {
        "state": "running",
        "pid": 4242,
        "restarts": 2,
        "uptime_s": None,
        "last_exit_code": -9,
        "last_error": None,
    }
    assert workers["chat/1"]["managed"]["state"] == "failed"
    assert workers["chat/1"]["managed"]["pid"] is None
    assert workers["chat/1"]["managed"]["last_error"] == CRASH_LOOP
    assert workers["embed/0"]["managed"] is None
    assert "sk-secret" not in text  # argv and log file stay in /admin/workers
    assert "chat-0.log" not in text


def test_malformed_managed_fields_are_dropped() -> None:
    managed = {"state": "<b>odd</b>", "pid": "12", "restarts": True, "uptime_s": float("nan"),
               "last_error": "x" * 1000}  # fmt: skip
    workers = (_worker("a/0", "cpu", managed), _worker("b/0", "cpu", ["not", "a", "mapping"]))  # type: ignore[arg-type]
    snapshot = DashboardFeed(StatusEngine(workers=workers)).snapshot()
    json.dumps(snapshot, allow_nan=False)
    by_id = {w["worker_id"]: w for w in snapshot["devices"][0]["workers"]}
    assert by_id["a/0"]["managed"] == {
        "state": None,
        "pid": None,
        "restarts": None,
        "uptime_s": None,
        "last_exit_code": None,
        "last_error": "x" * 300,
    }
    assert by_id["b/0"]["managed"] is None


@pytest.mark.e2e
@pytest.mark.slow
def test_dashboard_in_headless_chromium_shows_managed_servers(tmp_path: Path) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed (pip install playwright)"
    )
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    engine = StatusEngine(workers=_workers())
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

            remote = page.locator(".device[data-device='remote:chat']")
            assert remote.locator("th").last.inner_text() == "model server"
            running = remote.locator(".worker-row[data-worker-id='chat/0'] td.managed")
            assert running.locator(".managed-state").inner_text() == "running"
            assert "managed-running" in (running.locator(".managed-state").get_attribute("class") or "")
            assert running.locator(".managed-pid").inner_text() == "pid 4242"
            assert running.locator(".managed-restarts").inner_text() == "2 restarts"
            assert running.get_attribute("title") == "last exit code -9"
            failed = remote.locator(".worker-row[data-worker-id='chat/1'] td.managed")
            assert failed.locator(".managed-state").inner_text() == "failed"
            assert failed.locator(".managed-pid").inner_text() == "pid –"
            assert failed.get_attribute("title") == CRASH_LOOP

            cpu = page.locator(".device[data-device='cpu']")  # no managed worker: the table as before
            assert cpu.locator("th").count() == 8
            assert "model server" not in cpu.locator("thead").inner_text()
            assert cpu.locator("td.managed").count() == 0

            screenshot = tmp_path / "dashboard-managed.png"
            page.screenshot(path=str(screenshot), full_page=True)
            if os.environ.get("XPUFLOW_SCREENSHOT_DIR"):
                target = Path(os.environ["XPUFLOW_SCREENSHOT_DIR"])
                target.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(screenshot, target / "dashboard-managed.png")
            assert not problems, problems
        finally:
            browser.close()
