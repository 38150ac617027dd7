"""The dispatcher: retries on other workers, backoff, tier fallback, timeouts, final errors, streams."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from fake_workers import FakeWorker

from xpuflow.backends.base import Completion, GenerationParams
from xpuflow.clock import FakeClock, SystemClock
from xpuflow.errors import (
    AdmissionRejected,
    CapabilityError,
    ConfigError,
    DispatchError,
    DispatchTimeout,
    RemoteError,
    RoutingError,
    SessionError,
    StreamInterrupted,
    VendorRuntimeError,
)
from xpuflow.policy.worker_scorer import WorkerNeeds, WorkerScorer
from xpuflow.routing.dispatch import Dispatcher, RetryPolicy, is_retryable, service_time_snapshot
from xpuflow.scheduling.health import HealthState
from xpuflow.scheduling.request import WorkRequest
from xpuflow.testing import FakeSession
from xpuflow.types import RoutingDecision, WorkerSnapshot

T = TypeVar("T")
PARAMS = GenerationParams(max_tokens=16)


def run(factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(factory(), timeout=20))  # type: ignore[arg-type]


def request(prompt: str = "one two three four", **kw: Any) -> WorkRequest:
    return WorkRequest.completion(prompt, PARAMS, **kw)


def dispatcher(clock: Any = None, seed: int = 0, **policy: Any) -> Dispatcher:
    # top_k=1: the best-scored worker is tried first, so tests know the order of attempts.
    return Dispatcher(
        scorer=WorkerScorer(top_k=1),
        policy=RetryPolicy(**policy),
        clock=clock or FakeClock(),
        rng=random.Random(seed),
    )


def workers(*names: str, clock: Any = None, **kw: Any) -> list[FakeWorker]:
    # Increasing latency: names[0] scores best, then names[1], ...
    return [FakeWorker(n, clock=clock, ema_latency_ms=10.0 * (i + 1), **kw) for i, n in enumerate(names)]


# -- the happy path --------------------------------------------------------------------------------------


def test_the_decision_has_every_field_equals_the_constructors_and_is_frozen() -> None:
    import dataclasses
    import types

    done = run(lambda: dispatcher().dispatch([("t", workers("a", "b"))], request()))
    decision = done.decision
    names = [f.name for f in dataclasses.fields(RoutingDecision)]
    assert sorted(vars(decision)) == sorted(names)  # from_fields was given every field
    assert decision == RoutingDecision(**{name: getattr(decision, name) for name in names})
    assert isinstance(decision.details, types.MappingProxyType)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.worker = "b"  # type: ignore[misc]


def test_serves_on_the_best_worker_with_an_explained_decision() -> None:
    a, b, c = workers("a", "b", "c")
    c.health.record_failure("x")
    c.health.record_failure("y")
    c.health.record_failure("z")
    done = run(lambda: dispatcher().dispatch([("tier_high", [a, b, c])], request()))
    assert isinstance(done.result, Completion)
    assert done.result.text == "four three two one"
    decision = done.decision
    assert isinstance(decision, RoutingDecision)
    assert (decision.tier, decision.worker, decision.device) == ("tier_high", "a", "cpu")
    assert "a" in decision.reason
    assert 0.0 < decision.confidence <= 1.0
    alternatives = {alt.candidate: alt for alt in decision.alternatives}
    assert alternatives["b"].score is not None
    assert "unhealthy" in alternatives["c"].reason
    assert decision.details["attempts"] == 1
    assert [(x.worker, x.error) for x in done.attempts] == [("a", None)]
    assert (a.calls, b.calls, c.calls) == (1, 0, 0)


def test_tiers_may_be_a_mapping_and_the_tier_decision_is_folded_in() -> None:
    (a,) = workers("a")
    tier = RoutingDecision(device=None, reason="complexity 0.2 below 0.5", confidence=0.9, tier="tier_low")
    done = run(lambda: dispatcher().dispatch({"tier_low": [a]}, request(), tier_decision=tier))
    assert done.decision.tier == "tier_low"
    assert done.decision.reason.startswith("tier tier_low: complexity 0.2 below 0.5; worker a")


def test_embeddings_and_chat_pass_through() -> None:
    (a,) = workers("a")
    vectors = run(lambda: dispatcher().dispatch([("t", [a])], WorkRequest.embedding(["x", "y"])))
    assert isinstance(vectors.result, list)
    assert len(vectors.result) == 2
    chat = WorkRequest.chat([{"role": "user", "content": "hello there"}], PARAMS)
    reply = run(lambda: dispatcher().dispatch([("t", [a])], chat))
    assert isinstance(reply.result, Completion)
    assert reply.result.text == "there hello"


# -- retries and backoff ---------------------------------------------------------------------------------


def test_a_failure_is_retried_on_another_worker_after_a_backoff() -> None:
    clock = FakeClock()
    a, b = workers("a", "b")
    a.error = SessionError("device lost")
    done = run(lambda: dispatcher(clock, backoff_base_s=0.05).dispatch([("t", [a, b])], request()))
    assert done.decision.worker == "b"
    assert [(x.worker, x.error is None) for x in done.attempts] == [("a", False), ("b", True)]
    assert "SessionError: device lost" in (done.attempts[0].error or "")
    assert 0.025 <= done.attempts[1].backoff_s <= 0.05
    assert clock.monotonic() == pytest.approx(done.attempts[1].backoff_s)  # the backoff was slept
    assert "after 1 failed attempt(s)" in done.decision.reason
    failed = [alt for alt in done.decision.alternatives if alt.candidate == "a"]
    assert "device lost" in failed[0].reason
    assert a.health.consecutive_failures == 1  # the worker recorded it; the dispatcher did not again


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(backoff_base_s=0.1, backoff_max_s=0.3)
    rng = random.Random(5)
    for retry, cap in [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.3), (9, 0.3)]:
        values = [policy.backoff_s(retry, rng) for _ in range(200)]
        assert min(values) >= cap * 0.5 - 1e-12
        assert max(values) <= cap + 1e-12
        assert max(values) - min(values) > cap * 0.3  # jittered, not constant


def test_retries_are_bounded_per_tier_then_the_next_tier_serves() -> None:
    clock = FakeClock()
    high = workers("h1", "h2", "h3", "h4")
    for worker in high:
        worker.error = SessionError("boom")
    (low,) = workers("l1")
    d = dispatcher(clock, max_retries=2, backoff_base_s=0.05, backoff_max_s=1.0)
    done = run(lambda: d.dispatch([("tier_high", high), ("tier_low", [low])], request()))
    assert done.decision.tier == "tier_low"
    assert done.decision.worker == "l1"
    assert [x.worker for x in done.attempts] == ["h1", "h2", "h3", "l1"]
    assert high[3].calls == 0  # 1 + max_retries workers per tier
    caps = [0.05, 0.1, 0.2]
    for attempt, cap in zip(done.attempts[1:], caps, strict=True):
        assert cap * 0.5 <= attempt.backoff_s <= cap
    assert clock.monotonic() == pytest.approx(sum(x.backoff_s for x in done.attempts))


def test_max_attempts_bounds_the_whole_request() -> None:
    tiers = [(f"t{i}", workers(f"w{i}a", f"w{i}b")) for i in range(4)]
    for _, ws in tiers:
        for w in ws:
            w.error = SessionError("down")
    d = dispatcher(max_attempts=3)
    with pytest.raises(DispatchError) as info:
        run(lambda: d.dispatch(tiers, request()))
    assert len(info.value.attempts) == 3


def test_every_worker_failing_ends_in_an_error_naming_each_try() -> None:
    a, b = workers("a", "b")
    a.error = SessionError("a is broken")
    b.error = RemoteError("b answered 503", status=503, retryable=True)
    c = FakeWorker("c", max_seq_len=8)
    with pytest.raises(DispatchError) as info:
        run(
            lambda: dispatcher().dispatch(
                [("t1", [a]), ("t2", [b, c])], request(), needs=WorkerNeeds(tokens=100)
            )
        )
    error = info.value
    assert isinstance(error, RoutingError)
    message = str(error)
    assert "t1/a on cpu: SessionError: a is broken" in message
    assert "t2/b on cpu: RemoteError: b answered 503" in message
    assert "t2/c: needs 100 tokens but its max_seq_len is 8" in message
    assert len(error.reasons) == 3
    assert [x.worker for x in error.attempts] == ["a", "b"]
    assert isinstance(error.__cause__, RemoteError)


def test_no_worker_can_take_it_at_all() -> None:
    a = FakeWorker("a", max_seq_len=8)
    with pytest.raises(DispatchError, match=r"no worker can take request .*max_seq_len") as info:
        run(lambda: dispatcher().dispatch([("t", [a])], request(), needs=WorkerNeeds(tokens=100)))
    assert info.value.attempts == ()
    assert a.calls == 0
    with pytest.raises(DispatchError, match="no tier has workers"):
        run(lambda: dispatcher().dispatch([], request()))


def test_panic_a_tier_whose_workers_are_all_unhealthy_is_tried_anyway() -> None:
    a, b = workers("a", "b")
    for worker in (a, b):
        for _ in range(3):
            worker.health.record_failure("down")
    assert not a.health.available()
    done = run(lambda: dispatcher().dispatch([("t", [a, b])], request()))
    assert done.decision.worker == "a"  # the best of the unhealthy ones
    assert "panic: every worker of tier t is unhealthy" in done.decision.reason
    assert a.health.healthy  # its success brings it back at once, not after a cooldown
    assert not b.health.healthy


def test_an_outage_of_every_worker_is_waited_out_with_backoff() -> None:
    clock = FakeClock()
    a, b = workers("a", "b", clock=clock)
    a.session.fail_next = b.session.fail_next = 4  # both answer 500 for a while, then heal
    d = dispatcher(clock=clock, backoff_base_s=0.05, backoff_max_s=1.0)
    done = run(lambda: d.dispatch([("t", [a, b])], request()))
    assert isinstance(done.result, Completion)
    assert len(done.attempts) == 9  # 8 failures over both workers, round after round, then success
    waits = [x.backoff_s for x in done.attempts]
    assert max(waits) <= 1.0
    assert clock.monotonic() < 10.0  # well inside outage_retry_s


def test_an_outage_longer_than_outage_retry_s_fails_with_every_try_named() -> None:
    clock = FakeClock()
    a, b = workers("a", "b", clock=clock)
    a.error = b.error = SessionError("500")
    d = dispatcher(clock=clock, outage_retry_s=3.0, backoff_max_s=1.0)
    with pytest.raises(DispatchError, match="failed on every worker tried") as info:
        run(lambda: d.dispatch([("t", [a, b])], request()))
    assert 3.0 <= clock.monotonic() <= 3.0 + 2 * 1.0  # the round that crossed 3 s ends, no other
    assert len(info.value.attempts) > 4
    no_wait = dispatcher(clock=FakeClock(), outage_retry_s=0.0)
    with pytest.raises(DispatchError) as once:
        run(lambda: no_wait.dispatch([("t", [a, b])], request()))
    assert len(once.value.attempts) == 2  # outage_retry_s 0: one round, as before


def test_an_outage_is_waited_out_while_other_traffic_or_checks_say_the_workers_are_fine() -> None:
    """Under load, another request's success (or a health check of a server whose /health answers
    while its model fails) can leave a worker HEALTHY with no failures between this request's rounds;
    the workers this request just tried still count as failing, so it goes round again."""
    clock = FakeClock()
    a, b = workers("a", "b", clock=clock)
    a.session.fail_next = b.session.fail_next = 3

    for worker in (a, b):
        original = worker._run

        async def run_then_heal(request: WorkRequest, w: FakeWorker = worker, inner: Any = original) -> Any:
            try:
                return await inner(request)
            finally:
                w.health.record_success()  # someone else's request served meanwhile

        worker._run = run_then_heal  # type: ignore[method-assign]
    d = dispatcher(clock=clock, backoff_base_s=0.05, backoff_max_s=1.0)
    done = run(lambda: d.dispatch([("t", [a, b])], request()))
    assert isinstance(done.result, Completion)
    assert len(done.attempts) == 7  # 6 failures over both workers, then success


def test_a_failing_request_on_healthy_peers_is_not_an_outage() -> None:
    a, b, c = workers("a", "b", "c")
    a.error = b.error = SessionError("500")
    d = dispatcher(max_retries=1)  # two tries in the tier; c stays untried and healthy
    with pytest.raises(DispatchError) as info:
        run(lambda: d.dispatch([("t", [a, b, c])], request()))
    assert len(info.value.attempts) == 2


def test_full_queues_everywhere_become_admission_rejected() -> None:
    a, b = workers("a", "b")
    a.reject = b.reject = True
    with pytest.raises(AdmissionRejected, match=r"retry after 0\.5 s") as info:
        run(lambda: dispatcher().dispatch([("t", [a, b])], request()))
    assert info.value.retry_after_s == 0.5
    assert a.health.healthy  # a full queue says nothing about health
    assert b.health.healthy


def test_full_queues_are_load_not_an_outage_and_answer_at_once() -> None:
    clock = FakeClock()
    a, b = workers("a", "b", clock=clock)
    a.reject = b.reject = True
    with pytest.raises(AdmissionRejected):
        run(lambda: dispatcher(clock=clock).dispatch([("t", [a, b])], request()))
    assert clock.monotonic() < 1.0  # not held through outage_retry_s (10 s) of rounds
    assert a.calls == b.calls == 1


def test_a_full_queue_moves_the_request_to_another_worker() -> None:
    a, b = workers("a", "b")
    a.reject = True
    done = run(lambda: dispatcher().dispatch([("t", [a, b])], request()))
    assert done.decision.worker == "b"


# -- non-retryable errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("max_tokens too large", field="max_tokens"),
        RemoteError("server answered 400: bad prompt", status=400, retryable=False),
        CapabilityError("no embeddings here"),
    ],
)
def test_non_retryable_errors_reach_the_client_at_once(error: Exception) -> None:
    a, b = workers("a", "b")
    a.error = error
    with pytest.raises(type(error)) as info:
        run(lambda: dispatcher().dispatch([("t", [a, b]), ("t2", workers("c"))], request()))
    assert info.value is error
    assert b.calls == 0


def test_retryable_classification() -> None:
    class Http(Exception):
        def __init__(self, status: int) -> None:
            super().__init__(f"status {status}")
            self.status = status

    assert is_retryable(SessionError("x"))
    assert is_retryable(RemoteError("x", status=503, retryable=True))
    assert is_retryable(VendorRuntimeError("x", code=3))  # another device may well succeed
    assert is_retryable(AdmissionRejected("full"))
    assert is_retryable(TimeoutError())
    assert is_retryable(RuntimeError("CUDA error: an illegal memory access"))
    assert is_retryable(Http(429))
    assert is_retryable(Http(408))
    assert is_retryable(Http(502))
    assert not is_retryable(Http(404))
    assert not is_retryable(RemoteError("x", status=422, retryable=False))
    assert not is_retryable(ConfigError("bad"))
    assert not is_retryable(ValueError("prompt is empty"))


# -- timeouts and deadlines ------------------------------------------------------------------------------


def test_a_hung_worker_times_out_is_marked_and_the_request_moves_on() -> None:
    a, b = workers("a", "b")
    a.hang = True
    d = dispatcher(SystemClock(), attempt_timeout_s=0.05, backoff_base_s=0.001, backoff_max_s=0.001)
    done = run(lambda: d.dispatch([("t", [a, b])], request()))
    assert done.decision.worker == "b"
    assert "no answer within 0.05 s" in (done.attempts[0].error or "")
    assert a.health.consecutive_failures == 1  # recorded by the dispatcher: a hung worker cannot
    assert a.in_flight == 0  # the abandoned attempt was cancelled, not left running
    assert a.requests[0] is b.requests[0]
    assert not a.requests[0].cancelled.is_set()  # the client is still there


@pytest.mark.parametrize("batching", ["continuous", "native"])
def test_a_local_worker_keeps_the_attempt_limit_itself(
    batching: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local ``Worker`` is handed the attempt's limit (``Worker.submit``'s ``attempt_timeout_s``) instead
    of the dispatcher's timer around its call, on its fast path (a continuous session) and its queue (a
    batching one): a hung attempt ends as before (no answer within the limit, retried elsewhere, the
    worker marked by the dispatcher and not by its own failure count), and the limit is its one timer,
    with none for the request's later deadline."""
    from xpuflow import deadlines
    from xpuflow.backends.base import BatchMode
    from xpuflow.routing import dispatch as dispatch_module
    from xpuflow.scheduling.worker import Worker

    def no_timer_around(*args: Any) -> Any:
        raise AssertionError("the dispatcher wrapped a timer around a local worker's attempt")

    monkeypatch.setattr(dispatch_module, "_within", no_timer_around)

    async def scenario() -> tuple[Any, list[Worker], list[FakeSession], int]:
        sessions = [FakeSession(name, max_batch_size=4) for name in ("a", "b")]
        for session in sessions:
            if batching == "continuous":
                session.batch_mode = BatchMode.CONTINUOUS
        sessions[0].service_time_s = 3600.0  # a hangs
        local = [Worker(session, worker_id=session.model_id, stop_timeout_s=0.2) for session in sessions]
        for worker in local:
            await worker.start()
        try:
            d = dispatcher(SystemClock(), attempt_timeout_s=0.1, backoff_base_s=0.0)
            loop = asyncio.get_running_loop()
            before = deadlines.for_loop(loop).pending()
            work = request(deadline_s=loop.time() + 60)
            call = asyncio.ensure_future(d.dispatch([("t1", [local[0]]), ("t2", [local[1]])], work))
            await asyncio.sleep(0.05)
            armed = deadlines.for_loop(loop).pending() - before  # the 0.1 s limit is the loop's own timer
            return await call, local, sessions, armed
        finally:
            for worker in local:
                await worker.stop(drain=False)

    done, local, sessions, armed = run(scenario)
    assert armed == 0  # no timer for the 60 s deadline beside the attempt's limit
    assert done.decision.worker == "b"
    assert "no answer within 0.1 s" in (done.attempts[0].error or "")
    assert local[0].health.consecutive_failures == 1  # recorded by the dispatcher, as for any target
    assert local[0].metrics.failed == 0
    if batching == "continuous":
        assert sessions[0].active == 0  # the hung call was cancelled, not left running


