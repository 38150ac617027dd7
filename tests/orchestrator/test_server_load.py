"""A remote server's own load reaches worker choice in ``xpuflow serve``: the health poller reads its
Prometheus ``/metrics`` (vLLM's gauges here) and the scorer sees other clients' queued work, so a
server busy with someone else's requests gets fewer of ours. A server without ``/metrics`` is asked once."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from docs_features_support import openai_upstream
from xpuflow.backends.base import GenerationParams
from xpuflow.config import parse_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.engine import InferenceCall
from xpuflow.orchestrator import Orchestrator
from xpuflow.scheduling.request import RequestKind
from xpuflow.types import Resource, ResourceType

INVENTORY = Inventory.of([Resource("cpu", ResourceType.CPU, "cpu", {"memory_bytes": 8 << 30})])


def busy_metrics(waiting: int) -> str:
    """vLLM's gauges: ``waiting`` requests of other clients queued, 8 running, the KV cache 90% full."""
    return (
        f'vllm:num_requests_waiting{{model_name="mock"}} {waiting}\n'
        'vllm:num_requests_running{model_name="mock"} 8\n'
        'vllm:kv_cache_usage_perc{model_name="mock"} 0.9\n'
    )


def config(urls: list[str], **options: Any) -> Any:
    deployments = [
        {
            "name": f"up{i}",
            "backend": "remote_openai",
            "options": {"base_url": url, "model": "mock", "health_interval_s": 0.05, **options},
        }
        for i, url in enumerate(urls)
    ]
    tier = {"name": "default", "deployments": [d["name"] for d in deployments]}
    return parse_config({"deployments": deployments, "models": [{"name": "chat", "tiers": [tier]}]})


def call() -> InferenceCall:
    return InferenceCall(
        "chat", RequestKind.CHAT, [{"role": "user", "content": "hi"}], GenerationParams(max_tokens=2)
    )


async def served(**options: Any) -> tuple[collections.Counter[str], collections.Counter[str], Any]:
    async with (
        openai_upstream(metrics_text=busy_metrics(500)) as (busy_url, busy),
        openai_upstream(metrics_text=busy_metrics(0)) as (idle_url, idle),
        Orchestrator(config([busy_url, idle_url], **options), inventory=INVENTORY) as orch,
    ):
        await asyncio.sleep(0.3)  # a few health checks, each with a /metrics read
        for _ in range(40):
            await orch.complete(call())
        snapshots = {w: orch._snapshot_of(worker) for w, worker in orch.workers.items()}
    return busy, idle, snapshots


def test_a_server_busy_with_other_clients_gets_fewer_of_our_requests() -> None:
    busy, idle, snapshots = asyncio.run(asyncio.wait_for(served(), 30))
    assert busy["metrics"] >= 1
    assert snapshots["up0/0"].queue_depth >= 500  # its waiting requests count as queued ahead of ours
    assert snapshots["up0/0"].utilization_pct == 90.0
    assert busy["chat"] < idle["chat"] / 3, (busy, idle)


def test_with_server_metrics_off_the_load_is_not_read() -> None:
    busy, idle, snapshots = asyncio.run(asyncio.wait_for(served(server_metrics=False), 30))
    assert busy["metrics"] == 0
    assert snapshots["up0/0"].queue_depth == 0
    assert busy["chat"] + idle["chat"] == 40


def test_a_server_without_metrics_is_asked_once() -> None:
    async def go() -> int:
        async with (
            openai_upstream(with_metrics=False) as (url, hits),
            Orchestrator(config([url]), inventory=INVENTORY) as orch,
        ):
            await asyncio.sleep(0.4)
            await orch.complete(call())
            probe = orch._checkers["up0/0"]._load_probe
            assert probe is not None
            assert probe.absent  # type: ignore[attr-defined]
        return hits["chat"]

    assert asyncio.run(asyncio.wait_for(go(), 30)) == 1
