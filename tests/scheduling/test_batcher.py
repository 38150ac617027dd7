from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpuflow.backends.base import GenerationParams
from xpuflow.scheduling.batcher import (
    Action,
    ArrivalRate,
    Batcher,
    BatcherConfig,
    BatchPolicy,
    ServiceTimeTable,
    make_batcher,
)
from xpuflow.scheduling.queue import Ticket, make_queue
from xpuflow.scheduling.request import WorkRequest


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def linear(base_s: float, per_item_s: float) -> Callable[[int], float]:
    return lambda b: base_s + per_item_s * b


# -- service times and arrival rate -------------------------------------------------------------------


def test_service_table_fits_a_line_through_the_measurements() -> None:
    table = ServiceTimeTable(ema_alpha=1.0)
    assert table.predict(4) is None
    table.observe(8, 0.24)
    assert table.line == (0.0, pytest.approx(0.03))  # one size seen: no batching gain assumed
    assert table.predict(16) == pytest.approx(0.48)
    table.observe(1, 0.10)
    assert table.line == (pytest.approx(0.08), pytest.approx(0.02))  # through sizes 1 and 8
    assert table.predict(15) == pytest.approx(0.38)
    table.observe(4, 6.4, units=32)  # 0.2 s per unit: above the line, so the line moves up
    fixed, per_request = table.line  # type: ignore[misc]
    assert fixed > 0.08
    assert table.predict(4, units=2) == pytest.approx(2 * (fixed + 4 * per_request))
    assert set(table.to_dict()["measured"]) == {"1", "4", "8"}


def test_service_table_keeps_both_terms_non_negative() -> None:
    falling = ServiceTimeTable(ema_alpha=1.0)
    falling.observe(1, 0.3)
    falling.observe(8, 0.1)  # bigger measured faster: noise, so flat
    assert falling.line == (pytest.approx(0.2), 0.0)
    steep = ServiceTimeTable(ema_alpha=1.0)
    steep.observe(2, 0.1)
    steep.observe(4, 0.4)  # the line would cross below zero: through the origin instead
    fixed, per_request = steep.line  # type: ignore[misc]
    assert fixed == 0.0
    assert per_request > 0


def test_service_table_ema() -> None:
    table = ServiceTimeTable(ema_alpha=0.5)
    table.observe(2, 1.0)
    table.observe(2, 2.0)
    assert table.predict(2) == pytest.approx(1.5)
    table.observe(0, 1.0)  # ignored
    table.observe(2, -1.0)  # ignored
    assert table.predict(2) == pytest.approx(1.5)


def test_arrival_rate_from_the_median_gap_decays_in_silence() -> None:
    rate = ArrivalRate(window=5)
    assert rate.rate_per_s(0) == 0.0
    for t in (0.0, 0.1, 0.2, 0.3):
        rate.observe(t)
    assert rate.rate_per_s(0.3) == pytest.approx(math.log(2) / 0.1)
    assert rate.rate_per_s(1.3) == pytest.approx(1.0)  # capped by 1 / silence
    # A completion at 1.25 restarts the silence: the median-gap estimate is back.
    assert rate.rate_per_s(1.3, active_since_s=1.25) == pytest.approx(math.log(2) / 0.1)
    assert rate.rate_per_s(1.5, active_since_s=1.25) == pytest.approx(4.0)
    # A burst: four arrivals 1 ms apart after a long pause; the next one is expected about 1 ms away.
    burst = ArrivalRate(window=5)
    for t in (0.0, 1.0, 1.001, 1.002, 1.003):
        burst.observe(t)
    assert burst.rate_per_s(1.003) == pytest.approx(math.log(2) / 0.001)
    same = ArrivalRate()
    same.observe(1.0)
    same.observe(1.0)
    assert math.isinf(same.rate_per_s(1.0))


# -- decisions ----------------------------------------------------------------------------------------


def warmed(policy: BatchPolicy = BatchPolicy.ADAPTIVE, **config: float) -> Batcher:
    batcher = make_batcher(policy, BatcherConfig(**config))  # type: ignore[arg-type]
    for b in (1, 8):
        batcher.decide(0, b, 0, outstanding=b)
        batcher.on_dispatch(0, b)
        batcher.on_complete(0, b, 0.1 + 0.01 * b)
    return batcher


def _rate_from_all_gaps(times: list[float], now_s: float) -> float:
    """``ArrivalRate.rate_per_s`` as it was written before it kept its gaps sorted: every gap sorted."""
    if len(times) < 2:
        return 0.0
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    mid = len(gaps) // 2
    median = gaps[mid] if len(gaps) % 2 else (gaps[mid - 1] + gaps[mid]) / 2
    rate = math.inf if median <= 0 else math.log(2) / median
    silence = now_s - times[-1]
    return min(rate, 1.0 / silence) if silence > 0 else rate


