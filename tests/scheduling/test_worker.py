from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xpuflow.backends.base import BatchMode, Completion, GenerationParams, StreamChunk
from xpuflow.clock import FakeClock
from xpuflow.errors import (
    ConfigError,
    DeadlineExceeded,
    QueueFull,
    RequestCancelled,
    SessionError,
    WorkerStopped,
)
from xpuflow.scheduling.health import HealthState, HealthTracker
from xpuflow.scheduling.metrics import WorkerMetrics
from xpuflow.scheduling.queue import QueuePolicy
from xpuflow.scheduling.request import CancelSignal, Priority, RequestKind, WorkRequest
from xpuflow.scheduling.worker import Worker
from xpuflow.testing import FakeSession
from xpuflow.testing.run_async import run_async
from xpuflow.types import Resource, ResourceType, WorkerSnapshot

CPU = Resource("cpu", ResourceType.CPU, attributes={"memory_bytes": 8 << 30})


def completion(prompt: str, max_tokens: int = 16, **kw: Any) -> WorkRequest:
    return WorkRequest.completion(prompt, GenerationParams(max_tokens=max_tokens), **kw)


def chat(prompt: str, **kw: Any) -> WorkRequest:
    return WorkRequest.chat([{"role": "user", "content": prompt}], GenerationParams(max_tokens=16), **kw)


def reversed_words(prompt: str) -> str:
    return " ".join(prompt.split()[::-1])


