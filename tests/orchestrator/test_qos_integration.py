"""QoS contexts through the orchestrator and the gateway, over the fake backend: class -> context,
best-effort floods refused with 429 while guaranteed work runs, reservations always given back."""

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
from xpuflow.errors import AdmissionRejected, ConfigError, XpuflowError
from xpuflow.orchestrator import Orchestrator
from xpuflow.scheduling.request import RequestKind
from xpuflow.serving.app import create_app
from xpuflow.serving.metrics import GatewayMetrics
from xpuflow.serving.settings import ApiKey, GatewaySettings
from xpuflow.types import Resource, ResourceType

GIB = 1 << 30
MIB = 1 << 20
INVENTORY = Inventory.of(
    [Resource("cpu", ResourceType.CPU, "cpu", {"memory_bytes": 16 * GIB, "logical_cores": 4})]
)
KEY = "sk-batch-0123456789"
OPEN_KEY = "sk-open-0123456789"


def qos_config(**qos: Any) -> Any:
    return parse_config(
        {
            "deployments": [
                {"name": "chat", "backend": "fake", "device": "cpu", "options": {"service_time_s": 0.2}},
                {
                    "name": "flaky",
                    "backend": "fake",
                    "device": "cpu",
                    "options": {"fail_next": 1000},
                },
            ],
            "models": [
                {"name": "chat", "tiers": [{"name": "default", "deployments": ["chat"]}]},
                {"name": "flaky", "tiers": [{"name": "default", "deployments": ["flaky"]}], "max_retries": 0},
            ],
            "qos": {
                "contexts": [
                    {"name": "interactive", "max_vram_gb": 1, "qos": "guaranteed", "request_vram_mb": 64},
                    {
                        "name": "batch",
                        "max_vram_gb": 0.25,
                        "qos": "best_effort",
                        "request_vram_mb": 128,
                        "admission_timeout_s": 0.05,
                    },
                ],
                **qos,
            },
        }
    )


def chat(model: str = "chat", **kw: Any) -> InferenceCall:
    return InferenceCall(
        model=model,
        kind=RequestKind.CHAT,
        payload=[{"role": "user", "content": "one two three"}],
        params=GenerationParams(max_tokens=4),
        **kw,
    )


def usage(orch: Orchestrator) -> dict[str, int]:
    return {c["name"]: c["used_bytes"] for c in orch.status()["qos"]}


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=20))


def test_config_validates_qos_section() -> None:
    with pytest.raises(ConfigError, match="appears twice"):
        qos_config(contexts=[{"name": "a", "max_vram_gb": 1}, {"name": "a", "max_vram_gb": 1}])
    with pytest.raises(ConfigError, match="default_context 'nope' is not a context"):
        qos_config(default_context="nope")
    with pytest.raises(ConfigError, match="qos"):
        qos_config(contexts=[{"name": "a", "max_vram_gb": 1, "qos": "platinum"}])
    orch = Orchestrator(
        qos_config(contexts=[{"name": "a", "device": "cuda:0", "max_vram_gb": 1}]), inventory=INVENTORY
    )
    with pytest.raises(ConfigError, match="not here; devices: cpu"):
        run(orch.start())


