"""``cluster.tasks.cancel_and_wait``: a poller whose cancellation ``asyncio.wait_for`` swallowed (an
answer landed in the same loop turn, Python < 3.12) still stops."""

from __future__ import annotations

import asyncio
import sys

from xpuflow.cluster.tasks import cancel_and_wait


async def _poller(calls: list[asyncio.Future[int]]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        call: asyncio.Future[int] = loop.create_future()
        calls.append(call)
        await asyncio.wait_for(call, 5.0)  # what the pollers do with Ray calls
        await asyncio.sleep(0.01)


def test_a_poller_stops_even_when_its_cancellation_was_swallowed() -> None:
    async def go() -> None:
        calls: list[asyncio.Future[int]] = []
        task = asyncio.ensure_future(_poller(calls))
        await asyncio.sleep(0.02)
        calls[-1].set_result(1)  # the answer lands ...
        task.cancel()  # ... in the same loop turn as the stop
        await asyncio.wait({task}, timeout=0.2)
        if sys.version_info < (3, 12):
            assert not task.done(), "wait_for kept the cancellation: the bug this guards against is gone"
        await cancel_and_wait(task, timeout_s=2.0)
        assert task.done()

    asyncio.run(go())
