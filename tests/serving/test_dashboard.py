"""The live dashboard: snapshots built from engine.status(), the SSE feed, the page and its files
(in-process), and the page in a real headless Chromium over a real socket."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import StatusEngine, asgi_get, dashboard_app, parse_sse

from xpuflow.engine import InferenceCall
from xpuflow.scheduling.request import RequestKind
from xpuflow.serving.app import create_app
from xpuflow.serving.dashboard import DashboardFeed, dashboard_routes
from xpuflow.serving.settings import GatewaySettings
from xpuflow.testing.fake_engine import FakeEngine
from xpuflow.testing.live_server import live_server
from xpuflow.testing.run_async import run_async

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


class StepClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def call() -> InferenceCall:
    return InferenceCall(model="chat", kind=RequestKind.CHAT, payload=[{"role": "user", "content": "hi"}])


# -- snapshots ----------------------------------------------------------------------------------------


def test_snapshot_groups_workers_by_device_with_the_documented_fields() -> None:
    snapshot = DashboardFeed(StatusEngine()).snapshot()
    json.dumps(snapshot, allow_nan=False)  # strict JSON: what the browser parses
    assert [d["device"] for d in snapshot["devices"]] == ["cpu", "cuda:0"]
    gpu = snapshot["devices"][1]
    assert [w["worker_id"] for w in gpu["workers"]] == ["chat-gpu-0", "chat-gpu-1"]
    assert gpu["total_memory_bytes"] == 24 << 30
    assert gpu["healthy_workers"] == 2
    worker = gpu["workers"][0]
    assert {"queue_depth", "in_flight", "ema_latency_ms", "tokens_per_s", "free_memory_bytes",
            "total_memory_bytes", "health", "batch_sizes", "mean_batch_size"} <= worker.keys()  # fmt: skip
    assert snapshot["totals"]["requests_total"] == 0
    assert snapshot["decisions"] == []
    assert snapshot["error"] is None


@run_async
async def test_snapshots_follow_requests_rates_and_decisions() -> None:
    engine = StatusEngine(latency_s=0.0)
    clock = StepClock()
    feed = DashboardFeed(engine, sample_every_s=1.0, clock=clock, wall=clock)
    feed.snapshot()  # anchors the rates
    for _ in range(6):
        await engine.complete(call())
    engine.fail()
    clock.now_s = 2.0
    snapshot = feed.snapshot()

    assert snapshot["totals"]["requests_total"] == 7
    assert snapshot["totals"]["errors_total"] == 1
    assert snapshot["series"]["t"] == [2.0]
    assert snapshot["series"]["requests_per_s"] == [3.5]
    assert snapshot["series"]["errors_per_s"] == [0.5]
    assert snapshot["totals"]["requests_per_s"] == 3.5
    assert snapshot["totals"]["tokens_per_s"] == pytest.approx(6 * 8 / 10.0)
    decisions = snapshot["decisions"]
    assert len(decisions) == 6
    assert [d["ts"] for d in decisions] == sorted((d["ts"] for d in decisions), reverse=True)
    assert {d["device"] for d in decisions} == {"cuda:0", "cpu"}
    assert all(d["tier"] and d["worker"] and "routes to" in d["reason"] for d in decisions)
    workers = {w["worker_id"]: w for d in snapshot["devices"] for w in d["workers"]}
    assert workers["chat-gpu-0"]["batch_sizes"] == {"1": 2}
    assert workers["chat-gpu-0"]["mean_batch_size"] == 1.0
    assert workers["chat-gpu-0"]["ema_latency_ms"] is not None


def test_browsers_share_one_history_point_per_interval() -> None:
    clock = StepClock()
    feed = DashboardFeed(StatusEngine(), sample_every_s=1.0, clock=clock, wall=clock)
    for step in range(1, 5):
        clock.now_s = step * 0.5
        feed.snapshot()
        feed.snapshot()  # a second browser at the same moment
    assert feed.snapshot()["series"]["t"] == [1.5]  # samples at 0.5 and 1.5; the first anchors


class RawEngine:
    def __init__(self, status: Any) -> None:
        self._status = status

    def status(self) -> Any:
        if isinstance(self._status, Exception):
            raise self._status
        return self._status


def test_a_failing_status_becomes_an_error_in_the_snapshot() -> None:
    snapshot = DashboardFeed(RawEngine(RuntimeError("router is reloading"))).snapshot()  # type: ignore[arg-type]
    assert snapshot["error"] == "engine status failed: RuntimeError: router is reloading"
    assert snapshot["devices"] == []
    assert DashboardFeed(RawEngine(["not", "a", "mapping"])).snapshot()["error"]  # type: ignore[arg-type]


def test_malformed_values_are_dropped_not_sent_as_nan() -> None:
    status = {
        "workers": {
            "a": {"worker_id": "a", "ema_latency_ms": math.nan, "tokens_per_s": "fast", "in_flight": True,
                  "queue_depth": {"high": 2, "low": 1}, "batch_sizes": [1, 4, 4, "x"],
                  "free_memory_bytes": math.inf, "healthy": False},
            "junk": "not a worker",
        },
        "decisions": [{"reason": "r" * 1000, "ts": "yesterday"}, 7],
        "counters": {"requests_total": -math.inf},
        "latency_ms": "n/a",
    }  # fmt: skip
    snapshot = DashboardFeed(RawEngine(status)).snapshot()  # type: ignore[arg-type]
    json.dumps(snapshot, allow_nan=False)
    (device,) = snapshot["devices"]
    (worker,) = device["workers"]
    assert device["device"] == "unknown"
    assert worker["ema_latency_ms"] is None
    assert worker["tokens_per_s"] is None
    assert worker["in_flight"] is None
    assert worker["queue_depth"] == 3
    assert worker["batch_sizes"] == {"1": 1, "4": 2}
    assert worker["mean_batch_size"] == 3.0
    assert worker["free_memory_bytes"] is None
    assert worker["health"] == "unhealthy"
    (decision,) = snapshot["decisions"]
    assert len(decision["reason"]) == 300
    assert decision["ts"] is None
    assert snapshot["totals"]["requests_total"] is None


def request_rates(totals: list[int], rate_window_s: float) -> list[float | None]:
    engine = StatusEngine()
    clock = StepClock()
    feed = DashboardFeed(engine, sample_every_s=1.0, rate_window_s=rate_window_s, clock=clock, wall=clock)
    for step, total in enumerate(totals):
        engine.requests_total = total
        clock.now_s = float(step)
        series = feed.snapshot()["series"]
    assert series["t"] == [float(step) for step in range(1, len(totals))]
    return series["requests_per_s"]


def test_rates_are_averaged_over_the_rate_window() -> None:
    assert request_rates([0, 10, 10, 10, 30], rate_window_s=2.0) == [10.0, 5.0, 0.0, 10.0]
    assert request_rates([0, 10, 10, 10, 30], rate_window_s=1.0) == [10.0, 0.0, 0.0, 20.0]


def test_a_counter_that_goes_backwards_is_a_reset_not_a_negative_rate() -> None:
    assert request_rates([10, 20, 5, 9], rate_window_s=1.0) == [10.0, None, 4.0]
    assert request_rates([10, 20, 5, 9, 12, 15], rate_window_s=2.0) == [10.0, None, None, 3.5, 3.0]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        dashboard_routes(StatusEngine(), interval_s=0)
    with pytest.raises(ValueError, match="sample_every_s"):
        DashboardFeed(StatusEngine(), sample_every_s=-1)


# -- the routes, in-process ---------------------------------------------------------------------------


@run_async
async def test_event_stream_sends_parseable_snapshots() -> None:
    engine = StatusEngine(latency_s=0.0)
    app = dashboard_app(engine, interval_s=0.01)
    await engine.complete(call())
    status, headers, body = await asgi_get(app, "/dashboard/events", "max_events=3")
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert body.startswith(b"retry: 1000\n\n")
    events = parse_sse(body)
    assert [name for name, _ in events] == ["snapshot"] * 3
    snapshots = [json.loads(data) for _, data in events]
    assert all(s["totals"]["requests_total"] == 1 for s in snapshots)
    assert snapshots[-1]["decisions"][0]["worker"] == "chat-gpu-0"
    assert {"ts", "error", "totals", "devices", "decisions", "series"} <= snapshots[0].keys()


@run_async
async def test_event_stream_ends_when_the_client_leaves() -> None:
    app = dashboard_app(StatusEngine(), interval_s=0.01)
    status, _, body = await asgi_get(app, "/dashboard/events", disconnect_after_bytes=4000)
    assert status == 200
    assert len(parse_sse(body)) >= 1


@pytest.mark.parametrize("value", ["0", "-1", "many", "100001"])
@run_async
async def test_a_bad_max_events_is_a_400_that_says_why(value: str) -> None:
    status, _, body = await asgi_get(
        dashboard_app(StatusEngine()), "/dashboard/events", f"max_events={value}"
    )
    assert status == 400
    assert b"max_events must be an integer from 1 to 100000" in body


@run_async
async def test_snapshot_endpoint_returns_one_json_snapshot() -> None:
    status, headers, body = await asgi_get(dashboard_app(StatusEngine()), "/dashboard/snapshot")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert len(json.loads(body)["devices"]) == 2


@run_async
async def test_the_page_loads_only_files_the_gateway_serves() -> None:
    app = dashboard_app(StatusEngine())
    status, headers, page = await asgi_get(app, "/dashboard")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    assets = [a for a in re.findall(r'(?:src|href)="([^"]+)"', page.decode()) if a != "data:,"]
    assert len(assets) == 4
    assert not [a for a in assets if "//" in a or a.startswith("/")], "assets must be relative, local URLs"
    expected_types = {".js": "text/javascript", ".css": "text/css"}
    for asset in assets:
        status, headers, body = await asgi_get(app, "/" + asset)
        assert status == 200, asset
        assert headers["content-type"].startswith(expected_types[Path(asset).suffix])
        assert body
    status, headers, _ = await asgi_get(app, "/dashboard/static/vendor/uPlot-LICENSE.txt")
    assert status == 200
    assert "immutable" in headers["cache-control"]


@pytest.mark.parametrize(
    "name",
    ["../engine.py", "..%2Fengine.py", "vendor/../../dashboard.py", "dashboard.py", "nope.js", ".hidden.js"],
)
@run_async
async def test_static_route_serves_nothing_outside_its_files(name: str) -> None:
    status, _, _ = await asgi_get(dashboard_app(StatusEngine()), "/dashboard/static/" + name)
    assert status == 404


# -- over the gateway and its FakeEngine --------------------------------------------------------------


@run_async
async def test_fake_engine_status_gives_the_dashboard_every_documented_key() -> None:
    engine = FakeEngine()
    app = create_app(engine, GatewaySettings(), routes=dashboard_routes(engine))
    for _ in range(3):
        await engine.complete(call())
    status, _, body = await asgi_get(app, "/dashboard/snapshot")
    assert status == 200
    snapshot = json.loads(body)
    assert snapshot["error"] is None
    totals = snapshot["totals"]
    assert (totals["requests_total"], totals["errors_total"], totals["workers"]) == (3, 0, 3)
    assert totals["p50_ms"] is not None
    assert totals["p99_ms"] is not None
    decision = snapshot["decisions"][0]
    assert decision["ts"] is not None
    assert all(decision[key] for key in ("model", "tier", "worker", "device", "reason"))
    gpu = next(d for d in snapshot["devices"] if d["device"] == "cuda:0")
    assert gpu["free_memory_bytes"] is not None
    assert gpu["total_memory_bytes"] is not None
    (worker,) = gpu["workers"]
    assert worker["batch_sizes"] == {"1": 3}
    assert worker["deployment"]
    assert worker["ema_latency_ms"] is not None
    assert worker["tokens_per_s"] is not None


# -- a real browser -----------------------------------------------------------------------------------

ADMIN_KEY = "adm-dashboard-test-0123456789"


def _post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def _chat(base: str, tier: str | None = None) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8}
    _post(f"{base}/v1/chat/completions", body, {"x-xpuflow-tier": tier} if tier else None)


@pytest.mark.e2e
@pytest.mark.slow
def test_dashboard_in_headless_chromium_updates_while_requests_flow(tmp_path: Path) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed (pip install playwright)"
    )
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")

    engine = FakeEngine(service_time_s=0.01)
    settings = GatewaySettings(admin_keys={ADMIN_KEY: "ops"})
    app = create_app(engine, settings, routes=dashboard_routes(engine, interval_s=0.2))
    with live_server(app) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            # bypass_csp: the page forbids eval, which wait_for_function needs; the page itself is unchanged
            page = browser.new_context(bypass_csp=True, viewport={"width": 1360, "height": 1000}).new_page()
            requested: list[str] = []
            problems: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)

            page.goto(f"{base}/dashboard", wait_until="load")
            page.wait_for_function("Number(document.body.dataset.updates) >= 1", timeout=10_000)
            assert page.locator(".worker-row").count() == 3
            assert page.locator(".device[data-device='cpu'] .worker-row").count() == 2
            assert page.locator("#connection").get_attribute("data-state") == "open"
            assert page.locator("#requests-total").inner_text() == "0"
            gpu_card = page.locator(".device[data-device='cuda:0']").inner_text()
            assert "memory free 6.0 GiB of 8.0 GiB" in gpu_card

            for round_ in range(6):  # a few seconds of traffic, so the charts have a shape
                for i in range(2 + 2 * round_):
                    _chat(base, tier="tier_low" if i % 3 == 0 else None)
                page.wait_for_timeout(250)
            _post(f"{base}/admin/workers/chat/tier_low/0/drain", {}, {"authorization": f"Bearer {ADMIN_KEY}"})
            total = engine.requests_total
            page.wait_for_function(
                f"document.getElementById('requests-total').textContent === '{total}'", timeout=10_000
            )
            draining = page.locator(".worker-row[data-worker-id='chat/tier_low/0'] .health")
            page.wait_for_function(
                "document.querySelector(\"[data-worker-id='chat/tier_low/0'] .health\").textContent"
                " === 'draining'",
                timeout=10_000,
            )
            assert draining.inner_text() == "draining"
            rows = page.locator("#decisions tbody tr.decision-row")
            assert rows.count() == 25
            decisions = page.locator("#decisions tbody").inner_text()
            assert "tier_low" in decisions
            assert "override: the client asked for tier_low" in decisions
            assert page.locator("#chart-rate canvas").count() == 1
            assert page.locator("#chart-latency canvas").count() == 1
            assert page.locator("#p50-ms").inner_text().endswith("ms")
            ema = page.locator(".worker-row[data-worker-id='chat/tier_high/0'] td.num").nth(2)
            assert ema.inner_text().endswith("ms")

            screenshot = tmp_path / "dashboard.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000
            if os.environ.get("XPUFLOW_SCREENSHOT_DIR"):
                target = Path(os.environ["XPUFLOW_SCREENSHOT_DIR"])
                target.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(screenshot, target / "dashboard.png")

            assert not problems, problems
            outside = [u for u in requested if not u.startswith(base)]
            assert not outside, f"the page reached outside the gateway: {outside}"
        finally:
            browser.close()


def test_qos_contexts_reach_the_snapshot_normalised() -> None:
    engine = FakeEngine()
    engine.qos = [
        {"name": "interactive", "device": "cpu", "qos": "guaranteed", "used_bytes": 64, "max_bytes": 1024},
        {"name": "batch", "qos": "best_effort", "used_bytes": float("nan"), "rejected": 4},
        {"no": "name"},
    ]
    rows = DashboardFeed(engine).snapshot()["qos"]
    assert [r["name"] for r in rows] == ["interactive", "batch"]  # a row without a name is dropped
    assert rows[0]["used_bytes"] == 64
    assert rows[0]["max_bytes"] == 1024
    assert rows[1]["used_bytes"] is None  # junk is shown as "-", never as a number
    assert rows[1]["rejected"] == 4
    json.dumps(rows, allow_nan=False)
    assert DashboardFeed(RawEngine({})).snapshot()["qos"] == []  # type: ignore[arg-type]
