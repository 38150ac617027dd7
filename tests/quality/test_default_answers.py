"""Every worker of the embedded default's ``chat`` tier answers a fixed set of prompts right.

A tier whose workers give different quality is broken routing: a client cannot tell which one it
will get. Each worker is run directly (plugin -> build -> session), with the sampling a request gets
when it names none (``GenerationParams()``: greedy), on short factual and instruction prompts whose
expected keywords the model in full precision produces. The set is fixed; a worker that misses one
fails the test with its answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytestmark = [pytest.mark.slow]

#: prompt -> keywords, any one of which the answer must contain (case-insensitive)
PROMPTS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("What is the capital of Canada?", ("ottawa",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the chemical symbol for water?", ("h2o",)),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "co2")),
    ("How many days are in a week?", ("seven", "7 days")),
    ("What is 2 plus 2?", ("4", "four")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What language is spoken in Brazil?", ("portuguese",)),
    ("What is the boiling point of water in Celsius?", ("100",)),
    ("Which ocean is the largest?", ("pacific",)),
    ("What is the plural of 'mouse'?", ("mice",)),
    ("What is the main language spoken in the United States?", ("english",)),
    ("Write one word that rhymes with 'cat'.", ("hat", "bat", "mat", "rat", "sat", "fat", "pat")),
    ("List three primary colors.", ("red",)),
]
MAX_TOKENS = 48


def _chat_workers() -> list[Any]:
    from xpuflow.defaults import embedded_config

    config = embedded_config()
    chat = next(m for m in config.models if m.name == "chat")
    names = {name for tier in chat.tiers for name in tier.deployments}
    return [d for d in config.deployments if d.name in names]


def _answers(deployment: Any) -> list[str]:
    import torch

    from xpuflow.artifacts.builder import build_all
    from xpuflow.artifacts.store import ArtifactStore
    from xpuflow.backends.base import GenerationParams
    from xpuflow.backends.registry import get_backend
    from xpuflow.types import Resource, ResourceType

    torch.set_num_threads(1)
    cpu = Resource("cpu", ResourceType.CPU, "host CPU", attributes={"physical_cores": 1})
    plugin = get_backend(deployment.backend)
    model_config = deployment.to_model_config()

    async def run() -> list[str]:
        artifacts = build_all(plugin, [cpu], model_config, ArtifactStore())
        session = await plugin.create_session([cpu], model_config, artifacts)
        try:
            params = GenerationParams(max_tokens=MAX_TOKENS)
            return [(await session.chat([{"role": "user", "content": p}], params)).text for p, _ in PROMPTS]
        finally:
            await session.close()

    return asyncio.run(run())


def test_the_default_request_sampling_is_greedy() -> None:
    from xpuflow.backends.base import GenerationParams

    assert GenerationParams().temperature == 0.0


@pytest.mark.parametrize("name", [d.name for d in _chat_workers()])
def test_every_default_chat_worker_answers_the_fixed_prompts(name: str) -> None:
    deployment = next(d for d in _chat_workers() if d.name == name)
    answers = _answers(deployment)
    wrong = [
        f"{prompt!r} -> {answer[:120]!r} (expected one of {keywords})"
        for (prompt, keywords), answer in zip(PROMPTS, answers, strict=True)
        if not any(k in answer.lower() for k in keywords)
    ]
    assert not wrong, f"{name} answered {len(wrong)} of {len(PROMPTS)} wrong:\n" + "\n".join(wrong)
