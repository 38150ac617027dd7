"""Continuous batching on SmolLM2: requests that join a running batch get what they would get alone."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from xpuflow.backends.base import BatchMode, GenerationParams, ModelConfig
from xpuflow.errors import ConfigError, SessionError
from xpuflow.types import Resource, ResourceType

pytestmark = pytest.mark.slow

CPU = Resource("cpu", ResourceType.CPU, "host CPU")
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name a primary colour."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain what a prime number is."}],
    [{"role": "user", "content": "Give me three words that rhyme with cat."}],
]


async def _session(continuous: bool, max_batch_size: int = 8) -> Any:
    from xpuflow.artifacts.builder import build_all
    from xpuflow.artifacts.store import ArtifactStore
    from xpuflow.backends.transformers.plugin import TransformersPlugin
    from xpuflow.bundled import smollm2_gguf_path

    plugin = TransformersPlugin()
    config = ModelConfig(
        "smollm2",
        smollm2_gguf_path(),
        "chat",
        max_batch_size=max_batch_size,
        options={"continuous_batching": continuous, "num_threads": 1},
    )
    return await plugin.create_session([CPU], config, build_all(plugin, [CPU], config, ArtifactStore()))


def _wait_until_empty(session: Any) -> None:
    """The batch empties: cancelled rows leave at the loop's next step, on its own thread."""
    deadline = time.monotonic() + 10
    while session._loop.active_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session._loop.active_rows == 0


@pytest.fixture(scope="module")
def sessions() -> Iterator[SimpleNamespace]:
    import torch

    torch.set_num_threads(1)
    loop = asyncio.new_event_loop()
    static = loop.run_until_complete(_session(False))
    continuous = loop.run_until_complete(_session(True))
    yield SimpleNamespace(loop=loop, static=static, continuous=continuous)
    loop.run_until_complete(static.close())
    loop.run_until_complete(continuous.close())
    loop.close()


def test_requests_arriving_during_a_generation_join_it_and_match_static_batching(
    sessions: SimpleNamespace,
) -> None:
    params = GenerationParams(max_tokens=20)
    session = sessions.continuous
    assert session.batch_mode is BatchMode.CONTINUOUS

    async def staggered() -> list[Any]:
        tasks = []
        for chat in CHATS:
            tasks.append(asyncio.create_task(session.chat(chat, params)))
            await asyncio.sleep(0.12)  # each arrives while the earlier ones are decoding
        return await asyncio.gather(*tasks)

    reference = sessions.loop.run_until_complete(sessions.static.chat_batch(CHATS, params))
    joined = sessions.loop.run_until_complete(staggered())
    assert [c.text for c in joined] == [c.text for c in reference]
    assert [c.completion_tokens for c in joined] == [c.completion_tokens for c in reference]
    assert [c.prompt_tokens for c in joined] == [c.prompt_tokens for c in reference]
    assert session._loop.max_rows_seen >= 3  # they really shared a running batch
    _wait_until_empty(session)


def test_streaming_sampling_stops_and_batches_through_the_loop(sessions: SimpleNamespace) -> None:
    session = sessions.continuous

    async def go() -> dict[str, Any]:
        params = GenerationParams(max_tokens=12)
        whole = await session.chat(CHATS[0], params)
        chunks = [c async for c in session.stream_chat(CHATS[0], params)]
        seeded = GenerationParams(max_tokens=10, temperature=0.9, seed=11)
        a, b = await asyncio.gather(session.chat(CHATS[2], seeded), session.chat(CHATS[2], seeded))
        stopped = await session.chat(CHATS[3], GenerationParams(max_tokens=30, stop=("number",)))
        batch = await session.generate_batch(
            ["Once upon a time", "The sky is"], GenerationParams(max_tokens=6)
        )
        return {"whole": whole, "chunks": chunks, "a": a, "b": b, "stopped": stopped, "batch": batch}

    out = sessions.loop.run_until_complete(go())
    chunks = out["chunks"]
    assert "".join(c.text for c in chunks) == out["whole"].text
    assert chunks[-1].finish_reason == out["whole"].finish_reason
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (
        out["whole"].prompt_tokens,
        out["whole"].completion_tokens,
    )
    assert out["a"].text == out["b"].text  # a seed makes sampling repeatable, even side by side
    assert "number" not in out["stopped"].text
    assert out["stopped"].finish_reason == "stop"
    assert [c.completion_tokens for c in out["batch"]] == [6, 6]


def test_a_client_that_goes_away_leaves_the_batch(sessions: SimpleNamespace) -> None:
    session = sessions.continuous

    async def go() -> None:
        stream = session.stream_chat(CHATS[2], GenerationParams(max_tokens=200))
        async for _ in stream:
            break
        await stream.aclose()
        deadline = time.monotonic() + 10
        while session._loop.active_rows and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert session._loop.active_rows == 0
        call = asyncio.create_task(session.chat(CHATS[3], GenerationParams(max_tokens=200)))
        while session._loop.active_rows == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # cancel as soon as it decodes: it cannot have finished
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        while session._loop.active_rows and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert session._loop.active_rows == 0

    sessions.loop.run_until_complete(go())


def test_a_prompt_longer_than_the_context_fails_alone(sessions: SimpleNamespace) -> None:
    session = sessions.continuous
    too_long = [{"role": "user", "content": "word " * 10_000}]

    async def go() -> list[Any]:
        return await asyncio.gather(
            session.chat(too_long, GenerationParams(max_tokens=4)),
            session.chat(CHATS[0], GenerationParams(max_tokens=4)),
            return_exceptions=True,
        )

    bad, good = sessions.loop.run_until_complete(go())
    assert isinstance(bad, ConfigError)
    assert "tokens but model" in str(bad)
    assert good.completion_tokens == 4


