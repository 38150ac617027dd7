from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpuflow.backends.base import GenerationParams
from xpuflow.errors import AdmissionRejected, DeadlineExceeded, QueueFull, RequestCancelled
from xpuflow.scheduling.queue import QueuePolicy, RequestQueue, Ticket, make_queue
from xpuflow.scheduling.request import Priority, WorkRequest

PRIORITIES = st.sampled_from(list(Priority))


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    # Tickets carry futures; resolving them needs a loop but not a running one.
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def ticket(
    loop: asyncio.AbstractEventLoop,
    now_s: float,
    priority: Priority = Priority.NORMAL,
    group: object = "g",
    deadline_s: float | None = None,
) -> Ticket:
    request = WorkRequest.completion("hi", GenerationParams(), priority=priority, deadline_s=deadline_s)
    return Ticket(request, enqueued_at_s=now_s, group=group, future=loop.create_future())


def test_priority_order_and_fifo_within_a_class(loop: asyncio.AbstractEventLoop) -> None:
    queue = make_queue(QueuePolicy.PRIORITY, capacity=10, aging_s=math.inf)
    low, normal, high1, high2 = (
        ticket(loop, 0, Priority.LOW),
        ticket(loop, 0, Priority.NORMAL),
        ticket(loop, 0, Priority.HIGH),
        ticket(loop, 0, Priority.HIGH),
    )
    for t in (low, normal, high1, high2):
        queue.push(t, 0)
    assert [queue.take_batch(0, 1)[0] for _ in range(4)] == [high1, high2, normal, low]
    assert len(queue) == 0
    assert queue.head(0) is None


def test_aging_promotes_one_class_per_aging_period(loop: asyncio.AbstractEventLoop) -> None:
    queue = make_queue(QueuePolicy.PRIORITY, capacity=10, aging_s=2.0)
    low = ticket(loop, 0, Priority.LOW)
    queue.push(low, 0)
    assert queue.effective_class(low, 1.9) == Priority.LOW
    assert queue.effective_class(low, 2.0) == Priority.NORMAL
    assert queue.effective_class(low, 4.0) == Priority.HIGH
    assert queue.aging_bound_s(Priority.LOW) == 4.0
    # A fresh high request arrives at t=5: the low one has aged to high and is older, so it goes first.
    high = ticket(loop, 5, Priority.HIGH)
    queue.push(high, 5)
    assert queue.head(5) is low
    # Before it aged, the fresh high request would have gone first.
    assert queue.order_key(high, 1) < queue.order_key(low, 1)


def test_fifo_policy_ignores_priority(loop: asyncio.AbstractEventLoop) -> None:
    queue = make_queue(QueuePolicy.FIFO, capacity=4)
    order = [ticket(loop, i, p) for i, p in enumerate([Priority.LOW, Priority.HIGH, Priority.NORMAL])]
    for i, t in enumerate(order):
        queue.push(t, i)
    assert queue.take_batch(10, 3) == order
    assert queue.limit_for(Priority.LOW) == queue.limit_for(Priority.HIGH) == 4


def test_take_batch_takes_only_the_heads_group(loop: asyncio.AbstractEventLoop) -> None:
    queue = make_queue(capacity=10, aging_s=math.inf)
    a1, b1, a2, b2, a3 = (
        ticket(loop, 0, Priority.NORMAL, "a"),
        ticket(loop, 0, Priority.HIGH, "b"),
        ticket(loop, 0, Priority.LOW, "a"),
        ticket(loop, 0, Priority.NORMAL, "b"),
        ticket(loop, 0, Priority.HIGH, "a"),
    )
    for t in (a1, b1, a2, b2, a3):
        queue.push(t, 0)
    assert queue.group_size("a") == 3
    # Head is b1 (high, earliest); its batch takes group b only.
    assert queue.take_batch(0, 8) == [b1, b2]
    assert queue.take_batch(0, 2) == [a3, a1]
    assert queue.take_batch(0, 2, group="a") == [a2]
    assert queue.take_batch(0, 2) == []