def test_timeouts_can_be_left_out_of_health() -> None:
    a, b = workers("a", "b")
    a.hang = True
    d = dispatcher(SystemClock(), attempt_timeout_s=0.02, backoff_base_s=0.0, record_timeouts=False)
    run(lambda: d.dispatch([("t", [a, b])], request()))
    assert a.health.consecutive_failures == 0


def test_the_deadline_ends_the_request_with_a_timeout_error() -> None:
    clock = SystemClock()
    a, b = workers("a", "b")
    a.hang = b.hang = True
    d = dispatcher(clock, attempt_timeout_s=10.0, backoff_base_s=0.001, backoff_max_s=0.001)
    req = request(deadline_s=clock.monotonic() + 0.1)
    with pytest.raises(DispatchTimeout, match="passed its deadline") as info:
        run(lambda: d.dispatch([("t", [a, b])], req))
    assert isinstance(info.value, TimeoutError)
    assert len(info.value.attempts) == 1
    # The deadline, not the worker, cut the attempt short: no health penalty.
    assert a.health.consecutive_failures == 0


def test_a_request_past_its_deadline_is_not_sent() -> None:
    clock = FakeClock(start_s=100.0)
    (a,) = workers("a")
    with pytest.raises(DispatchTimeout):
        run(lambda: dispatcher(clock).dispatch([("t", [a])], request(deadline_s=99.0)))
    assert a.calls == 0