@pytest.mark.parametrize("window", [1, 2, 3, 32])
def test_arrival_rate_keeps_its_gaps_sorted_as_they_come_and_go(window: int) -> None:
    rng = random.Random(window)
    arrivals, times, t = ArrivalRate(window), [], 0.0
    for _ in range(3000):
        t += rng.choice([0.0, 0.0, rng.random(), rng.expovariate(3.0)])  # ties and equal gaps too
        arrivals.observe(t)
        times = [*times, t][-window:]
        now_s = t + rng.choice([0.0, rng.random()])
        assert arrivals.rate_per_s(now_s) == _rate_from_all_gaps(times, now_s)


def test_basic_decisions() -> None:
    batcher = warmed(max_batch_size=8)
    assert batcher.decide(1.0, 0, None).action is Action.IDLE
    full = batcher.decide(1.0, 20, 0.5)
    assert (full.action, full.size) == (Action.DISPATCH, 8)
    assert batcher.decide(1.0, 20, 0.5, cap=1).size == 1
    drain = batcher.decide(1.0, 3, 1.0, draining=True)
    assert (drain.action, drain.size) == (Action.DISPATCH, 3)
    batcher.on_dispatch(1.0, 8)
    assert batcher.decide(1.0, 3, 1.0).action is Action.BUSY


def test_no_measurement_or_no_rate_means_dispatch_now() -> None:
    fresh = make_batcher(BatchPolicy.ADAPTIVE, BatcherConfig(max_batch_size=8))
    assert fresh.decide(0.0, 1, 0.0).action is Action.DISPATCH
    batcher = warmed(max_batch_size=8)
    assert batcher.decide(0.0, 1, 0.0).action is Action.DISPATCH  # no arrivals seen yet


def test_greedy_and_fixed_window_policies() -> None:
    greedy = warmed(BatchPolicy.GREEDY, max_batch_size=8)
    assert greedy.decide(1.0, 2, 1.0).size == 2
    fixed = warmed(BatchPolicy.FIXED_WINDOW, max_batch_size=8, max_wait_s=0.05)
    waiting = fixed.decide(1.0, 2, 1.0)
    assert waiting.action is Action.WAIT
    assert waiting.until_s == pytest.approx(1.05)
    assert fixed.decide(1.05, 2, 1.0).action is Action.DISPATCH


def test_adaptive_waits_for_a_burst_but_not_for_a_lone_client() -> None:
    batcher = warmed(max_batch_size=16, max_wait_s=1.0, max_wait_fraction=0.5)
    # Requests arriving every millisecond: a batch of 1 now would make the next ones wait ~110 ms.
    for i in range(20):
        batcher.on_arrival(1.0 + i * 0.001)
    decision = batcher.decide(1.019, 1, 1.019)
    assert decision.action is Action.WAIT
    assert decision.until_s is not None
    assert 1.019 < decision.until_s <= 1.019 + 0.5 * 0.11
    # One request per service time (one client waiting for each answer): never worth waiting.
    lone = warmed(max_batch_size=16, max_wait_s=1.0, max_wait_fraction=0.5)
    for i in range(20):
        lone.on_arrival(i * 0.11)
    assert lone.decide(19 * 0.11, 1, 19 * 0.11).action is Action.DISPATCH


def test_wait_gain_sign() -> None:
    batcher = warmed(max_batch_size=16)
    assert batcher.wait_gain(1, 4, 0.001) > 0  # nearly free to wait, big saving for the four
    assert batcher.wait_gain(1, 1, 0.2) < 0  # waiting longer than a service time never pays


