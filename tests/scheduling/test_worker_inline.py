"""The worker's fast path: a session that batches by itself, with a free slot and nothing queued ahead,
runs a submitted request in the caller's own task. Every way a request can end there must end as it
does through a batch task: its answer, its session's error, the caller's cancellation, its deadline,
its cancel signal, ``abandon_in_flight`` and ``stop``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from xpuflow.backends.base import BatchMode, Completion, GenerationParams, StreamChunk
from xpuflow.errors import ConfigError, DeadlineExceeded, RequestCancelled, SessionError, WorkerStopped
from xpuflow.scheduling.request import WorkRequest
from xpuflow.scheduling.worker import Worker
from xpuflow.testing import FakeSession
from xpuflow.testing.run_async import run_async


class Server(FakeSession):
    """A continuous session whose calls record the task they run in and wait for ``release``."""

    batch_mode = BatchMode.CONTINUOUS

    def __init__(self, **kw: Any) -> None:
        super().__init__(max_batch_size=4, **kw)
        self.release = asyncio.Event()
        self.release.set()
        self.tasks: list[asyncio.Task[Any] | None] = []
        self.cancelled = 0
        self.error: Exception | None = None

    async def generate(self, prompt: str, params: GenerationParams) -> Completion:
        self.tasks.append(asyncio.current_task())
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return await super().generate(prompt, params)


def request(deadline_s: float | None = None) -> WorkRequest:
    return WorkRequest.completion("a b", GenerationParams(max_tokens=4), deadline_s=deadline_s)


@run_async
async def test_the_request_runs_in_the_callers_task_with_a_batch_of_ones_bookkeeping() -> None:
    session = Server()
    async with Worker(session, worker_id="w") as worker:
        result = await worker.submit(request())
        assert result.text == "b a"
        assert session.tasks == [asyncio.current_task()]  # no batch task between caller and session
        assert worker.metrics.completed == 1
        assert worker.metrics.in_flight == 0
        assert dict(worker.metrics.batch_sizes) == {1: 1}
        assert worker.snapshot().oldest_in_flight_s is None


@run_async
async def test_an_ended_request_leaves_no_reference_cycle() -> None:
    """Its run, request and cancel signal are freed when it ends, not left for the garbage collector
    (the run's cancel callback and deadline held the run)."""
    import gc

    from xpuflow.scheduling.worker import _InlineRun

    async with Worker(Server(), worker_id="w") as worker:
        await worker.submit(request(deadline_s=asyncio.get_running_loop().time() + 60))
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                await worker.submit(request(deadline_s=asyncio.get_running_loop().time() + 60))
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = sorted({type(o).__name__ for o in gc.garbage if isinstance(o, (_InlineRun, WorkRequest))})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert left == []


@run_async
async def test_while_it_runs_it_counts_in_flight_and_ages_in_the_snapshot() -> None:
    session = Server()
    session.release.clear()
    async with Worker(session, worker_id="w") as worker:
        call = asyncio.ensure_future(worker.submit(request()))
        await asyncio.sleep(0.01)
        snapshot = worker.snapshot()
        assert snapshot.in_flight == 1
        assert snapshot.oldest_in_flight_s is not None
        assert snapshot.oldest_in_flight_s > 0
        session.release.set()
        await call


@run_async
async def test_a_session_error_fails_the_request_and_counts_against_the_worker() -> None:
    session = Server()
    session.error = RuntimeError("device fault")
    async with Worker(session, worker_id="w") as worker:
        with pytest.raises(SessionError, match="RuntimeError: device fault") as info:
            await worker.submit(request())
        assert isinstance(info.value.__cause__, RuntimeError)
        assert worker.metrics.failed == 1
        assert worker.health.consecutive_failures == 1
        assert worker.metrics.in_flight == 0


@run_async
async def test_a_refused_request_ends_its_batch_and_shows_a_working_device() -> None:
    # a ConfigError (the request's fault) ends its batch of one as a success of the device: its
    # metrics must still see the batch end (they are not ended early, as a served request's are)
    session = Server()
    session.error = ConfigError("max_tokens too large for this model", field="max_tokens")
    async with Worker(session, worker_id="w") as worker:
        for _ in range(2):
            with pytest.raises(ConfigError):
                await worker.submit(request())
        assert worker.metrics.in_flight == 0
        assert worker.metrics.running_batches == 0
        assert worker.metrics.failed == 2
        assert worker.health.consecutive_failures == 0
        assert worker.snapshot().in_flight == 0
        session.error = None
        assert (await worker.submit(request())).text == "b a"  # its slots are all free


@run_async
async def test_a_refused_stream_ends_its_batch() -> None:
    session = Streamer()
    session.feed.put_nowait(ConfigError("stop sequences are not supported", field="stop"))
    async with Worker(session, worker_id="w") as worker:
        with pytest.raises(ConfigError):
            await worker.stream(stream_request()).__anext__()
        assert worker.metrics.in_flight == 0
        assert worker.metrics.running_batches == 0


@run_async
async def test_the_callers_own_cancellation_passes_through_and_is_no_fault_of_the_worker() -> None:
    session = Server()
    session.release.clear()
    async with Worker(session, worker_id="w") as worker:
        call = asyncio.ensure_future(worker.submit(request()))
        await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert session.cancelled == 1  # the session's call stopped with it
        assert worker.health.consecutive_failures == 0
        assert worker.metrics.failed == 0
        assert worker.metrics.in_flight == 0
        session.release.set()


@run_async
async def test_the_deadline_cancels_the_call_with_deadline_exceeded() -> None:
    session = Server()
    session.release.clear()
    async with Worker(session, worker_id="w") as worker:
        loop = asyncio.get_running_loop()
        with pytest.raises(DeadlineExceeded, match="passed its deadline on worker 'w'"):
            await worker.submit(request(deadline_s=loop.time() + 0.05))
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # taken back
        assert session.cancelled == 1
        assert worker.health.consecutive_failures == 0
        assert worker.metrics.in_flight == 0
        session.release.set()


@run_async
async def test_no_timer_of_its_own_for_a_deadline_its_cancel_signal_is_promised_by() -> None:
    """A cancel signal promised to be set by the deadline (``set_by_s``, the gateway's request timeout)
    gives the request up then; the worker arms a timer only where no promise covers its deadline."""
    from xpuflow import deadlines

    session = Server()
    async with Worker(session, worker_id="w") as worker:
        loop = asyncio.get_running_loop()
        timers = deadlines.for_loop(loop)
        for set_by, armed in ((None, 1), (30.0, 0), (60.0, 0), (90.0, 1)):
            session.release.clear()
            now = loop.time()
            work = request(deadline_s=now + 60)
            if set_by is not None:
                work.cancelled.set_by_s = now + set_by  # type: ignore[attr-defined]
            before = timers.pending()
            call = asyncio.ensure_future(worker.submit(work))
            await asyncio.sleep(0.01)
            assert timers.pending() - before == armed, set_by
            session.release.set()
            assert (await call).text == "b a"
            assert timers.pending() == before
        # the promise kept: the signal gives the request up, as the deadline would have
        session.release.clear()
        work = request(deadline_s=loop.time() + 60)
        work.cancelled.set_by_s = loop.time() + 0.02  # type: ignore[attr-defined]
        loop.call_later(0.02, work.cancelled.set)
        with pytest.raises(RequestCancelled):
            await worker.submit(work)
        assert session.cancelled == 1
        session.release.set()


@run_async
async def test_a_dispatchers_attempt_limit_gives_it_up_with_attempt_timeout() -> None:
    """``submit(attempt_timeout_s=...)``: past the limit the call is cancelled and ``AttemptTimeout``
    raised (for the dispatcher to retry elsewhere), with no failure counted against the worker."""
    from xpuflow.errors import AttemptTimeout

    session = Server()
    session.release.clear()
    async with Worker(session, worker_id="w") as worker:
        loop = asyncio.get_running_loop()
        with pytest.raises(AttemptTimeout, match=r"no answer within 0\.05 s"):
            await worker.submit(request(deadline_s=loop.time() + 60), attempt_timeout_s=0.05)
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # taken back
        assert session.cancelled == 1
        assert worker.metrics.failed == 0
        assert worker.health.consecutive_failures == 0
        assert worker.metrics.in_flight == 0
        session.release.set()
        assert (await worker.submit(request(), attempt_timeout_s=5.0)).text == "b a"


@run_async
async def test_a_caller_cancelled_in_the_same_turn_as_a_give_up_is_still_cancelled() -> None:
    """Both cancel the task: the caller's cancellation is not swallowed by the give-up's error."""
    session = Server()
    session.release.clear()
    async with Worker(session, worker_id="w") as worker:
        work = request()
        call = asyncio.ensure_future(worker.submit(work))
        await asyncio.sleep(0.01)
        work.cancelled.set()  # the worker gives it up ...
        call.cancel()  # ... and its caller cancels it, before either cancellation is delivered
        with pytest.raises(asyncio.CancelledError):
            await call
        session.release.set()


@run_async
async def test_the_cancel_signal_withdraws_it_with_request_cancelled() -> None:
    session = Server()
    session.release.clear()
    async with Worker(session, worker_id="w") as worker:
        work = request()
        asyncio.get_running_loop().call_later(0.02, work.cancelled.set)
        with pytest.raises(RequestCancelled, match="its client went away"):
            await worker.submit(work)
        assert session.cancelled == 1
        assert worker.metrics.failed == 0
        session.release.set()


@run_async
async def test_abandon_in_flight_gives_it_up_so_that_the_router_can_retry_it() -> None:
    session = Server()
    session.release.clear()
    async with Worker(session, worker_id="w") as worker:
        call = asyncio.ensure_future(worker.submit(request()))
        await asyncio.sleep(0.01)
        assert worker.abandon_in_flight("the health check failed") == 1
        assert worker.abandon_in_flight("again") == 0  # given up once
        with pytest.raises(SessionError, match="the health check failed; retry it elsewhere"):
            await call
        assert worker.metrics.failed == 1
        assert worker.health.consecutive_failures == 0  # the check recorded the fault, not this
        session.release.set()


@run_async
async def test_stop_waits_for_a_request_running_in_its_callers_task() -> None:
    session = Server()
    session.release.clear()
    worker = Worker(session, worker_id="w")
    await worker.start()
    call = asyncio.ensure_future(worker.submit(request()))
    await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(worker.stop())
    await asyncio.sleep(0.02)
    assert not stopping.done()  # the request still runs
    session.release.set()
    assert (await call).text == "b a"
    await stopping


@run_async
async def test_stop_past_its_timeout_fails_it_with_worker_stopped() -> None:
    session = Server()
    session.release.clear()
    worker = Worker(session, worker_id="w", stop_timeout_s=0.05)
    await worker.start()
    call = asyncio.ensure_future(worker.submit(request()))
    await asyncio.sleep(0.01)
    await worker.stop()
    with pytest.raises(WorkerStopped, match="stopped while running this request"):
        await call
    assert session.cancelled == 1


# -- streams ---------------------------------------------------------------------------------------------


class Streamer(Server):
    """A continuous session whose streams send what the test puts in ``feed`` (None ends the stream)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.feed: asyncio.Queue[StreamChunk | Exception | None] = asyncio.Queue()
        self.closed = 0

    async def stream_generate(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        self.tasks.append(asyncio.current_task())
        try:
            while (item := await self.feed.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.closed += 1


def stream_request(deadline_s: float | None = None) -> WorkRequest:
    return WorkRequest.completion("a b", GenerationParams(max_tokens=4), stream=True, deadline_s=deadline_s)


@run_async
async def test_a_stream_is_pulled_by_its_consumers_own_task() -> None:
    session = Streamer()
    for text in ("Hel", "lo", None):
        session.feed.put_nowait(StreamChunk(text) if text else None)
    async with Worker(session, worker_id="w") as worker:
        texts = [chunk.text async for chunk in worker.stream(stream_request())]
        assert texts == ["Hel", "lo"]
        assert session.tasks == [asyncio.current_task()]  # no stream task between
        assert session.closed == 1
        assert worker.metrics.completed == 1
        assert worker.metrics.tokens_total == 2
        assert worker.metrics.in_flight == 0
        assert worker.snapshot().oldest_in_flight_s is None


@run_async
async def test_a_consumer_that_stops_reading_closes_the_sessions_stream() -> None:
    session = Streamer()
    session.feed.put_nowait(StreamChunk("one"))
    async with Worker(session, worker_id="w") as worker:
        chunks = worker.stream(stream_request())
        assert (await chunks.__anext__()).text == "one"
        await chunks.aclose()
        assert session.closed == 1
        assert worker.metrics.in_flight == 0
        assert worker.metrics.failed == 0
        assert worker.health.consecutive_failures == 0


@run_async
async def test_the_deadline_while_waiting_for_a_chunk_raises_deadline_exceeded_after_the_chunks() -> None:
    session = Streamer()
    session.feed.put_nowait(StreamChunk("one"))
    async with Worker(session, worker_id="w") as worker:
        loop = asyncio.get_running_loop()
        chunks = worker.stream(stream_request(deadline_s=loop.time() + 0.05))
        assert (await chunks.__anext__()).text == "one"
        with pytest.raises(DeadlineExceeded):
            await chunks.__anext__()
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        assert session.cancelled == 1
        assert worker.health.consecutive_failures == 0


@run_async
async def test_the_deadline_while_the_consumer_is_away_is_raised_at_its_next_read() -> None:
    session = Streamer()
    session.feed.put_nowait(StreamChunk("one"))
    async with Worker(session, worker_id="w") as worker:
        loop = asyncio.get_running_loop()
        chunks = worker.stream(stream_request(deadline_s=loop.time() + 0.02))
        assert (await chunks.__anext__()).text == "one"
        await asyncio.sleep(0.05)  # away (sending the chunk on) when the deadline passes: not cancelled
        with pytest.raises(DeadlineExceeded):
            await chunks.__anext__()
        assert session.closed == 1


@run_async
async def test_abandon_spares_a_stream_that_has_answered_but_not_one_still_silent() -> None:
    session = Streamer()
    async with Worker(session, worker_id="w") as worker:
        silent = worker.stream(stream_request())
        waiting = asyncio.ensure_future(silent.__anext__())
        await asyncio.sleep(0.01)
        assert worker.abandon_in_flight("the health check failed") == 1
        with pytest.raises(SessionError, match="the health check failed"):
            await waiting
        assert worker.metrics.failed == 1

        session.feed.put_nowait(StreamChunk("one"))
        answering = worker.stream(stream_request())
        assert (await answering.__anext__()).text == "one"
        assert worker.abandon_in_flight("hung") == 0
        session.feed.put_nowait(None)
        assert [c async for c in answering] == []
        assert worker.metrics.completed == 1


@run_async
async def test_a_session_error_mid_stream_counts_against_the_worker() -> None:
    session = Streamer()
    session.feed.put_nowait(StreamChunk("one"))
    session.feed.put_nowait(RuntimeError("device fault"))
    async with Worker(session, worker_id="w") as worker:
        chunks = worker.stream(stream_request())
        assert (await chunks.__anext__()).text == "one"
        with pytest.raises(SessionError, match="RuntimeError: device fault"):
            await chunks.__anext__()
        assert worker.health.consecutive_failures == 1
        assert worker.metrics.failed == 1
        assert worker.metrics.in_flight == 0


@run_async
async def test_stop_past_its_timeout_ends_a_waiting_stream_with_worker_stopped() -> None:
    session = Streamer()
    worker = Worker(session, worker_id="w", stop_timeout_s=0.05)
    await worker.start()
    chunks = worker.stream(stream_request())
    waiting = asyncio.ensure_future(chunks.__anext__())
    await asyncio.sleep(0.01)
    await worker.stop()
    with pytest.raises(WorkerStopped):
        await waiting