def test_flood_is_refused_guaranteed_runs_and_reservations_come_back() -> None:
    async def go() -> None:
        async with Orchestrator(qos_config(), inventory=INVENTORY) as orch:
            status = orch.status()["qos"]
            assert [(c["name"], c["qos"], c["max_bytes"]) for c in status] == [
                ("interactive", "guaranteed", GIB),
                ("batch", "best_effort", GIB // 4),
            ]
            flood = [asyncio.create_task(orch.complete(chat(qos_class="best_effort"))) for _ in range(6)]
            guaranteed = [asyncio.create_task(orch.complete(chat(qos_class="interactive"))) for _ in range(3)]
            await asyncio.sleep(0.1)
            assert usage(orch) == {"interactive": 3 * 64 * MIB, "batch": 2 * 128 * MIB}
            results = await asyncio.gather(*flood, return_exceptions=True)
            rejected = [r for r in results if isinstance(r, AdmissionRejected)]
            assert len(rejected) == 4
            assert all(r.retry_after_s > 0 for r in rejected)
            assert sum(1 for r in results if not isinstance(r, BaseException)) == 2
            for done in await asyncio.gather(*guaranteed):
                assert done.completion is not None
                assert done.completion.text
            assert usage(orch) == {"interactive": 0, "batch": 0}
            by_name = {c["name"]: c for c in orch.status()["qos"]}
            assert by_name["batch"]["admitted"] == 2
            assert by_name["batch"]["rejected"] == 4
            assert by_name["interactive"]["admitted"] == 3

            with pytest.raises(XpuflowError):  # a failing request gives its memory back
                await orch.complete(chat("flaky", qos_class="interactive"))
            assert usage(orch) == {"interactive": 0, "batch": 0}

            task = asyncio.create_task(orch.complete(chat(qos_class="guaranteed")))  # a class name
            await asyncio.sleep(0.05)
            assert usage(orch)["interactive"] == 64 * MIB
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert usage(orch) == {"interactive": 0, "batch": 0}

            with pytest.raises(ConfigError, match=r"unknown QoS class 'gold'.*interactive, batch"):
                await orch.complete(chat(qos_class="gold"))
            with pytest.raises(ConfigError, match="no QoS context of class 'burstable'"):
                await orch.complete(chat(qos_class="burstable"))
            await orch.complete(chat())  # no class, no default context: no admission control
            assert by_name["interactive"]["admitted"] == orch.status()["qos"][0]["admitted"] - 2

            body, _ = GatewayMetrics(orch.status).render()
            text = body.decode()
            assert 'xpuflow_qos_context_max_bytes{context="batch",device="cpu",qos="best_effort"}' in text
            used = 'xpuflow_qos_context_used_bytes{context="interactive",device="cpu",qos="guaranteed"} 0.0'
            assert used in text
            assert 'xpuflow_qos_admissions_total{context="batch",outcome="rejected"} 4.0' in text

    run(go())


def test_stream_holds_its_reservation_until_it_ends() -> None:
    async def go() -> None:
        async with Orchestrator(qos_config(default_context="interactive"), inventory=INVENTORY) as orch:
            events = orch.stream(chat())  # no class: the default context
            first = await events.__anext__()
            assert first.decision is not None
            assert usage(orch)["interactive"] == 64 * MIB
            chunks = [e async for e in events]
            assert chunks
            assert usage(orch)["interactive"] == 0

            early = orch.stream(chat(qos_class="batch"))
            await early.__anext__()
            assert usage(orch)["batch"] == 128 * MIB
            await early.aclose()  # the client went away
            assert usage(orch) == {"interactive": 0, "batch": 0}

    run(go())


def test_gateway_routes_by_header_and_key_and_answers_429_with_retry_after() -> None:
    async def go() -> None:
        settings = GatewaySettings(
            api_keys={KEY: ApiKey("batch-jobs", qos_class="batch"), OPEN_KEY: "team-a"}, request_timeout_s=30
        )
        async with Orchestrator(qos_config(), inventory=INVENTORY) as orch:
            app = create_app(orch, settings)
            transport = httpx.ASGITransport(app=app)
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4}
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                ok = await client.post(
                    "/v1/chat/completions",
                    json=body,
                    headers={"authorization": f"Bearer {OPEN_KEY}", "x-qos-class": "interactive"},
                )
                assert ok.status_code == 200
                assert orch.status()["qos"][0]["admitted"] == 1

                bad = await client.post(
                    "/v1/chat/completions",
                    json=body,
                    headers={"authorization": f"Bearer {OPEN_KEY}", "x-qos-class": "gold"},
                )
                assert bad.status_code == 400
                assert "interactive, batch" in bad.json()["error"]["message"]

                # the key's class (batch) wins over the header: three at once overflow its budget
                flood = await asyncio.gather(
                    *(
                        client.post(
                            "/v1/chat/completions",
                            json=body,
                            headers={"authorization": f"Bearer {KEY}", "x-qos-class": "interactive"},
                        )
                        for _ in range(3)
                    )
                )
                codes = sorted(r.status_code for r in flood)
                assert codes == [200, 200, 429]
                refused = next(r for r in flood if r.status_code == 429)
                assert int(refused.headers["retry-after"]) >= 1
                assert orch.status()["qos"][0]["admitted"] == 1
            assert usage(orch) == {"interactive": 0, "batch": 0}

    run(go())