class Gate(FakeSession):
    """A fake device whose batches wait until the test opens the gate, so queues fill on cue."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.prompts: list[list[str]] = []

    async def generate_batch(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        self.prompts.append(list(prompts))
        self.started.set()
        await self.gate.wait()
        return await super().generate_batch(prompts, params)


class Picky(FakeSession):
    """Rejects any batch that holds the prompt "bad" as a bad request, as a real session does with a
    prompt longer than its context."""

    async def generate_batch(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        if "bad" in prompts:
            self.batch_sizes.append(len(prompts))
            raise ConfigError("the prompt is too long", field="prompt")
        return await super().generate_batch(prompts, params)


class Sequential(FakeSession):
    batch_mode = BatchMode.SEQUENTIAL


async def blocked_worker(**kw: object) -> tuple[Worker, Gate]:
    """A started worker whose device is busy (gate closed) with one request, ``blocker``."""
    session = Gate(max_batch_size=8)
    worker = Worker(session, worker_id="w", **kw)  # type: ignore[arg-type]
    await worker.start()
    session.gate.clear()
    worker._blocker = asyncio.create_task(worker.submit(completion("blocker")))  # type: ignore[attr-defined]
    await session.started.wait()
    return worker, session


# -- results, batching, order --------------------------------------------------------------------------


@run_async
async def test_results_go_to_their_own_requests_in_batches() -> None:
    session = FakeSession(service_time_s=0.005, max_batch_size=8)
    async with Worker(session, worker_id="w0", deployment="chat-main") as worker:
        prompts = [f"prompt number {i}" for i in range(30)]
        results = await asyncio.gather(*(worker.submit(completion(p)) for p in prompts))
        chats = await asyncio.gather(*(worker.submit(chat(p)) for p in prompts[:5]))
    assert [r.text for r in results] == [reversed_words(p) for p in prompts]  # type: ignore[union-attr]
    assert [r.text for r in chats] == [reversed_words(p) for p in prompts[:5]]  # type: ignore[union-attr]
    assert max(session.batch_sizes) == 8
    assert sum(session.batch_sizes) == 35
    assert worker.metrics.completed == 35
    assert worker.metrics.batch_sizes[8] >= 3


@run_async
async def test_queued_requests_run_by_priority_while_the_device_is_busy() -> None:
    worker, session = await blocked_worker(max_batch_size=2, aging_s=60.0)
    low = asyncio.create_task(worker.submit(completion("low", priority=Priority.LOW)))
    normal = asyncio.create_task(worker.submit(completion("normal")))
    high = asyncio.create_task(worker.submit(completion("high", priority=Priority.HIGH)))
    await asyncio.sleep(0)
    assert worker.metrics.queue_depth == {Priority.HIGH: 1, Priority.NORMAL: 1, Priority.LOW: 1}
    session.gate.set()
    await asyncio.gather(low, normal, high, worker._blocker)  # type: ignore[attr-defined]
    assert session.prompts == [["blocker"], ["high", "normal"], ["low"]]
    await worker.stop()


@run_async
async def test_a_request_retried_from_a_failed_worker_goes_ahead_of_later_arrivals() -> None:
    # The request first queued on worker a, which stopped before serving it; queued again on b (busy,
    # with two requests that arrived after it), it keeps its place by when it first queued.
    a, a_session = await blocked_worker(max_batch_size=1)
    b, b_session = await blocked_worker(max_batch_size=1)
    moved = completion("moved")
    first = asyncio.create_task(a.submit(moved))
    await asyncio.sleep(0)
    assert moved.queued_since_s is not None
    later = [asyncio.create_task(b.submit(completion(f"later {i}"))) for i in range(2)]
    await asyncio.sleep(0)
    a_session.gate.set()
    await a.stop(drain=False)
    with pytest.raises(WorkerStopped):
        await first
    retried = asyncio.create_task(b.submit(moved))
    await asyncio.sleep(0)
    b_session.gate.set()
    await asyncio.gather(retried, *later, b._blocker)  # type: ignore[attr-defined]
    assert b_session.prompts == [["blocker"], ["moved"], ["later 0"], ["later 1"]]
    await b.stop()


@run_async
async def test_fifo_worker_ignores_priority() -> None:
    worker, session = await blocked_worker(max_batch_size=1, queue_policy=QueuePolicy.FIFO)
    tasks = [
        asyncio.create_task(worker.submit(completion(name, priority=p)))
        for name, p in (("low", Priority.LOW), ("high", Priority.HIGH))
    ]
    await asyncio.sleep(0)
    session.gate.set()
    await asyncio.gather(*tasks)
    assert session.prompts[1:] == [["low"], ["high"]]
    await worker.stop()


@run_async
async def test_different_max_tokens_and_kinds_never_share_a_batch() -> None:
    worker, session = await blocked_worker(max_batch_size=8)
    tasks = [
        asyncio.create_task(worker.submit(completion(f"a{i}", max_tokens=4 if i % 2 else 8)))
        for i in range(6)
    ]
    await asyncio.sleep(0)
    session.gate.set()
    results = await asyncio.gather(*tasks)
    assert sorted(len(b) for b in session.prompts[1:]) == [3, 3]
    assert [r.text for r in results] == [f"a{i}" for i in range(6)]  # type: ignore[union-attr]
    await worker.stop()


@run_async
async def test_embedding_requests_share_one_embed_call() -> None:
    session = FakeSession(max_batch_size=8, embedding_dim=4)
    worker = Worker(session, worker_id="emb")
    await worker.start()
    requests = [WorkRequest.embedding([f"text {i}", f"more {i}"]) for i in range(3)]
    results = [cast(list[list[float]], r) for r in await asyncio.gather(*map(worker.submit, requests))]
    await worker.stop()
    assert [len(r) for r in results] == [2, 2, 2]
    assert all(len(v) == 4 for r in results for v in r)
    assert session.batch_sizes == [6]  # three requests, one call with all six texts
    alone = FakeSession(embedding_dim=4)
    assert results[1] == await alone.embed(["text 1", "more 1"])


@run_async
async def test_sessions_that_do_not_batch_natively_get_one_request_at_a_time() -> None:
    session = Sequential(service_time_s=0.002, max_batch_size=8)
    async with Worker(session, max_batch_size=8) as worker:
        assert worker.max_batch_size == 1
        await asyncio.gather(*(worker.submit(completion(f"p{i}")) for i in range(5)))
    assert session.batch_sizes == [1] * 5


class Continuous(FakeSession):
    """A session that batches by itself at every step: counts the calls running at once."""

    batch_mode = BatchMode.CONTINUOUS

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.running = 0
        self.peak = 0

    async def _serve(self, n: int, *work: Any) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await super()._serve(n, *work)
        finally:
            self.running -= 1


@run_async
async def test_a_continuous_session_gets_each_request_at_once_up_to_its_batch_size() -> None:
    session = Continuous(service_time_s=0.05, max_batch_size=4)
    async with Worker(session) as worker:
        assert (worker.max_in_flight, worker.max_batch_size) == (4, 1)
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(worker.submit(completion(f"p{i} q")) for i in range(8)))
        elapsed = asyncio.get_running_loop().time() - started
        status = worker.to_dict()
        histogram = dict(worker.metrics.batch_sizes)
    assert [r.text for r in results] == [reversed_words(f"p{i} q") for i in range(8)]
    assert session.batch_sizes == [1] * 8  # one call per request: the session merges them itself
    assert session.peak == 4  # never more in flight than its batch size
    assert elapsed < 0.05 * 8 * 0.75  # side by side (one at a time would take 0.4 s)
    assert status["batching"]["policy"] == "continuous"
    assert max(histogram) == 4  # the histogram counts the requests that shared the running batch


@run_async
async def test_max_in_flight_caps_a_continuous_session_and_shows_in_the_snapshot() -> None:
    session = Continuous(service_time_s=0.05, max_batch_size=2)
    async with Worker(session, max_in_flight=6) as worker:
        await asyncio.gather(*(worker.submit(completion(f"p{i} q")) for i in range(12)))
        snapshot = worker.snapshot()
    assert session.peak == 6
    assert snapshot.max_in_flight == 6
    assert worker.to_dict()["batching"]["max_in_flight"] == 6


@run_async
async def test_a_continuous_session_starts_a_request_in_the_turn_it_arrives_when_a_slot_is_free() -> None:
    """Nothing queued ahead and a free slot: the request starts without waiting for the batch loop's
    turn; with the slots full it queues, and starts when one frees, in priority order."""
    session = Continuous(service_time_s=0.05, max_batch_size=1)
    async with Worker(session, max_in_flight=1) as worker:
        first = asyncio.ensure_future(worker.submit(completion("a b")))
        await asyncio.sleep(0)  # one turn: the submit ran up to its wait, and launched the call
        assert worker.metrics.in_flight == 1
        low = asyncio.ensure_future(worker.submit(completion("c d", priority=Priority.LOW)))
        high = asyncio.ensure_future(worker.submit(completion("e f", priority=Priority.HIGH)))
        await asyncio.sleep(0.01)
        assert session.running == 1  # the slot is taken: both wait in the queue
        assert worker.snapshot().queue_depth == 2
        done = [t async for t in _as_completed([first, low, high])]
    assert [r.text for r in done] == ["b a", "f e", "d c"]


async def _as_completed(tasks: list[asyncio.Future[Any]]) -> AsyncIterator[Any]:
    for next_done in asyncio.as_completed(tasks):
        yield await next_done


@run_async
async def test_a_sessions_own_in_flight_limit_is_the_default() -> None:
    class Server(Continuous):
        max_in_flight = 5  # what a remote session's connection pool allows

    session = Server(service_time_s=0.05, max_batch_size=2)
    async with Worker(session) as worker:
        await asyncio.gather(*(worker.submit(completion(f"p{i} q")) for i in range(10)))
    assert session.peak == 5


def test_max_in_flight_is_refused_by_sessions_the_worker_batches() -> None:
    with pytest.raises(ConfigError, match="max_batch_size") as info:
        Worker(FakeSession(), worker_id="w", max_in_flight=4)
    assert info.value.field == "max_in_flight"


@run_async
async def test_a_hung_device_gives_up_its_silent_requests_but_not_streams_already_answering() -> None:
    worker, session = await blocked_worker()  # "blocker" runs and hangs (the gate stays closed)
    stream_session = SlowStream()
    streamer = Worker(stream_session, worker_id="s")
    await streamer.start()
    snapshot = worker.snapshot()
    assert snapshot.oldest_in_flight_s is not None  # how long the stuck batch has been running
    assert snapshot.in_flight == 1
    assert worker.abandon_in_flight("the health check of remote:a failed") == 1
    with pytest.raises(SessionError, match="health check of remote:a failed; retry it elsewhere"):
        await worker._blocker  # type: ignore[attr-defined]
    assert worker.health.healthy  # the check recorded the fault; giving up is not another one
    assert worker.metrics.in_flight == 0
    assert worker.snapshot().oldest_in_flight_s is None

    chunks = streamer.stream(completion("x", stream=True))
    first = await chunks.__anext__()
    assert first.text
    assert streamer.abandon_in_flight("hung") == 0  # the client already holds part of the answer
    await chunks.aclose()
    session.gate.set()
    await asyncio.gather(worker.stop(), streamer.stop())


# -- errors and health ---------------------------------------------------------------------------------


@run_async
async def test_session_errors_reach_every_request_and_mark_the_worker_unhealthy() -> None:
    clock = FakeClock()
    session = FakeSession(max_batch_size=4, fail_next=3)
    health = HealthTracker(failure_threshold=3, cooldown_s=5.0, clock=clock)
    async with Worker(session, health=health) as worker:
        for _ in range(3):
            with pytest.raises(SessionError, match="failed on purpose"):
                await worker.submit(completion("x"))
        assert health.state.value == "unhealthy"
        assert not worker.snapshot().healthy
        clock.advance(5.0)
        assert health.available()  # the probe
        assert (await worker.submit(completion("ok"))).text == "ok"  # type: ignore[union-attr]
        assert health.state is HealthState.HEALTHY
    assert worker.metrics.failed == 3


@run_async
async def test_a_bad_request_fails_alone_not_its_batch() -> None:
    session = Picky(max_batch_size=8)
    worker = Worker(session, worker_id="picky")
    await worker.start()
    prompts = ["good one", "bad", "good two"]
    results = await asyncio.gather(*(worker.submit(completion(p)) for p in prompts), return_exceptions=True)
    await worker.stop()
    assert isinstance(results[1], ConfigError)
    assert [results[0].text, results[2].text] == ["one good", "two good"]  # type: ignore[union-attr]
    assert worker.health.healthy  # a bad request is not the worker's failure


@run_async
async def test_queue_full_and_stopped_workers_reject_with_admission_errors() -> None:
    worker, session = await blocked_worker(queue_capacity=2, high_reserve_fraction=0.0)
    tasks = [asyncio.create_task(worker.submit(completion(f"q{i}"))) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as caught:
        await worker.submit(completion("one too many"))
    assert caught.value.retry_after_s > 0
    assert worker.metrics.rejected == 1
    session.gate.set()
    await asyncio.gather(*tasks)
    await worker.stop()
    with pytest.raises(WorkerStopped):
        await worker.submit(completion("late"))
    fresh = Worker(FakeSession())
    with pytest.raises(WorkerStopped, match="not running"):
        await fresh.submit(completion("early"))
    with pytest.raises(ConfigError, match="stream"):
        await worker.submit(completion("s", stream=True))


# -- cancellation and deadlines ------------------------------------------------------------------------


@pytest.mark.parametrize("event", [CancelSignal, asyncio.Event])  # a plain Event: watched by a task
@run_async
async def test_cancelled_queued_request_is_answered_and_never_computed(event: type[asyncio.Event]) -> None:
    worker, session = await blocked_worker()
    request = completion("gone")
    request.cancelled = event()
    task = asyncio.create_task(worker.submit(request))
    await asyncio.sleep(0)
    request.cancelled.set()
    with pytest.raises(RequestCancelled, match=request.request_id):
        await task
    assert len(worker.queue) == 0
    session.gate.set()
    await worker.stop()
    assert all("gone" not in batch for batch in session.prompts)
    assert worker.metrics.cancelled == 1


@run_async
async def test_caller_cancellation_withdraws_the_request() -> None:
    worker, session = await blocked_worker()
    task = asyncio.create_task(worker.submit(completion("abandoned")))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(worker.queue) == 0
    session.gate.set()
    await worker.stop()
    assert all("abandoned" not in batch for batch in session.prompts)


@run_async
async def test_deadline_passes_while_queued() -> None:
    worker, session = await blocked_worker()
    loop_time = asyncio.get_running_loop().time
    start = loop_time()
    request = completion("slow", deadline_s=worker._clock.monotonic() + 0.05)
    with pytest.raises(DeadlineExceeded) as caught:
        await worker.submit(request)
    assert isinstance(caught.value, asyncio.TimeoutError)
    assert loop_time() - start < 1.0
    assert worker.metrics.expired == 1
    with pytest.raises(DeadlineExceeded):
        await worker.submit(completion("late", deadline_s=0.0))
    session.gate.set()
    await worker.stop()


# -- streaming -----------------------------------------------------------------------------------------


@run_async
async def test_stream_yields_chunks_and_records_tokens() -> None:
    session = FakeSession(max_batch_size=4)
    async with Worker(session) as worker:
        chunks = [c async for c in worker.stream(completion("one two three", stream=True))]
        chat_chunks = [c async for c in worker.stream(chat("hello world", stream=True))]
    assert "".join(c.text for c in chunks) == "three two one"
    assert chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chat_chunks) == "world hello"
    assert worker.metrics.tokens_total == 3 + 1  # chunks with text


@run_async
async def test_a_streams_tokens_count_while_it_runs_not_only_when_it_ends() -> None:
    session = FakeSession(max_batch_size=4)
    async with Worker(session) as worker:
        seen: list[int] = []
        async for chunk in worker.stream(completion("a b c d e f", stream=True)):
            if chunk.text:
                seen.append(worker.metrics.tokens_total)
    assert seen[-1] >= 5  # by the last chunk, the earlier ones were counted already
    assert worker.metrics.tokens_total == 6


class SlowStream(FakeSession):
    def __init__(self) -> None:
        super().__init__(max_batch_size=4)
        self.produced = 0
        self.closed_early = False

    async def stream_generate(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        try:
            for i in range(1000):
                self.produced += 1
                await asyncio.sleep(0.001)
                yield StreamChunk(f" t{i}")
            yield StreamChunk("", "length")
        finally:
            self.closed_early = self.produced < 1000


@run_async
async def test_consumer_that_stops_reading_stops_the_generation() -> None:
    session = SlowStream()
    async with Worker(session) as worker:
        got = []
        stream = worker.stream(completion("x", stream=True))
        async for chunk in stream:
            got.append(chunk)
            if len(got) == 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        assert session.closed_early
        assert session.produced < 100
        assert (await worker.submit(completion("after"))).text == "after"  # type: ignore[union-attr]


@run_async
async def test_stream_failure_before_the_first_chunk_raises_the_session_error() -> None:
    session = FakeSession(fail_next=1)
    async with Worker(session) as worker:
        with pytest.raises(SessionError):
            async for _ in worker.stream(completion("x", stream=True)):
                pass
        with pytest.raises(ConfigError, match="cannot be streamed"):
            async for _ in worker.stream(WorkRequest.embedding(["x"], stream=True)):
                pass


# -- stopping ------------------------------------------------------------------------------------------


@run_async
async def test_stop_with_drain_answers_everything_queued() -> None:
    worker, session = await blocked_worker(max_batch_size=2)
    tasks = [asyncio.create_task(worker.submit(completion(f"d{i}"))) for i in range(5)]
    await asyncio.sleep(0)
    stopping = asyncio.create_task(worker.stop(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(WorkerStopped, match="stopping"):
        await worker.submit(completion("too late"))
    session.gate.set()
    await stopping
    results = await asyncio.gather(*tasks)
    assert [r.text for r in results] == [f"d{i}" for i in range(5)]  # type: ignore[union-attr]
    assert not worker.running


@run_async
async def test_stop_without_drain_fails_queued_requests_clearly() -> None:
    worker, session = await blocked_worker()
    tasks = [asyncio.create_task(worker.submit(completion(f"d{i}"))) for i in range(3)]
    await asyncio.sleep(0)
    stopping = asyncio.create_task(worker.stop(drain=False))
    await asyncio.sleep(0)
    session.gate.set()
    await stopping
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, WorkerStopped) and "another worker" in str(r) for r in results)
    assert (await worker._blocker).text == "blocker"  # type: ignore[attr-defined]  # the running batch finished


@run_async
async def test_stop_timeout_fails_running_work() -> None:
    worker, _ = await blocked_worker(stop_timeout_s=0.05)
    await worker.stop()
    with pytest.raises(WorkerStopped, match="while running"):
        await worker._blocker  # type: ignore[attr-defined]


# -- state ---------------------------------------------------------------------------------------------


@run_async
async def test_snapshot_and_dict_describe_the_worker() -> None:
    session = FakeSession("m", [CPU], service_time_s=0.001, max_batch_size=4)
    worker = Worker(
        session,
        worker_id="cpu-0",
        deployment="chat-main",
        tags=frozenset({"low-latency"}),
        device_state=lambda: {"temperature_c": 55.0},
    )
    async with worker:
        await asyncio.gather(*(worker.submit(completion(f"p {i}")) for i in range(6)))
        snap = worker.snapshot()
    assert isinstance(snap, WorkerSnapshot)
    assert (snap.worker_id, snap.deployment, snap.device) == ("cpu-0", "chat-main", "cpu")
    assert snap.max_batch_size == 4
    assert snap.free_memory_bytes == 8 << 30
    assert snap.temperature_c == 55.0
    assert snap.ema_latency_ms is not None
    assert snap.ema_latency_ms > 0
    assert snap.utilization_pct is not None
    assert 0 <= snap.utilization_pct <= 100
    assert snap.tags == frozenset({"low-latency"})
    assert worker.snapshot().draining  # stopped
    info = worker.to_dict()
    assert info["metrics"]["completed"] == 6
    assert info["batching"]["policy"] == "adaptive"
    assert set(info["metrics"]["queue_depth"]) == {"high", "normal", "low"}


@run_async
async def test_an_operator_drain_hides_the_worker_but_still_serves() -> None:
    async with Worker(FakeSession(max_batch_size=4)) as worker:
        assert not worker.snapshot().draining
        worker.draining = True
        assert worker.snapshot().draining
        assert (await worker.submit(completion("still served"))).text == "served still"  # type: ignore[union-attr]
        worker.draining = False
        assert not worker.snapshot().draining


def test_metrics_windows_and_emas_follow_the_clock() -> None:
    clock = FakeClock()
    metrics = WorkerMetrics(clock, ema_alpha=0.5, window_s=10.0)
    clock.advance(1.0)
    metrics.record_batch_start(4)
    assert metrics.in_flight == 4
    clock.advance(1.0)
    metrics.record_batch_end(4, service_s=1.0, ok=True, started_at_s=1.0)
    assert metrics.ema_service_ms is None  # the first success is cold: left out of the EMA
    metrics.record_request(5.0, queue_wait_s=0.1, tokens=10, started_at_s=1.0)  # started while cold
    for latency in (0.2, 0.4):
        metrics.record_request(latency, queue_wait_s=0.1, tokens=10, started_at_s=2.0)
    assert metrics.ema_latency_ms == pytest.approx(300.0)
    assert metrics.latency_sampled_at_s == 2.0
    assert metrics.tokens_per_s() == pytest.approx(30 / 2.0)  # 2 s since the metrics started
    assert metrics.utilization() == pytest.approx(0.5)
    clock.advance(20.0)
    assert metrics.tokens_per_s() == 0.0
    assert metrics.utilization() == 0.0
    data = metrics.to_dict()
    assert data["batch_size_histogram"] == {"4": 1}
    assert data["latency_ms"]["p50"] == pytest.approx(400.0)  # percentiles keep every sample
    metrics.record_dropped("cancelled")
    metrics.record_dropped("expired")
    metrics.record_dropped("stopped")
    assert (metrics.cancelled, metrics.expired, metrics.failed) == (1, 1, 1)


def test_forgotten_latency_ignores_work_started_before_and_the_next_cold_sample() -> None:
    clock = FakeClock(start_s=10.0)
    metrics = WorkerMetrics(clock)
    for service_s in (0.1, 0.1, 0.1):
        metrics.record_batch_end(0, service_s=service_s, ok=True, started_at_s=clock.monotonic())
    assert metrics.ema_service_ms == pytest.approx(100.0)
    clock.advance(30.0)
    metrics.forget_latency(since_s=35.0)  # the device came back at 35 s
    assert (metrics.ema_service_ms, metrics.ema_latency_ms, metrics.latency_sampled_at_s) == (
        None,
        None,
        None,
    )
    metrics.record_batch_end(0, service_s=25.0, ok=True, started_at_s=15.0)  # stuck through the outage
    metrics.record_request(25.0, 0.0, started_at_s=15.0)
    metrics.record_batch_end(0, service_s=0.5, ok=True, started_at_s=39.5)  # cold after the restart
    metrics.record_batch_end(0, service_s=0.4, ok=True, started_at_s=39.6)  # started while cold too
    assert metrics.ema_service_ms is None
    clock.advance(1.0)
    metrics.record_batch_end(0, service_s=0.12, ok=True, started_at_s=40.5)
    assert metrics.ema_service_ms == pytest.approx(120.0)


@run_async
async def test_a_worker_that_comes_back_forgets_the_latency_of_its_outage() -> None:
    session = FakeSession(service_time_s=0.0, max_batch_size=1)
    async with Worker(session, worker_id="w") as worker:
        for i in range(4):
            await worker.submit(completion(f"p{i}"))
        worker.metrics.ema_service_ms = 4700.0  # what requests stuck through a hang would leave
        assert worker.snapshot().ema_latency_ms is not None
        worker.health.record_check(False, "hung")
        worker.health.record_check(True)
        snapshot = worker.snapshot()
    assert worker.metrics.ema_service_ms is None
    assert snapshot.ema_latency_ms is None  # unknown: the scorer assumes the tier's median


# -- properties ----------------------------------------------------------------------------------------

REQUESTS = st.lists(
    st.tuples(
        st.sampled_from(list(Priority)),
        st.sampled_from([RequestKind.COMPLETION, RequestKind.CHAT, RequestKind.EMBEDDING]),
        st.sampled_from([4, 8]),  # max_tokens
        st.booleans(),  # cancelled right after submission
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=REQUESTS,
    cap=st.integers(1, 8),
    policy=st.sampled_from(["adaptive", "greedy", "fixed_window"]),
    fail_next=st.integers(0, 2),
)
def test_every_request_is_answered_exactly_once_and_batches_stay_within_the_cap(
    requests: list[tuple[Priority, RequestKind, int, bool]], cap: int, policy: str, fail_next: int
) -> None:
    async def scenario() -> None:
        session = FakeSession(service_time_s=0.0005, max_batch_size=8, fail_next=fail_next)
        worker = Worker(session, max_batch_size=cap, batch_policy=policy, max_wait_s=0.002)
        await worker.start()
        made = []
        for i, (priority, kind, max_tokens, _) in enumerate(requests):
            if kind is RequestKind.EMBEDDING:
                made.append(WorkRequest.embedding([f"t{i}"], priority=priority))
            else:
                params = GenerationParams(max_tokens=max_tokens)
                text = f"w{i} x{i}"
                made.append(
                    WorkRequest.completion(text, params, priority=priority)
                    if kind is RequestKind.COMPLETION
                    else WorkRequest.chat([{"role": "user", "content": text}], params, priority=priority)
                )
        tasks = [asyncio.create_task(worker.submit(r)) for r in made]
        await asyncio.sleep(0)
        for request, (*_, cancel) in zip(made, requests, strict=True):
            if cancel:
                request.cancelled.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
        await worker.stop()
        assert len(outcomes) == len(made)
        answered = 0
        for i, (request, outcome) in enumerate(zip(made, outcomes, strict=True)):
            if isinstance(outcome, BaseException):
                assert isinstance(outcome, (RequestCancelled, SessionError)), outcome
                if isinstance(outcome, RequestCancelled):
                    assert request.cancelled.is_set()
                continue
            answered += 1
            if request.kind is RequestKind.EMBEDDING:
                assert isinstance(outcome, list)
                assert len(outcome) == 1
            else:
                assert isinstance(outcome, Completion)
                assert outcome.text == f"x{i} w{i}"  # its own answer, not a batch-mate's
        assert max(session.batch_sizes, default=0) <= max(cap, 1) or any(
            r.kind is RequestKind.EMBEDDING for r in made
        )
        assert all(size <= cap for size in worker.metrics.batch_sizes)
        # Each request was computed at most once (cancelled ones may have run before the cancel).
        assert worker.metrics.completed == answered
        assert sum(s * c for s, c in worker.metrics.batch_sizes.items()) <= len(made)
        assert len(worker.queue) == 0

    asyncio.run(scenario())


@run_async
async def test_snapshot_reports_the_batch_size_the_worker_achieves() -> None:
    session = FakeSession(service_time_s=0.001, max_batch_size=8)
    async with Worker(session, worker_id="w", batch_policy="greedy") as worker:
        assert worker.snapshot().mean_batch_size is None  # nothing run yet: unknown
        await asyncio.gather(*(worker.submit(completion(f"p {i}")) for i in range(3)))
        await worker.submit(completion("alone"))
        snap = worker.snapshot()
    assert snap.mean_batch_size == worker.metrics.mean_batch_size()
    assert snap.mean_batch_size is not None
    assert 1.0 <= snap.mean_batch_size < 8


@run_async
async def test_cancel_signal_calls_back_once_when_set() -> None:
    signal, calls = CancelSignal(), []
    signal.add_callback(lambda: calls.append("a"))
    removed = lambda: calls.append("removed")  # noqa: E731
    signal.add_callback(removed)
    signal.remove_callback(removed)
    signal.remove_callback(removed)  # twice: a no-op
    waiter = asyncio.ensure_future(signal.wait())
    signal.set()
    signal.set()
    await waiter
    assert calls == ["a"]
    assert signal.is_set()


@run_async
async def test_a_snapshot_has_every_field_and_equals_the_constructors() -> None:
    import dataclasses

    async with Worker(Continuous(max_batch_size=4)) as worker:
        snapshot = worker.snapshot()
    names = [f.name for f in dataclasses.fields(WorkerSnapshot)]
    assert sorted(vars(snapshot)) == sorted(names)  # from_fields was given every field
    assert snapshot == WorkerSnapshot(**{name: getattr(snapshot, name) for name in names})
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.in_flight = 3  # type: ignore[misc]


@run_async
async def test_a_finished_request_leaves_no_running_batch_in_the_next_snapshot() -> None:
    # the caller wakes in the loop turn after its answer; the worker must already show nothing running
    # then, or the scorer reads a stuck batch and routes the next request elsewhere
    async with Worker(Continuous(max_batch_size=4)) as worker:
        for _ in range(3):
            await worker.submit(chat("hi"))
            snapshot = worker.snapshot()
            assert (snapshot.in_flight, snapshot.oldest_in_flight_s) == (0, None)
