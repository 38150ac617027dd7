"""``routing.retry._within``: the attempt and stream-chunk timeout, run in the caller's task."""

from __future__ import annotations

import asyncio

import pytest

from xpuflow.routing.retry import _AttemptTimeout, _within


async def _slow(result: str, delay_s: float) -> str:
    await asyncio.sleep(delay_s)
    return result


def test_within_returns_the_result_or_times_out_leaving_the_task_uncancelled() -> None:
    async def go() -> None:
        assert await _within(_slow("ok", 0.0), 1.0) == "ok"
        assert await _within(_slow("ok", 0.0), None) == "ok"
        with pytest.raises(_AttemptTimeout, match=r"no answer within 0\.01 s"):
            await _within(_slow("late", 1.0), 0.01)
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0  # the expiry's own cancellation is taken back
        assert await _within(_slow("after", 0.0), 1.0) == "after"

    asyncio.run(go())


def test_the_works_own_timeout_and_a_callers_cancellation_pass_through() -> None:
    async def raises_timeout() -> None:
        raise TimeoutError("the worker's deadline")

    async def go() -> None:
        with pytest.raises(TimeoutError, match="worker's deadline"):
            await _within(raises_timeout(), 1.0)
        inner = asyncio.create_task(_within(_slow("never", 1.0), 5.0))
        await asyncio.sleep(0.01)
        inner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await inner

    asyncio.run(go())


def test_a_streams_idle_limit_times_out_one_long_gap_not_many_short_ones() -> None:
    from xpuflow.routing.retry import _IdleLimit

    async def go() -> None:
        limit = _IdleLimit(0.05)
        for _ in range(8):  # 8 x 0.02 s: longer than the limit in all, each gap within it
            assert await limit.wait(_slow("chunk", 0.02)) == "chunk"
        with pytest.raises(_AttemptTimeout, match=r"no answer within 0\.05 s"):
            await limit.wait(_slow("late", 1.0))
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0  # the expiry's own cancellation is taken back
        assert await limit.wait(_slow("after", 0.0)) == "after"
        limit.close()

    asyncio.run(go())


def test_a_streams_idle_limit_lets_a_callers_cancellation_through() -> None:
    from xpuflow.routing.retry import _IdleLimit

    async def go() -> None:
        limit = _IdleLimit(5.0)
        inner = asyncio.create_task(limit.wait(_slow("never", 1.0)))
        await asyncio.sleep(0.01)
        inner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await inner
        limit.close()

    asyncio.run(go())
