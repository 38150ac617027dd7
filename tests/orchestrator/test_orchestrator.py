"""The orchestrator over the shipped fake backend: placement, tiers, routing, streaming, status."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from xpuflow.backends.base import GenerationParams
from xpuflow.config import parse_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.engine import Engine, InferenceCall
from xpuflow.errors import CapabilityError, ConfigError, ModelNotFound
from xpuflow.orchestrator import Orchestrator
from xpuflow.scheduling.request import RequestKind
from xpuflow.types import Resource, ResourceType

GIB = 1 << 30
INVENTORY = Inventory.of(
    [
        Resource("cpu", ResourceType.CPU, "cpu", {"memory_bytes": 16 * GIB, "logical_cores": 4}),
        Resource("npu:0", ResourceType.NPU, "npu", {"memory_bytes": 4 * GIB, "vendor": "intel"}),
    ]
)


class ConstantScorer:
    def score(self, prompt: str) -> float:
        return 0.9 if "prove" in prompt.lower() else 0.1


def config(**overrides: Any) -> Any:
    data: dict[str, Any] = {
        "deployments": [
            {
                "name": "big",
                "backend": "fake",
                "device": "cpu",
                "replicas": 2,
                "options": {"service_time_s": 0.01},
            },
            {"name": "small", "backend": "fake", "device": "npu:0", "options": {"service_time_s": 0.001}},
            {"name": "emb", "backend": "fake", "task": "embedding"},
        ],
        "models": [
            {
                "name": "chat",
                "tiers": [
                    {"name": "tier_high", "deployments": ["big"]},
                    {"name": "tier_low", "deployments": ["small"]},
                ],
                "routing": {"complexity_threshold": 0.5, "vram_source": "none"},
            },
            {"name": "embed", "tiers": [{"name": "default", "deployments": ["emb"]}]},
        ],
    }
    data.update(overrides)
    return parse_config(data)


def chat(text: str, **kw: Any) -> InferenceCall:
    return InferenceCall(
        model="chat",
        kind=RequestKind.CHAT,
        payload=[{"role": "user", "content": text}],
        params=GenerationParams(max_tokens=8),
        **kw,
    )


@pytest.fixture
def orchestrator(monkeypatch: pytest.MonkeyPatch) -> Orchestrator:
    monkeypatch.setattr("xpuflow.routing.adaptive._default_scorer", ConstantScorer)
    return Orchestrator(config(), inventory=INVENTORY)


def test_placement_respects_explicit_devices_and_reports_bad_ones() -> None:
    orch = Orchestrator(config(), inventory=INVENTORY)
    assert orch.place(orch.config.deployments[1]).resources[0].id == "npu:0"
    bad = parse_config({"deployments": [{"name": "x", "backend": "fake", "device": "cuda:3"}]})
    with pytest.raises(CapabilityError, match="usable: cpu, npu:0"):
        Orchestrator(bad, inventory=INVENTORY).place(bad.deployments[0])


def test_routes_by_complexity_streams_and_reports_status(orchestrator: Orchestrator) -> None:
    async def go() -> None:
        async with orchestrator:
            assert isinstance(orchestrator, Engine)
            assert orchestrator.is_ready()
            assert {m.name for m in orchestrator.models()} == {"chat", "embed"}
            hard = await orchestrator.complete(chat("Prove that sqrt(2) is irrational"))
            easy = await orchestrator.complete(chat("hi there"))
            assert hard.decision.tier == "tier_high"
            assert hard.decision.worker is not None
            assert hard.decision.worker.startswith("big/")
            assert easy.decision.tier == "tier_low"
            assert easy.decision.device == "npu:0"
            assert easy.completion is not None
            assert easy.completion.text == "there hi"
            forced = await orchestrator.complete(chat("hi", tier_override="tier_high"))
            assert forced.decision.tier == "tier_high"

            events = [e async for e in orchestrator.stream(chat("one two three"))]
            assert events[0].decision is not None
            assert "".join(e.chunk.text for e in events[1:] if e.chunk) == "three two one"

            emb = await orchestrator.complete(
                InferenceCall(model="embed", kind=RequestKind.EMBEDDING, payload=["a", "b"])
            )
            assert emb.embeddings is not None
            assert len(emb.embeddings) == 2

            status = orchestrator.status()
            assert len(status["workers"]) == 4
            on_cpu = [w for w in status["workers"] if w["device"] == "cpu"]
            assert on_cpu
            for w in on_cpu:  # host RAM, live: the dashboard showed "free X of -" before
                assert w["total_memory_bytes"] is not None
                assert 0 < w["free_memory_bytes"] <= w["total_memory_bytes"]
            on_npu = next(w for w in status["workers"] if w["device"] == "npu:0")
            assert on_npu["total_memory_bytes"] == 4 * GIB  # what discovery found
            assert status["counters"]["requests_total"] == 5
            assert status["decisions"][0]["model"] == "embed"
            assert all(d["reason"] for d in status["decisions"])
        assert not orchestrator.is_ready()

    asyncio.run(go())


def test_client_mistakes_are_clear(orchestrator: Orchestrator) -> None:
    async def go() -> None:
        async with orchestrator:
            with pytest.raises(ModelNotFound, match="available models: chat, embed"):
                await orchestrator.complete(InferenceCall(model="gpt-9", kind=RequestKind.CHAT, payload=[]))
            with pytest.raises(ConfigError, match="embeddings"):
                await orchestrator.complete(InferenceCall(model="embed", kind=RequestKind.CHAT, payload=[]))
            with pytest.raises(ConfigError, match="generates text"):
                await orchestrator.complete(
                    InferenceCall(model="chat", kind=RequestKind.EMBEDDING, payload=["x"])
                )

    asyncio.run(go())


def test_failed_worker_is_retried_elsewhere_and_nothing_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("xpuflow.routing.adaptive._default_scorer", ConstantScorer)
    cfg = config()
    orch = Orchestrator(cfg, inventory=INVENTORY)

    async def go() -> None:
        async with orch:
            first = orch.workers["big/0"]
            first.session.fail_next = 100  # type: ignore[attr-defined]
            results = await asyncio.gather(*(orch.complete(chat(f"prove {i}")) for i in range(20)))
            assert len(results) == 20
            assert all(r.completion is not None for r in results)
            assert all(r.decision.worker != "big/0" for r in results[-5:])

    asyncio.run(go())


def test_reload_without_a_file_is_a_clear_error(orchestrator: Orchestrator) -> None:
    with pytest.raises(ConfigError, match="without a config file"):
        asyncio.run(orchestrator.reload())


def test_config_rejects_unknown_deployments_and_mixed_tasks() -> None:
    with pytest.raises(ConfigError, match="names deployment 'nope'"):
        parse_config(
            {"deployments": [], "models": [{"name": "m", "tiers": [{"name": "t", "deployments": ["nope"]}]}]}
        )
    with pytest.raises(ConfigError, match="mixes embedding and generation"):
        parse_config(
            {
                "deployments": [
                    {"name": "a", "backend": "fake"},
                    {"name": "b", "backend": "fake", "task": "embedding"},
                ],
                "models": [{"name": "m", "tiers": [{"name": "t", "deployments": ["a", "b"]}]}],
            }
        )


def test_outage_retry_s_from_the_config_reaches_the_dispatcher() -> None:
    cfg = config()
    chat_model = cfg.models[0].model_copy(update={"outage_retry_s": 0.0})
    orch = Orchestrator(cfg.model_copy(update={"models": [chat_model, *cfg.models[1:]]}), inventory=INVENTORY)

    async def go() -> tuple[float, float]:
        async with orch:
            chat, embed = orch.router("chat"), orch.router("embed")
            return chat.dispatcher.policy.outage_retry_s, embed.dispatcher.policy.outage_retry_s

    assert asyncio.run(go()) == (0.0, 10.0)
    with pytest.raises(ConfigError):
        config(models=[{"name": "m", "tiers": [{"name": "t", "deployments": ["emb"]}], "outage_retry_s": -1}])


def test_wait_weight_from_the_config_reaches_the_scorer() -> None:
    cfg = config()
    chat_model = cfg.models[0].model_copy(update={"wait_weight": 20.0})
    orch = Orchestrator(cfg.model_copy(update={"models": [chat_model, *cfg.models[1:]]}), inventory=INVENTORY)

    async def go() -> tuple[float, float]:
        async with orch:
            chat, embed = orch.router("chat"), orch.router("embed")
            return chat.dispatcher.scorer.wait_weight, embed.dispatcher.scorer.wait_weight

    assert asyncio.run(go()) == (20.0, 0.0)
    with pytest.raises(ConfigError):
        config(models=[{"name": "m", "tiers": [{"name": "t", "deployments": ["emb"]}], "wait_weight": -1}])