@settings(max_examples=80, deadline=None)
@given(
    base_s=st.floats(0.001, 1.0),
    per_item_s=st.floats(0.0, 0.2),
    gaps=st.lists(st.floats(0.0, 0.5), min_size=2, max_size=40),
    queued=st.integers(1, 40),
    cap=st.integers(1, 32),
    waited=st.floats(0.0, 0.5),
    max_wait_s=st.floats(0.0, 0.2),
    fraction=st.floats(0.0, 1.0),
)
def test_decisions_never_exceed_the_cap_or_the_wait_budget(
    base_s: float,
    per_item_s: float,
    gaps: list[float],
    queued: int,
    cap: int,
    waited: float,
    max_wait_s: float,
    fraction: float,
) -> None:
    batcher = make_batcher(
        BatchPolicy.ADAPTIVE,
        BatcherConfig(max_batch_size=cap, max_wait_s=max_wait_s, max_wait_fraction=fraction),
    )
    service = linear(base_s, per_item_s)
    for b in sorted({1, max(1, cap // 2), cap}):
        batcher.on_dispatch(0.0, b)
        batcher.on_complete(0.0, b, service(b))
    now = 0.0
    for gap in gaps:
        now += gap
        batcher.on_arrival(now)
    oldest = now - waited
    decision = batcher.decide(now, queued, oldest)
    if decision.action is Action.DISPATCH:
        assert 1 <= decision.size <= min(cap, queued)
    else:
        assert decision.action is Action.WAIT
        assert queued < cap
        predicted = batcher.service_times.predict(queued)
        assert predicted is not None
        assert decision.until_s is not None
        budget = min(max_wait_s, fraction * predicted)
        assert now < decision.until_s <= oldest + budget + 1e-9


# -- the batcher driving a queue in simulated time ----------------------------------------------------


@dataclass(order=True)
class _Event:
    time_s: float
    order: int
    kind: str = field(compare=False)
    payload: object = field(compare=False, default=None)


@dataclass
class SimResult:
    batches: list[int]
    latencies: dict[int, float]  # request id -> seconds
    answered: dict[int, int]  # request id -> times answered
    owner: dict[int, int]  # request id -> client


def simulate(
    loop: asyncio.AbstractEventLoop,
    batcher: Batcher,
    service: Callable[[int], float],
    *,
    arrivals: list[float] = (),  # type: ignore[assignment]
    clients: int = 0,
    requests_per_client: int | list[int] = 0,
    think_s: float = 0.0,
) -> SimResult:
    """Discrete-event run of queue + batcher: open-loop ``arrivals`` and/or closed-loop ``clients``;
    client ``c`` sends its first request at ``c * think_s`` and again ``(c + 1) * think_s`` after each
    answer (clients with different round trips)."""
    queue = make_queue(capacity=100_000, aging_s=math.inf)
    events: list[_Event] = []
    seq = 0

    def schedule(time_s: float, kind: str, payload: object = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, _Event(time_s, seq, kind, payload))

    quota = requests_per_client if isinstance(requests_per_client, list) else [requests_per_client] * clients
    next_id = 0
    owner: dict[int, int] = {}
    sent = dict.fromkeys(range(clients), 0)

    def arrive(time_s: float, client: int | None) -> None:
        nonlocal next_id
        request = WorkRequest.completion("x", GenerationParams())
        request.metadata["id"] = next_id
        if client is not None:
            owner[next_id] = client
            sent[client] += 1
        next_id += 1
        queue.push(Ticket(request, time_s, "g", loop.create_future()), time_s)
        batcher.on_arrival(time_s)

    for t in arrivals:
        schedule(t, "arrive")
    for c in range(clients):
        if quota[c]:
            schedule(c * think_s, "client", c)
    result = SimResult([], {}, {}, owner)
    now = 0.0
    in_flight = 0
    timer: float | None = None
    for _ in range(100_000):
        while events and events[0].time_s <= now:
            event = heapq.heappop(events)
            if event.kind == "arrive":
                arrive(event.time_s, None)
            elif event.kind == "client":
                arrive(event.time_s, event.payload)  # type: ignore[arg-type]
            else:
                batch: list[Ticket]
                started: float
                batch, started = event.payload  # type: ignore[misc]
                batcher.on_complete(event.time_s, len(batch), event.time_s - started)
                in_flight -= len(batch)
                for served in batch:
                    rid = served.request.metadata["id"]
                    result.answered[rid] = result.answered.get(rid, 0) + 1
                    result.latencies[rid] = event.time_s - served.enqueued_at_s
                    client = owner.get(rid)
                    if client is not None and sent[client] < quota[client]:
                        schedule(event.time_s + (client + 1) * think_s, "client", client)
        decision = batcher.decide(
            now, queue.group_size("g"), queue.group_oldest_s("g"), outstanding=len(queue) + in_flight
        )
        timer = None
        if decision.action is Action.DISPATCH:
            batch = queue.take_batch(now, decision.size)
            assert 1 <= len(batch) <= batcher.config.max_batch_size
            result.batches.append(len(batch))
            batcher.on_dispatch(now, len(batch))
            in_flight += len(batch)
            schedule(now + service(len(batch)), "done", (batch, now))
            continue
        if decision.action is Action.WAIT:
            assert decision.until_s is not None
            assert decision.until_s > now
            timer = decision.until_s
        if not events and timer is None:
            break
        now = min([e for e in (timer, events[0].time_s if events else None) if e is not None])
    else:
        raise AssertionError("simulation did not finish")
    assert len(queue) == 0
    return result


@settings(max_examples=40, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 0.05), min_size=1, max_size=80),
    cap=st.integers(1, 16),
    policy=st.sampled_from(list(BatchPolicy)),
    base_s=st.floats(0.001, 0.05),
    per_item_s=st.floats(0.0, 0.01),
)
def test_every_request_is_answered_exactly_once_in_batches_within_the_cap(
    loop: asyncio.AbstractEventLoop,
    gaps: list[float],
    cap: int,
    policy: BatchPolicy,
    base_s: float,
    per_item_s: float,
) -> None:
    arrivals, t = [], 0.0
    for gap in gaps:
        t += gap
        arrivals.append(t)
    batcher = make_batcher(policy, BatcherConfig(max_batch_size=cap, max_wait_s=0.02))
    result = simulate(loop, batcher, linear(base_s, per_item_s), arrivals=arrivals)
    assert sorted(result.answered) == list(range(len(arrivals)))
    assert set(result.answered.values()) == {1}
    assert max(result.batches) <= cap
    assert sum(result.batches) == len(arrivals)


@settings(max_examples=30, deadline=None)
@given(base_s=st.floats(0.01, 1.0), per_item_s=st.floats(0.0, 0.1), think_s=st.floats(0.0, 0.01))
def test_a_single_client_never_waits_for_company(
    loop: asyncio.AbstractEventLoop, base_s: float, per_item_s: float, think_s: float
) -> None:
    service = linear(base_s, per_item_s)
    batcher = make_batcher(BatchPolicy.ADAPTIVE, BatcherConfig(max_batch_size=16, max_wait_fraction=0.5))
    result = simulate(loop, batcher, service, clients=1, requests_per_client=30, think_s=think_s)
    assert set(result.batches) == {1}
    assert max(result.latencies.values()) == pytest.approx(service(1))


def test_many_clients_fill_batches_where_greedy_dispatch_ping_pongs(loop: asyncio.AbstractEventLoop) -> None:
    service = linear(0.1, 0.002)  # batching pays: a full batch costs 1.3x a single request
    # Clients send again 0.5 to 8 ms after each answer. Dispatching greedily, the first to come back
    # leaves alone and the rest wait a whole service time: batches of 1 and 15 alternate for ever.
    runs = {
        policy: simulate(
            loop,
            make_batcher(policy, BatcherConfig(max_batch_size=32)),
            service,
            clients=16,
            requests_per_client=20,
            think_s=0.0005,
        )
        for policy in (BatchPolicy.ADAPTIVE, BatchPolicy.GREEDY)
    }
    adaptive, greedy = runs[BatchPolicy.ADAPTIVE], runs[BatchPolicy.GREEDY]
    assert adaptive.batches[2:] == [16] * (len(adaptive.batches) - 2)
    assert set(greedy.batches[2:]) == {1, 15}
    mean = {p: sum(r.latencies.values()) / len(r.latencies) for p, r in runs.items()}
    assert mean[BatchPolicy.ADAPTIVE] < 0.8 * mean[BatchPolicy.GREEDY]


def test_a_client_left_alone_after_a_crowd_stops_waiting_within_a_few_requests(
    loop: asyncio.AbstractEventLoop,
) -> None:
    service = linear(0.1, 0.002)
    history = 3
    batcher = make_batcher(BatchPolicy.ADAPTIVE, BatcherConfig(max_batch_size=32, peak_history=history))
    # Client 0 keeps going after the 15 others have sent their 10 requests each.
    quota = [40] + [10] * 15
    result = simulate(loop, batcher, service, clients=16, requests_per_client=quota, think_s=0.0005)
    alone = [rid for rid, client in sorted(result.owner.items()) if client == 0][12:]
    slow = [rid for rid in alone if result.latencies[rid] > service(1) + 1e-9]
    assert len(slow) <= history + 1
    assert all(result.latencies[rid] <= service(1) * 1.1 + 1e-9 for rid in alone)


def test_low_load_latency_stays_near_unbatched(loop: asyncio.AbstractEventLoop) -> None:
    service = linear(0.05, 0.005)
    arrivals = [i * 0.5 for i in range(40)]  # one request every 10 service times
    result = simulate(
        loop, make_batcher(BatchPolicy.ADAPTIVE, BatcherConfig(max_batch_size=8)), service, arrivals=arrivals
    )
    assert max(result.latencies.values()) <= service(1) * 1.1


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatcherConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_concurrent_batches"):
        BatcherConfig(max_concurrent_batches=0)
    with pytest.raises(ValueError, match="rate_window"):
        BatcherConfig(rate_window=1)
    with pytest.raises(ValueError, match="ema_alpha"):
        BatcherConfig(ema_alpha=0)
    with pytest.raises(ValueError):
        BatcherConfig(max_wait_s=-1)
