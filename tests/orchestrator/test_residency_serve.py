"""Model residency in the server: on_demand deployments load at their first request (the answer says
``x-xpuflow-cold-start: true``), idle out after ``keep_alive_s``, are evicted least recently used by
bytes when another needs room, never while in use, and a request that cannot fit gets 503 with
Retry-After. Loads and unloads are admin actions; memory is measured again after an unload."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

try:  # the maintained fork the openai client depends on here; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from xpuflow.backends.base import GenerationParams
from xpuflow.config import parse_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.engine import InferenceCall
from xpuflow.errors import ConfigError, ModelDoesNotFit
from xpuflow.orchestrator import Orchestrator
from xpuflow.scheduling.request import RequestKind
from xpuflow.serving.app import create_app
from xpuflow.serving.settings import ApiKey, GatewaySettings
from xpuflow.types import Resource, ResourceType

GIB = 1 << 30
MIB = 1 << 20
INVENTORY = Inventory.of([Resource("cpu", ResourceType.CPU, "cpu", {"memory_bytes": 16 * GIB})])
ADMIN = "admin-key"
USER = "user-key"


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=60))


def dep(name: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "fake",
        "device": "cpu",
        "load": "on_demand",
        "memory_gb": 0.3,
        "options": {"service_time_s": 0.01},
        **kw,
    }


def config(*deployments: dict[str, Any], budget_gb: float = 0.5, **residency: Any) -> Any:
    return parse_config(
        {"deployments": list(deployments), "residency": {"budget_gb": {"cpu": budget_gb}, **residency}}
    )


def chat(model: str) -> InferenceCall:
    return InferenceCall(
        model, RequestKind.CHAT, [{"role": "user", "content": "hello there"}], GenerationParams(max_tokens=4)
    )


def rows(orch: Orchestrator) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for r in orch.status()["residency"] for m in r["models"]}


def test_loads_at_first_request_and_evicts_the_least_recently_used_for_room() -> None:
    async def go() -> None:
        async with Orchestrator(config(dep("a"), dep("b"), dep("c")), inventory=INVENTORY) as orch:
            assert not any(r["resident"] for r in rows(orch).values())  # nothing loaded at start
            first = await orch.complete(chat("a"))
            assert first.decision.details.get("cold_start") is True
            again = await orch.complete(chat("a"))
            assert "cold_start" not in again.decision.details
            await orch.complete(chat("b"))  # 0.3 + 0.3 > 0.5 GiB: a (least recently used) goes
            state = rows(orch)
            assert state["b/0"]["resident"]
            assert not state["a/0"]["resident"]
            assert state["a/0"]["evictions"] == 1
            back = await orch.complete(chat("a"))
            assert back.decision.details.get("cold_start") is True
            assert rows(orch)["a/0"]["loads"] == 2
            device = orch.status()["residency"][0]
            assert device["budget_bytes"] == GIB // 2
            assert device["resident_bytes"] <= device["budget_bytes"]

    run(go())


def test_a_model_in_use_is_not_evicted_and_the_request_that_cannot_fit_gets_503() -> None:
    slow = dep("slow", options={"service_time_s": 0.5})

    async def go() -> None:
        cfg = config(slow, dep("other"), wait_for_room_s=0)  # no waiting for the model in use: 503 at once
        async with Orchestrator(cfg, inventory=INVENTORY) as orch:
            app = create_app(orch, GatewaySettings(request_timeout_s=30))
            transport = httpx.ASGITransport(app=app)
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                busy = asyncio.ensure_future(
                    client.post("/v1/chat/completions", json={**body, "model": "slow"})
                )
                while not rows(orch)["slow/0"]["in_use"]:
                    await asyncio.sleep(0.01)
                refused = await client.post("/v1/chat/completions", json={**body, "model": "other"})
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "model_does_not_fit"
                assert "does not fit" in refused.json()["error"]["message"]
                assert int(refused.headers["retry-after"]) >= 1
                served = await busy
                assert served.status_code == 200
                assert served.headers["x-xpuflow-cold-start"] == "true"
                # the slow model is idle now: the other one evicts it and loads
                ok = await client.post("/v1/chat/completions", json={**body, "model": "other"})
                assert ok.status_code == 200
                assert ok.headers["x-xpuflow-cold-start"] == "true"
                warm = await client.post("/v1/chat/completions", json={**body, "model": "other"})
                assert "x-xpuflow-cold-start" not in warm.headers
                metrics = (await client.get("/metrics")).text
                assert 'xpuflow_model_resident{device="cpu",worker="other/0"} 1.0' in metrics
                assert 'xpuflow_model_resident{device="cpu",worker="slow/0"} 0.0' in metrics
                assert 'xpuflow_model_unloads_total{worker="slow/0"} 1.0' in metrics
                assert 'xpuflow_residency_budget_bytes{device="cpu"} 5.36870912e+08' in metrics
        assert orch.status()["residency"] == []  # stopped: everything unloaded

    run(go())


def test_idle_models_unload_after_keep_alive_and_pinned_ones_stay() -> None:
    pinned = {**dep("pinned"), "load": "pinned", "memory_gb": 0.1}

    async def go() -> None:
        cfg = config(dep("a", keep_alive_s=0.2), pinned, budget_gb=1.0, check_interval_s=0.05)
        async with Orchestrator(cfg, inventory=INVENTORY) as orch:
            await orch.complete(chat("a"))
            assert rows(orch)["a/0"]["resident"]
            await asyncio.sleep(0.6)
            state = rows(orch)
            assert not state["a/0"]["resident"]
            assert state["pinned/0"]["resident"]
            assert orch.status()["residency"][0]["idle_unloads"] == 1
            assert (await orch.complete(chat("a"))).decision.details.get("cold_start") is True

    run(go())


def test_admin_loads_and_unloads_a_worker() -> None:
    async def go() -> None:
        keys = {ADMIN: ApiKey("ops", frozenset({"admin"})), USER: ApiKey("app")}
        settings = GatewaySettings(api_keys=keys, request_timeout_s=30)
        async with Orchestrator(config(dep("a")), inventory=INVENTORY) as orch:
            app = create_app(orch, settings)
            transport = httpx.ASGITransport(app=app)
            headers = {"authorization": f"Bearer {ADMIN}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                loaded = await client.post("/admin/workers/a/0/load", headers=headers)
                assert loaded.status_code == 200, loaded.text
                assert rows(orch)["a/0"]["resident"]
                first = await client.post(
                    "/v1/chat/completions",
                    headers={"authorization": f"Bearer {USER}"},
                    json={"model": "a", "messages": [{"role": "user", "content": "hi"}]},
                )
                assert first.status_code == 200
                assert "x-xpuflow-cold-start" not in first.headers  # loaded ahead by the operator
                unloaded = await client.post("/admin/workers/a/0/unload", headers=headers)
                assert unloaded.json() == {"worker": "a/0", "resident": False, "unloaded": True}
                assert not rows(orch)["a/0"]["resident"]
                missing = await client.post("/admin/workers/nope/load", headers=headers)
                assert missing.status_code == 422  # as drain answers for an unknown worker
                assert "no worker 'nope'" in missing.json()["error"]["message"]

    run(go())


@pytest.mark.parametrize(("leak", "unaccounted"), [(False, False), (True, True)])
def test_memory_is_measured_again_after_an_unload(leak: bool, unaccounted: bool) -> None:
    """A backend that does not give its memory back on unload shows up as unaccounted bytes (and less
    room for the next load); one that does shows none. Sizes are measured at start (no memory_gb)."""
    options = {"service_time_s": 0.0, "memory_mb": 96, "leak_on_close": leak}
    measured = {**dep("m", options=options), "memory_gb": None}

    async def go() -> None:
        async with Orchestrator(config(measured, budget_gb=2.0), inventory=INVENTORY) as orch:
            if not leak:  # what unloading gave back at start (a leaky backend gives back nothing)
                assert rows(orch)["m/0"]["size_bytes"] >= 90 * MIB
            await orch.complete(chat("m"))
            await orch.unload_worker("m/0")
            device = orch.status()["residency"][0]
            if unaccounted:
                assert device["unaccounted_bytes"] >= 80 * MIB
            else:
                assert device["unaccounted_bytes"] < 40 * MIB

    run(go())


@pytest.mark.parametrize(
    ("deployment", "match"),
    [
        (dep("auto", device="auto"), "needs an explicit device"),
        (dep("remote", backend="remote_openai", options={"base_url": "http://127.0.0.1:9/v1"}), "pinned"),
        (dep("huge", memory_gb=4.0), "more than the residency budget"),
    ],
)
def test_start_refuses_what_cannot_work(deployment: dict[str, Any], match: str) -> None:
    async def go() -> None:
        with pytest.raises(ConfigError, match=match):
            async with Orchestrator(config(deployment), inventory=INVENTORY):
                pass

    run(go())


def test_does_not_fit_is_retried_on_a_worker_whose_model_is_loaded() -> None:
    """Two replicas, room for one: while replica 0 serves, a request sent to replica 1 cannot load it
    and is retried on replica 0 (no device fault recorded); the client sees only answers."""
    pair = dep("pair", replicas=2, options={"service_time_s": 0.2})

    async def go() -> None:
        async with Orchestrator(config(pair, budget_gb=0.5), inventory=INVENTORY) as orch:
            results = await asyncio.gather(*(orch.complete(chat("pair")) for _ in range(4)))
            assert len(results) == 4
            state = rows(orch)
            assert state["pair/0"]["resident"] != state["pair/1"]["resident"]  # one at a time fits
            assert all(w["health"] == "healthy" for w in orch.status()["workers"])

    run(go())


def test_a_load_waits_for_the_model_in_use_and_then_evicts_it() -> None:
    """By default a load that only models in use block waits for them (residency.wait_for_room_s):
    nothing is refused, the second request answers once the first has finished and been evicted."""
    slow = dep("slow", options={"service_time_s": 0.4})

    async def go() -> None:
        async with Orchestrator(config(slow, dep("other")), inventory=INVENTORY) as orch:
            first = asyncio.ensure_future(orch.complete(chat("slow")))
            while not rows(orch)["slow/0"]["in_use"]:
                await asyncio.sleep(0.01)
            second = await orch.complete(chat("other"))
            assert second.decision.details.get("cold_start") is True
            assert first.done()  # it could only load once the first request had finished
            assert (await first).decision.worker == "slow/0"
            state = rows(orch)
            assert state["other/0"]["resident"]
            assert not state["slow/0"]["resident"]

    run(go())


def test_a_load_that_pinned_models_block_fails_at_once() -> None:
    pinned = {**dep("pinned"), "load": "pinned", "memory_gb": 0.4}

    async def go() -> None:
        async with Orchestrator(config(pinned, dep("other")), inventory=INVENTORY) as orch:
            started = asyncio.get_running_loop().time()
            with pytest.raises(ModelDoesNotFit, match="does not fit"):
                await orch.complete(chat("other"))
            assert asyncio.get_running_loop().time() - started < 5  # not the 30 s wait for room

    run(go())