def test_the_client_going_away_cancels_the_attempt() -> None:
    (a,) = workers("a")
    a.hang = True
    req = request()

    async def scenario() -> None:
        task = asyncio.ensure_future(
            dispatcher(SystemClock(), attempt_timeout_s=None).dispatch([("t", [a])], req)
        )
        await asyncio.sleep(0.02)
        req.cancelled.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario)
    assert a.calls == 1  # not retried for nobody
    assert a.health.consecutive_failures == 0


def test_cancelling_the_dispatch_task_withdraws_the_attempt() -> None:
    (a,) = workers("a")
    a.hang = True

    async def scenario() -> None:
        task = asyncio.ensure_future(dispatcher(SystemClock()).dispatch([("t", [a])], request()))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario)
    assert a.in_flight == 0


# -- health: probes ----------------------------------------------------------------------------------------


def test_an_unhealthy_worker_gets_one_probe_after_its_cooldown_and_recovers() -> None:
    clock = FakeClock()
    a, b = workers("a", "b", clock=clock, cooldown_s=5.0)
    a.error = SessionError("down")
    d = dispatcher(clock, backoff_base_s=0.0)
    for _ in range(3):
        run(lambda: d.dispatch([("t", [a, b])], request()))
    assert a.health.state is HealthState.UNHEALTHY
    calls = a.calls
    run(lambda: d.dispatch([("t", [a, b])], request()))
    assert a.calls == calls  # skipped during the cooldown
    a.error = None
    clock.advance(5.0)
    done = run(lambda: d.dispatch([("t", [b, a])], request()))
    assert done.decision.worker == "a"  # the probe goes first, whatever its score
    assert done.attempts[0].probe
    assert done.decision.details["probe"] is True
    assert a.health.state is HealthState.HEALTHY


