"""remote_openai deployments through the orchestrator, in front of mock upstream processes on 127.0.0.1:
concurrency, hung and dead upstreams, recovery, outages of a whole tier, and reload."""

from __future__ import annotations

import asyncio
import time

import pytest
from remote_helpers import INVENTORY, chat_call, remote_config, upstreams

from xpuflow.orchestrator import Orchestrator

pytestmark = pytest.mark.e2e


async def _stream_text(orch: Orchestrator) -> str:
    parts = []
    async for event in orch.stream(chat_call()):
        assert event.error is None
        if event.chunk is not None:
            parts.append(event.chunk.text)
    return "".join(parts)


def test_concurrent_streams_run_side_by_side_on_one_remote_worker() -> None:
    stream_s, count = 1.0, 8

    async def run() -> tuple[float, list[str], dict[str, object]]:
        with upstreams(1, "--stream-s", str(stream_s)) as (upstream,):
            async with Orchestrator(remote_config([upstream.url]), inventory=INVENTORY) as orch:
                started = time.monotonic()
                texts = await asyncio.wait_for(
                    asyncio.gather(*(_stream_text(orch) for _ in range(count))), timeout=30
                )
                elapsed = time.monotonic() - started
                (worker,) = orch.status()["workers"]
                return elapsed, texts, worker

    elapsed, texts, worker = asyncio.run(run())
    assert texts == ["u0 a b c d"] * count
    # one after another would take count * stream_s; side by side about stream_s
    assert count * stream_s / elapsed >= 6, f"{count} streams took {elapsed:.2f} s"
    assert worker["max_in_flight"] == 64