def test_a_worker_sends_each_request_at_once_and_the_loop_batches_them(sessions: SimpleNamespace) -> None:
    from xpuflow.scheduling.request import WorkRequest
    from xpuflow.scheduling.worker import Worker

    session = sessions.continuous

    async def go() -> tuple[list[Any], dict[str, Any]]:
        async with Worker(session, worker_id="w") as worker:
            assert worker.max_in_flight == 8
            results = await asyncio.gather(
                *(worker.submit(WorkRequest.chat(c, GenerationParams(max_tokens=8))) for c in CHATS)
            )
            return results, worker.to_dict()

    results, status = sessions.loop.run_until_complete(go())
    assert all(r.completion_tokens > 0 for r in results)
    assert status["batching"]["policy"] == "continuous"


def test_close_fails_what_is_still_running_and_refuses_more() -> None:
    import torch

    torch.set_num_threads(1)

    async def go() -> None:
        session = await _session(True, max_batch_size=2)
        running = asyncio.create_task(session.chat(CHATS[2], GenerationParams(max_tokens=300)))
        deadline = time.monotonic() + 30
        while session._loop.active_rows == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # close as soon as the row decodes: it cannot have finished
        await session.close()
        with pytest.raises(SessionError):
            await running
        with pytest.raises(SessionError):
            await session.chat(CHATS[0], GenerationParams(max_tokens=2))

    asyncio.run(go())


def test_bad_continuous_batching_option_is_a_config_error() -> None:
    from xpuflow.backends.transformers.plugin import TransformersPlugin
    from xpuflow.bundled import smollm2_gguf_path

    config = ModelConfig("smollm2", smollm2_gguf_path(), "chat", options={"continuous_batching": "yes"})
    with pytest.raises(ConfigError) as info:
        TransformersPlugin().required_build_profiles([CPU], config)
    assert info.value.field == "options.continuous_batching"


def test_a_churn_of_joins_leaves_and_cancels_loses_nothing(sessions: SimpleNamespace) -> None:
    """Many requests of random lengths through a loop of 8 rows, some cancelled midway: every call ends
    (answered or cancelled), greedy answers equal the static session's, and the batch empties."""
    import random

    rng = random.Random(5)
    session = sessions.continuous
    plan = [(CHATS[i % len(CHATS)], rng.randint(1, 12), rng.random() < 0.2) for i in range(20)]

    async def go() -> list[Any]:
        async def one(chat: Any, max_tokens: int, cancel: bool) -> Any:
            await asyncio.sleep(rng.random() * 0.6)
            task = asyncio.create_task(session.chat(chat, GenerationParams(max_tokens=max_tokens)))
            if cancel:
                await asyncio.sleep(0.05)
                task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                return None

        return await asyncio.gather(*(one(*p) for p in plan))

    results = sessions.loop.run_until_complete(go())
    reference = {
        n: sessions.loop.run_until_complete(sessions.static.chat_batch(CHATS, GenerationParams(max_tokens=n)))
        for n in sorted({p[1] for p, r in zip(plan, results, strict=True) if r is not None})
    }
    answered = 0
    for (chat, max_tokens, _), result in zip(plan, results, strict=True):
        if result is None:
            continue
        answered += 1
        assert result.text == reference[max_tokens][CHATS.index(chat)].text
    assert answered >= 12
    _wait_until_empty(session)


def test_a_burst_of_long_prompts_is_prefilled_over_several_steps(sessions: SimpleNamespace) -> None:
    from xpuflow.backends.decode_loop import DecodeLoop, LoopRow

    static = sessions.static
    loop = DecodeLoop(
        static._model,
        static._tokenizer,
        device="cpu",
        max_rows=8,
        eos_ids=static._eos_ids,
        prepare=static._inputs,
        max_seq_len=static.max_seq_len,
        model_id="smollm2",
        max_prefill_tokens=60,  # about one chat prompt per step
    )
    try:
        texts = [static._render(c) for c in CHATS[:4]]
        rows = [loop.submit(LoopRow(t, False, GenerationParams(max_tokens=6))) for t in texts]
        done = [r.future.result(timeout=60) for r in rows]
    finally:
        loop.close()
    reference = sessions.loop.run_until_complete(static.chat_batch(CHATS[:4], GenerationParams(max_tokens=6)))
    assert [c.text for c in done] == [c.text for c in reference]
    assert loop.steps >= 3 + 5  # admissions spread over steps, then the decoding

    # the budget itself, without the loop thread's timing: one admission takes one prompt of the four
    import torch

    burst = [LoopRow(t, False, GenerationParams(max_tokens=6)) for t in texts]
    with torch.inference_mode():
        loop._admit(burst)
    assert (loop.active_rows, len(loop._deferred)) == (1, 3)


def test_a_consumer_that_breaks_loses_only_its_own_row(sessions: SimpleNamespace) -> None:
    from xpuflow.backends.decode_loop import LoopRow

    session = sessions.continuous
    text = session._render(CHATS[0])

    def broken(chunk: Any) -> None:
        raise RuntimeError("Event loop is closed")

    bad = session._loop.submit(LoopRow(text, False, GenerationParams(max_tokens=30), on_chunk=broken))
    good = session._loop.submit(LoopRow(text, False, GenerationParams(max_tokens=12)))
    reference = sessions.loop.run_until_complete(
        sessions.static.chat(CHATS[0], GenerationParams(max_tokens=12))
    )
    assert good.future.result(timeout=60).text == reference.text
    with pytest.raises(concurrent.futures.CancelledError):  # the row was dropped, nothing else
        bad.future.result(timeout=60)
    assert bad.cancel.is_set()