def test_a_failed_probe_restarts_the_cooldown_and_the_request_still_succeeds() -> None:
    clock = FakeClock()
    a, b = workers("a", "b", clock=clock, cooldown_s=5.0, failure_threshold=1)
    a.error = SessionError("down")
    a.health.record_failure("down")
    clock.advance(5.0)
    d = dispatcher(clock, backoff_base_s=0.0)
    done = run(lambda: d.dispatch([("t", [a, b])], request()))
    assert [(x.worker, x.probe) for x in done.attempts] == [("a", True), ("b", False)]
    assert a.health.state is HealthState.UNHEALTHY
    assert not a.health.available()


def test_a_probe_is_not_spent_on_a_worker_that_cannot_take_the_request() -> None:
    clock = FakeClock()
    a = FakeWorker("a", clock=clock, cooldown_s=1.0, failure_threshold=1, max_seq_len=10)
    (b,) = workers("b")
    a.health.record_failure("down")
    clock.advance(2.0)
    run(lambda: dispatcher(clock).dispatch([("t", [a, b])], request(), needs=WorkerNeeds(tokens=100)))
    assert a.health.state is HealthState.UNHEALTHY  # not stuck half-open with no probe in flight
    assert a.health.available()


def test_only_one_probe_per_pick() -> None:
    clock = FakeClock()
    a, b, c = workers("a", "b", "c", clock=clock, cooldown_s=1.0, failure_threshold=1)
    a.health.record_failure("down")
    b.health.record_failure("down")
    clock.advance(2.0)
    done = run(lambda: dispatcher(clock).dispatch([("t", [a, b, c])], request()))
    assert done.attempts[0].probe
    probed = done.decision.worker
    other = b if probed == "a" else a
    assert other.health.state is HealthState.UNHEALTHY  # its probe is still to come