def test_full_queue_rejects_with_retry_after_and_keeps_room_for_high(loop: asyncio.AbstractEventLoop) -> None:
    queue = make_queue(capacity=10, high_reserve_fraction=0.2, name="w0")
    for _ in range(8):
        queue.push(ticket(loop, 0, Priority.LOW), 0)
    with pytest.raises(QueueFull) as caught:
        queue.push(ticket(loop, 0, Priority.NORMAL), 0)
    assert isinstance(caught.value, AdmissionRejected)
    assert "w0" in str(caught.value)
    assert caught.value.retry_after_s == 1.0  # drain rate unknown
    queue.push(ticket(loop, 0, Priority.HIGH), 0)
    queue.push(ticket(loop, 0, Priority.HIGH), 0)
    queue.drain_rate_per_s = 20.0
    with pytest.raises(QueueFull) as caught:
        queue.push(ticket(loop, 0, Priority.HIGH), 0)
    assert caught.value.retry_after_s == pytest.approx(10 / 20.0)


def test_purge_answers_cancelled_and_expired_requests(loop: asyncio.AbstractEventLoop) -> None:
    queue = make_queue(capacity=10)
    keep = ticket(loop, 0)
    cancelled = ticket(loop, 0)
    expired = ticket(loop, 0, deadline_s=5.0)
    for t in (keep, cancelled, expired):
        queue.push(t, 0)
    cancelled.request.cancelled.set()
    assert queue.purge(1.0) == [cancelled]
    assert isinstance(cancelled.future.exception(), RequestCancelled)
    assert queue.purge(5.0) == [expired]
    error = expired.future.exception()
    assert isinstance(error, DeadlineExceeded)
    assert isinstance(error, TimeoutError)
    assert list(queue) == [keep]
    assert not keep.done


def test_ticket_is_answered_once(loop: asyncio.AbstractEventLoop) -> None:
    t = ticket(loop, 0)
    assert t.finish("first")
    assert not t.finish("second")
    assert not t.fail(RuntimeError("late"))
    assert t.future.result() == "first"


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        RequestQueue(capacity=0)
    with pytest.raises(ValueError, match="aging_s"):
        RequestQueue(aging_s=0)
    with pytest.raises(ValueError, match="high_reserve_fraction"):
        RequestQueue(high_reserve_fraction=1.0)


# -- properties ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(priorities=st.lists(PRIORITIES, min_size=1, max_size=40))
def test_without_aging_service_order_is_priority_then_arrival(
    loop: asyncio.AbstractEventLoop, priorities: list[Priority]
) -> None:
    queue = make_queue(capacity=100, aging_s=math.inf)
    tickets = [ticket(loop, float(i), p) for i, p in enumerate(priorities)]
    for i, t in enumerate(tickets):
        queue.push(t, float(i))
    served = []
    while len(queue):
        served.extend(queue.take_batch(100.0, 3))
    assert served == sorted(tickets, key=lambda t: (t.priority, t.enqueued_at_s))


# One operation of a random schedule: an arrival (priority, group), a batch taken (size), a cancel
# of a queued ticket, or time passing.
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("push"), PRIORITIES, st.sampled_from(["a", "b"])),
        st.tuples(st.just("take"), st.integers(1, 4)),
        st.tuples(st.just("cancel"), st.integers(0, 1000)),
        st.tuples(st.just("remove"), st.integers(0, 1000)),
        st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
    ),
    max_size=80,
)


