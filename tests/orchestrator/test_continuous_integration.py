"""A continuous-batching transformers deployment through the orchestrator, as `xpuflow serve` runs it:
concurrent calls share the decode loop, a stream carries usage, status says the worker is continuous."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from xpuflow.backends.base import GenerationParams
from xpuflow.bundled import smollm2_gguf_path
from xpuflow.config import parse_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.engine import InferenceCall
from xpuflow.orchestrator import Orchestrator
from xpuflow.scheduling.request import RequestKind
from xpuflow.types import Resource, ResourceType

pytestmark = pytest.mark.slow

GIB = 1 << 30
INVENTORY = Inventory.of(
    [Resource("cpu", ResourceType.CPU, "cpu", {"memory_bytes": 16 * GIB, "logical_cores": 2})]
)
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "Write a haiku about rain."]


def chat(text: str, max_tokens: int = 10) -> InferenceCall:
    return InferenceCall(
        model="chat",
        kind=RequestKind.CHAT,
        payload=[{"role": "user", "content": text}],
        params=GenerationParams(max_tokens=max_tokens),
    )


def test_a_continuous_deployment_serves_concurrent_calls_and_streams() -> None:
    import torch

    torch.set_num_threads(1)
    config = parse_config(
        {
            "deployments": [
                {
                    "name": "smol",
                    "backend": "transformers",
                    "model": str(smollm2_gguf_path()),
                    "device": "cpu",
                    "max_batch_size": 4,
                    "options": {"continuous_batching": True, "num_threads": 1},
                }
            ],
            "models": [{"name": "chat", "tiers": [{"name": "default", "deployments": ["smol"]}]}],
        }
    )

    async def go() -> tuple[list[Any], list[Any], dict[str, Any]]:
        async with Orchestrator(config, inventory=INVENTORY) as orch:
            calls = [orch.complete(chat(q)) for q in QUESTIONS * 2]  # more calls than rows
            results = await asyncio.gather(*calls)
            events = [e async for e in orch.stream(chat(QUESTIONS[0], 8))]
            return results, events, orch.status()

    results, events, status = asyncio.run(asyncio.wait_for(go(), timeout=300))
    texts = [r.completion.text for r in results]
    assert texts[:3] == texts[3:]  # greedy: the same question gets the same answer, batched or not
    assert "Paris" in texts[0]
    chunks = [e.chunk for e in events if e.chunk is not None]
    assert chunks[-1].finish_reason is not None
    assert chunks[-1].prompt_tokens
    assert chunks[-1].completion_tokens
    (worker,) = status["workers"]
    assert worker["backend"] == "transformers"
    # six calls through at most four rows: some requests shared the running batch with others
    assert max(int(size) for size in worker["batch_sizes"]) > 1