def test_a_probe_refused_for_bad_input_still_shows_the_worker_alive() -> None:
    clock = FakeClock()
    a, b = workers("a", "b", clock=clock, cooldown_s=1.0, failure_threshold=1)
    a.health.record_failure("down")
    a.error = ConfigError("prompt too long", field="prompt")
    clock.advance(1.0)
    with pytest.raises(ConfigError):
        run(lambda: dispatcher(clock).dispatch([("t", [a, b])], request()))
    assert a.health.state is HealthState.HEALTHY
    assert b.calls == 0


def test_a_probe_left_open_by_a_full_queue_is_settled() -> None:
    clock = FakeClock()
    a, b = workers("a", "b", clock=clock, cooldown_s=1.0, failure_threshold=1)
    a.health.record_failure("down")
    a.reject = True
    clock.advance(1.0)
    run(lambda: dispatcher(clock).dispatch([("t", [a, b])], request()))
    assert a.health.state is HealthState.UNHEALTHY


# -- streaming ---------------------------------------------------------------------------------------------


async def collect(d: Dispatcher, tiers: Any, req: WorkRequest) -> tuple[str, Any]:
    stream = await d.open_stream(tiers, req)
    async with stream:
        text = "".join([chunk.text async for chunk in stream])
    return text, stream