@settings(max_examples=80, deadline=None)
@given(ops=OPS, aging_s=st.sampled_from([0.5, 1.0, 2.0]), policy=st.sampled_from(list(QueuePolicy)))
def test_no_request_is_lost_or_served_twice_and_aged_requests_are_never_overtaken(
    loop: asyncio.AbstractEventLoop, ops: list[tuple[object, ...]], aging_s: float, policy: QueuePolicy
) -> None:
    queue = make_queue(policy, capacity=12, aging_s=aging_s)
    now = 0.0
    pushed: list[Ticket] = []
    taken: list[Ticket] = []
    removed: list[Ticket] = []
    for op in ops:
        kind = op[0]
        if kind == "push":
            t = ticket(loop, now, op[1], op[2])  # type: ignore[arg-type]
            try:
                queue.push(t, now)
            except QueueFull:
                assert len(queue) >= queue.limit_for(t.priority)
                continue
            pushed.append(t)
        elif kind == "take":
            queued_before = list(queue)
            batch = queue.take_batch(now, op[1])  # type: ignore[arg-type]
            assert len(batch) <= op[1]  # type: ignore[operator]
            assert len({t.group for t in batch}) <= 1
            if batch:
                keys = {id(t): queue.order_key(t, now) for t in queued_before}
                # The batch starts with the head of the whole queue (so a request that reached the top
                # class is never overtaken by a later arrival heading a batch) ...
                assert keys[id(batch[0])] == min(keys.values())
                # ... and takes the best of its group.
                for waiting in queue:
                    if waiting.group == batch[0].group:
                        assert max(keys[id(t)] for t in batch) < keys[id(waiting)]
            taken.extend(batch)
        elif kind in ("cancel", "remove"):
            queued = list(queue)
            if queued:
                victim = queued[op[1] % len(queued)]  # type: ignore[operator]
                if kind == "cancel":
                    victim.request.cancelled.set()
                    assert queue.purge(now) == [victim]
                else:
                    assert queue.remove(victim)
                    assert not queue.remove(victim)
                    removed.append(victim)
        else:
            now += op[1]  # type: ignore[operator]
    still = list(queue)
    failed = [t for t in pushed if t.done and t.future.exception() is not None]
    ids = [id(t) for t in taken + removed + still + failed]
    assert len(ids) == len(set(ids)), "a ticket ended in two places"
    assert sorted(ids) == sorted(id(t) for t in pushed), "a ticket was lost"
    assert len(queue) == len(still) == sum(queue.depth_by_priority().values())
    for group in ("a", "b"):
        assert queue.group_size(group) == sum(1 for t in still if t.group == group)


@settings(max_examples=40, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.floats(0.0, 0.3), PRIORITIES), min_size=1, max_size=60),
    batch=st.integers(1, 4),
)
def test_aging_bound_holds_under_overload(
    loop: asyncio.AbstractEventLoop, arrivals: list[tuple[float, Priority]], batch: int
) -> None:
    """Arrivals faster than service: every served request waited at most class * aging_s plus one
    service time per request ahead of it (at most the capacity), as the module documents."""
    aging_s, service_s, capacity = 1.0, 0.5, 16
    queue = make_queue(capacity=capacity, aging_s=aging_s)
    pending = []
    t = 0.0
    for gap, priority in arrivals:
        t += gap
        pending.append((t, priority))
    now = 0.0
    waits: list[tuple[Ticket, float]] = []
    while pending or len(queue):
        while pending and pending[0][0] <= now:
            at, priority = pending.pop(0)
            with contextlib.suppress(QueueFull):
                queue.push(ticket(loop, at, priority), at)
        for served in queue.take_batch(now, batch):
            waits.append((served, now - served.enqueued_at_s))
        now += service_s
    for served, wait in waits:
        bound = queue.aging_bound_s(served.priority) + (capacity + 1) * service_s
        assert wait <= bound + 1e-9


def test_a_retried_ticket_keeps_its_place_by_first_queueing(loop: asyncio.AbstractEventLoop) -> None:
    # A request whose worker failed is queued again elsewhere: it waited since t=1, so it goes ahead
    # of the tickets that joined this queue at t=2..4, and behind the one queued at t=0.
    queue = make_queue(QueuePolicy.PRIORITY, capacity=10, aging_s=math.inf)
    early = ticket(loop, 0)
    later = [ticket(loop, t) for t in (2, 3, 4)]
    for t in [early, *later]:
        queue.push(t, t.enqueued_at_s)
    retried = ticket(loop, 5)
    retried.waiting_since_s = 1.0
    queue.push(retried, 5)
    assert [queue.take_batch(5, 1)[0] for _ in range(5)] == [early, retried, *later]


def test_waiting_since_ages_a_retried_low_ticket(loop: asyncio.AbstractEventLoop) -> None:
    queue = make_queue(QueuePolicy.PRIORITY, capacity=10, aging_s=2.0)
    normal = ticket(loop, 9, Priority.NORMAL)
    retried = ticket(loop, 9, Priority.LOW)
    retried.waiting_since_s = 5.0  # has waited 4 s: two aging steps, low -> high
    queue.push(normal, 9)
    queue.push(retried, 9)
    assert queue.effective_class(retried, 9) == 0
    assert queue.head(9) is retried
    # a waiting time in the future of the enqueue time is ignored (a clock skew over the wire)
    skewed = ticket(loop, 9)
    skewed.waiting_since_s = 12.0
    assert skewed.since_s == 9
