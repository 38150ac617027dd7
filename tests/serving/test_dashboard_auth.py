"""The dashboard behind a key (``dashboard_require_key``): the feeds need the "dashboard" right, the
page asks for the key in the browser, and ``xpuflow serve`` carries the setting from the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

try:  # the maintained fork the openai client depends on here; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from xpuflow.cli.serve import _settings
from xpuflow.config import XpuflowConfig
from xpuflow.serving.app import create_app
from xpuflow.serving.auth import Authenticator
from xpuflow.serving.dashboard import dashboard_routes
from xpuflow.serving.settings import ApiKey, GatewaySettings
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
VIEWER = "sk-dashboard-viewer-0001"
CLIENT = "sk-inference-client-0001"


def _app(require: bool = True) -> Any:
    engine = FakeEngine(service_time_s=0.01)
    settings = GatewaySettings(
        api_keys={
            VIEWER: ApiKey("ops-viewer", frozenset({"dashboard"})),
            CLIENT: ApiKey("team-a", frozenset({"infer"})),
        },
        dashboard_require_key=require,
    )
    auth = Authenticator(settings) if settings.dashboard_require_key else None
    return create_app(engine, settings, routes=dashboard_routes(engine, interval_s=0.2, auth=auth))


@run_async
async def test_the_feeds_need_a_key_with_the_dashboard_right_and_the_page_does_not() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        assert (await client.get("/dashboard")).status_code == 200
        assert (await client.get("/dashboard/static/dashboard.js")).status_code == 200
        missing = await client.get("/dashboard/snapshot")
        assert missing.status_code == 401
        assert "Bearer" in missing.json()["error"]["message"]
        wrong = await client.get("/dashboard/snapshot", headers={"authorization": "Bearer sk-nope-000000"})
        assert wrong.status_code == 401
        infer_only = await client.get("/dashboard/snapshot", headers={"authorization": f"Bearer {CLIENT}"})
        assert infer_only.status_code == 403
        ok = await client.get("/dashboard/snapshot", headers={"authorization": f"Bearer {VIEWER}"})
        assert ok.status_code == 200
        assert "devices" in ok.json()
        events = await client.get(
            "/dashboard/events?max_events=1", headers={"authorization": f"Bearer {VIEWER}"}
        )
        assert events.status_code == 200
        assert "event: snapshot" in events.text
        assert (await client.get("/dashboard/events?max_events=1")).status_code == 401


@run_async
async def test_without_the_setting_the_feeds_stay_open() -> None:
    transport = httpx.ASGITransport(app=_app(require=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        assert (await client.get("/dashboard/snapshot")).status_code == 200


def test_serve_carries_the_settings_and_each_keys_qos_class_from_the_config() -> None:
    config = XpuflowConfig.model_validate(
        {
            "gateway": {"dashboard_require_key": True, "metrics_require_key": True},
            "api_keys": [
                {"name": "ops", "key": "sk-operator-key-01", "rights": ["admin", "dashboard", "metrics"]},
                {"name": "root", "key": "sk-admin-only-key-1", "rights": ["admin"]},
                {"name": "batch", "key": "sk-batch-client-01", "qos_class": "bulk"},
            ],
        }
    )
    settings = _settings(config)
    assert (settings.dashboard_require_key, settings.metrics_require_key) == (True, True)
    keys = {k.name: k for k in settings.api_keys.values()}
    assert keys["ops"].rights == frozenset({"admin", "dashboard", "metrics"})
    assert keys["root"].rights == frozenset({"admin"})
    assert keys["batch"].qos_class == "bulk"
    assert keys["batch"].rights == frozenset({"infer"})


@pytest.mark.e2e
@pytest.mark.slow
def test_the_page_asks_for_the_key_then_shows_live_data_in_chromium() -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed (pip install playwright)"
    )
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    with live_server(_app()) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(bypass_csp=True).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/dashboard", wait_until="load")
            page.wait_for_selector("#key-form:not([hidden])", timeout=10_000)
            assert page.locator("#connection").get_attribute("data-state") == "locked"
            assert "dashboard right" in page.locator("#key-error").inner_text()

            page.fill("#key-input", CLIENT)  # a key without the right
            page.click("#key-form button")
            page.wait_for_function(
                "document.getElementById('key-error').textContent.includes('lacks')", timeout=10_000
            )
            page.fill("#key-input", VIEWER)
            page.click("#key-form button")
            page.wait_for_function("Number(document.body.dataset.updates) >= 2", timeout=10_000)
            assert page.locator("#connection").get_attribute("data-state") == "open"
            assert page.locator("#key-form").is_hidden()
            assert page.locator(".worker-row").count() >= 1

            page.reload(wait_until="load")  # the tab keeps its key
            page.wait_for_function("Number(document.body.dataset.updates) >= 1", timeout=10_000)
            assert page.locator("#key-form").is_hidden()
            assert not errors, errors
        finally:
            browser.close()


def test_an_unknown_right_in_the_config_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="rights"):
        XpuflowConfig.model_validate(
            {"api_keys": [{"name": "x", "key": "sk-0123456789", "rights": ["root"]}]}
        )