def test_stream_serves_all_chunks_with_a_decision_up_front() -> None:
    a, b = workers("a", "b")
    req = request("alpha beta gamma", stream=True)
    text, stream = run(lambda: collect(dispatcher(), [("t", [a, b])], req))
    assert text == "gamma beta alpha"
    assert stream.decision.worker == "a"
    assert stream.chunks_delivered == 4  # three words and the finish chunk


def test_a_stream_failing_before_its_first_chunk_is_retried_invisibly() -> None:
    a, b = workers("a", "b")
    a.session = FakeSession("a", fail_next=1)
    req = request("alpha beta gamma", stream=True)
    text, stream = run(lambda: collect(dispatcher(backoff_base_s=0.0), [("t", [a, b])], req))
    assert text == "gamma beta alpha"
    assert stream.decision.worker == "b"
    assert [x.worker for x in stream.attempts] == ["a", "b"]


def test_a_stream_that_hangs_before_its_first_chunk_is_retried() -> None:
    a, b = workers("a", "b")
    a.hang = True
    req = request("alpha beta", stream=True)
    d = dispatcher(SystemClock(), attempt_timeout_s=0.05, backoff_base_s=0.0)
    text, stream = run(lambda: collect(d, [("t", [a, b])], req))
    assert text == "beta alpha"
    assert stream.decision.worker == "b"


def test_a_stream_failing_after_its_first_chunk_ends_with_stream_interrupted() -> None:
    a, b = workers("a", "b")
    a.stream_fail_after = 2
    req = request("alpha beta gamma delta", stream=True)
    received: list[str] = []

    async def scenario() -> None:
        stream = await dispatcher().open_stream([("t", [a, b])], req)
        async with stream:
            async for chunk in stream:
                received.append(chunk.text)

    with pytest.raises(StreamInterrupted, match=r"t/a on cpu failed after 2 chunk\(s\).*retry") as info:
        run(scenario)
    assert received == ["delta", " gamma"]
    assert info.value.chunks_delivered == 2
    assert info.value.worker == "a"
    assert isinstance(info.value.__cause__, SessionError)
    assert b.calls == 0  # never replayed elsewhere: the client has already seen output


def test_a_stream_stalling_after_its_first_chunk_is_interrupted() -> None:
    (a,) = workers("a")

    async def slow_stream(request: WorkRequest) -> Any:
        yield_first = True
        while True:
            if yield_first:
                yield_first = False
                from xpuflow.backends.base import StreamChunk

                yield StreamChunk("hi")
            else:
                await asyncio.sleep(10)

    a.stream = slow_stream  # type: ignore[method-assign]

    async def scenario() -> list[str]:
        d = dispatcher(SystemClock(), stream_idle_timeout_s=0.05)
        stream = await d.open_stream([("t", [a])], request(stream=True))
        return [chunk.text async for chunk in stream]

    with pytest.raises(StreamInterrupted, match=r"no answer within 0\.05 s"):
        run(scenario)


def test_an_empty_stream_is_not_an_error() -> None:
    (a,) = workers("a")

    async def empty(request: WorkRequest) -> Any:
        return
        yield

    a.stream = empty  # type: ignore[method-assign]
    text, stream = run(lambda: collect(dispatcher(), [("t", [a])], request(stream=True)))
    assert text == ""
    assert stream.chunks_delivered == 0


def test_policy_validation() -> None:
    with pytest.raises(ConfigError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ConfigError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigError, match="backoff"):
        RetryPolicy(backoff_base_s=2.0, backoff_max_s=1.0)
    with pytest.raises(ConfigError, match="attempt_timeout_s"):
        RetryPolicy(attempt_timeout_s=0)


def test_the_scorer_reads_service_time_not_end_to_end_latency() -> None:
    # a queued -> answered latency inflated by a queue that is gone, beside the service time: the
    # scorer takes the service time when a worker reports one, else the latency
    scorer = WorkerScorer()
    fast_service = WorkerSnapshot("a", "d", "cpu", ema_latency_ms=900.0, ema_service_ms=12.0)
    plain = WorkerSnapshot("b", "d", "cpu", ema_latency_ms=100.0)
    assert scorer.latency_ms(fast_service, 50.0, None) == 12.0
    assert scorer.latency_ms(plain, 50.0, None) == 100.0
    ranked = scorer.score([fast_service, plain])
    assert ranked[0].snapshot.worker_id == "a"


def test_service_time_of_a_real_worker() -> None:
    from xpuflow.scheduling.worker import Worker

    async def scenario() -> tuple[float | None, float | None, float | None]:
        session = FakeSession("s", service_time_s=0.02)
        async with Worker(session, worker_id="w", device="cpu") as worker:
            await worker.submit(request())  # cold: left out of the EMAs
            await worker.submit(request())
            return (
                worker.snapshot().ema_latency_ms,
                worker.metrics.ema_service_ms,
                service_time_snapshot(worker).ema_service_ms,
            )

    end_to_end, service, seen = run(scenario)
    assert service is not None
    assert end_to_end is not None
    assert end_to_end >= service  # the end-to-end figure includes the queue wait
    assert seen == service
