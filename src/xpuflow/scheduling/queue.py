"""A worker's bounded request queue: priority lanes with aging, or plain FIFO.

Each queued request is a ``Ticket``: the request, when it was queued, the batch group it may share a
batch with, and the future its caller awaits. The queue orders tickets and answers questions about
them; it never waits and never runs anything, so it is driven by hand in tests::

    queue = make_queue(QueuePolicy.PRIORITY, capacity=64, aging_s=2.0)
    queue.push(Ticket(request, enqueued_at_s=clock.monotonic(), group="chat", future=fut), now_s)
    batch = queue.take_batch(now_s, max_n=8)   # the head, plus compatible tickets in queue order

Order. ``PRIORITY`` keeps one FIFO lane per class (high, normal, low). A ticket's *effective* class is
its class minus one for every ``aging_s`` it has waited, down to high; tickets are served by
(effective class, enqueue time). So a low request competes as normal after ``aging_s`` and as high
after ``2 * aging_s``; from then on no request that arrived after it heads a batch before it does.

Aging bound. A request of class ``c`` reaches the top class after ``c * aging_s``. After that, every
batch dispatched before its own is headed by a request that was ahead of it at that moment (later
arrivals can only ride along in such a batch as compatible companions), so its total queueing delay is
at most ``c * aging_s`` plus the service time of one batch per request that was ahead of it, and there
are never more than ``capacity`` of those. Low priority is delayed, never starved.

Retries. A request whose worker failed is queued again elsewhere with ``waiting_since_s``, when it
first joined a queue: it takes its place by that time (and ages from it), ahead of requests that arrived
after it, instead of waiting a second time at the back.

Admission. The queue holds at most ``capacity`` tickets. Under ``PRIORITY`` the last
``high_reserve_fraction`` of the capacity is kept for high-priority requests, so a queue filled by
bulk traffic still admits urgent work. A full queue raises ``QueueFull`` with ``retry_after_s``.

Cancellation. ``purge`` removes tickets whose ``request.cancelled`` is set or whose deadline passed and
resolves their futures with ``RequestCancelled`` or ``DeadlineExceeded``: nothing leaves the queue
without an answer. ``FIFO`` is the same structure with one lane and no aging (the baseline of the
priority benchmark).
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from xpuflow.errors import DeadlineExceeded, QueueFull, RequestCancelled, XpuflowError
from xpuflow.scheduling.request import Priority, WorkRequest

__all__ = [
    "DeadlineExceeded",
    "QueueFull",
    "QueuePolicy",
    "RequestCancelled",
    "RequestQueue",
    "Ticket",
    "make_queue",
]


class QueuePolicy(str, Enum):
    """How queued requests are ordered."""

    PRIORITY = "priority"  # high, normal, low lanes with aging
    FIFO = "fifo"  # arrival order, priority ignored


class StreamEnd:
    """Marks the end of a ticket's chunk stream."""


STREAM_END = StreamEnd()


@dataclass(eq=False)
class Ticket:
    """One queued request and the means to answer it exactly once.

    ``group`` is the batch group: tickets with equal groups may share a batch. ``future`` resolves to
    the result (or the error); streamed requests also carry ``chunks``, a channel that receives each
    ``StreamChunk``, then either ``STREAM_END`` or the exception that ended the stream.
    """

    request: WorkRequest
    enqueued_at_s: float
    group: Hashable
    future: asyncio.Future[Any]
    chunks: asyncio.Queue[Any] | None = None
    seq: int = 0
    dispatched_at_s: float | None = None
    lane: tuple[int, Hashable] | None = field(default=None, repr=False)
    # When the request first joined a queue, on this clock: earlier than ``enqueued_at_s`` for a request
    # retried after its worker failed, which keeps its place ahead of later arrivals (None: enqueued now).
    waiting_since_s: float | None = None

    @property
    def since_s(self) -> float:
        """What order and aging count from: ``waiting_since_s`` when given, else ``enqueued_at_s``."""
        since = self.waiting_since_s
        return self.enqueued_at_s if since is None or since > self.enqueued_at_s else since

    @property
    def priority(self) -> Priority:
        return self.request.priority

    @property
    def done(self) -> bool:
        return self.future.done()

    def finish(self, result: Any) -> bool:
        """Deliver the result; False (and nothing happens) when the ticket was already answered."""
        if self.future.done():
            return False
        self.future.set_result(result)
        if self.chunks is not None:
            self.chunks.put_nowait(STREAM_END)
        return True

    def fail(self, exc: BaseException) -> bool:
        """Deliver an error; False (and nothing happens) when the ticket was already answered."""
        if self.future.done():
            return False
        self.future.set_exception(exc)
        # The caller may be gone (it withdrew, or timed out); mark the error as seen so asyncio does
        # not log "exception was never retrieved" for an answer nobody waits for.
        self.future.add_done_callback(_consume)
        if self.chunks is not None:
            self.chunks.put_nowait(exc)
        return True


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class RequestQueue:
    """Bounded queue of tickets ordered by effective priority (or arrival, for FIFO). Not thread-safe:
    one event loop owns it."""

    def __init__(
        self,
        capacity: int = 256,
        policy: QueuePolicy = QueuePolicy.PRIORITY,
        aging_s: float = 5.0,
        high_reserve_fraction: float = 0.2,
        name: str = "worker",
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not aging_s > 0:
            raise ValueError(f"aging_s must be > 0 (math.inf turns aging off), got {aging_s}")
        if not 0.0 <= high_reserve_fraction < 1.0:
            raise ValueError(f"high_reserve_fraction must be in [0, 1), got {high_reserve_fraction}")
        self.capacity = capacity
        self.policy = QueuePolicy(policy)
        self.aging_s = aging_s
        self.high_reserve_fraction = high_reserve_fraction
        self.name = name
        #: Requests per second the worker drains, when known; sets ``QueueFull.retry_after_s``.
        self.drain_rate_per_s: float | None = None
        self._lanes: dict[tuple[int, Hashable], OrderedDict[int, Ticket]] = {}
        self._group_sizes: dict[Hashable, int] = {}
        self._class_sizes = [0] * len(Priority)
        self._size = 0
        self._seq = 0

    # -- admission ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    def limit_for(self, priority: Priority) -> int:
        """How many tickets may be queued when a request of ``priority`` asks to join."""
        if self.policy is QueuePolicy.FIFO or priority is Priority.HIGH:
            return self.capacity
        return max(1, math.floor(self.capacity * (1.0 - self.high_reserve_fraction)))

    def retry_after_s(self) -> float:
        """A hint for rejected clients: the time to drain the queue, when the drain rate is known."""
        if self.drain_rate_per_s and self.drain_rate_per_s > 0:
            return max(0.05, self._size / self.drain_rate_per_s)
        return 1.0

    def push(self, ticket: Ticket, now_s: float) -> None:
        """Queue a ticket, or raise ``QueueFull`` when its priority's share of the queue is full."""
        priority = ticket.priority
        limit = self.limit_for(priority)
        if self._size >= limit:
            raise QueueFull(
                f"queue of {self.name} is full ({self._size} queued, {limit} allowed for "
                f"{priority.name.lower()} priority); retry later or on another worker",
                retry_after_s=self.retry_after_s(),
            )
        self._seq += 1
        ticket.seq = self._seq
        lane = (self._lane_index(priority), ticket.group)
        ticket.lane = lane
        tickets = self._lanes.setdefault(lane, OrderedDict())
        if tickets and ticket.since_s < next(reversed(tickets.values())).since_s:
            # a retried request that has waited longer than the lane's last: its place by waiting time
            # (rare, and a lane is at most the queue's capacity, so rebuilding it is cheap)
            ordered = sorted([*tickets.values(), ticket], key=lambda t: (t.since_s, t.seq))
            tickets = self._lanes[lane] = OrderedDict((t.seq, t) for t in ordered)
        else:
            tickets[ticket.seq] = ticket
        self._group_sizes[ticket.group] = self._group_sizes.get(ticket.group, 0) + 1
        self._class_sizes[priority] += 1
        self._size += 1

    def _lane_index(self, priority: Priority) -> int:
        return 0 if self.policy is QueuePolicy.FIFO else int(priority)

    # -- order --------------------------------------------------------------------------------------

    def effective_class(self, ticket: Ticket, now_s: float) -> int:
        """The class a ticket competes in now: its lane, one better per ``aging_s`` waited."""
        lane = self._lane_index(ticket.priority)
        if lane == 0 or math.isinf(self.aging_s):
            return lane
        waited = max(0.0, now_s - ticket.since_s)
        return max(0, lane - math.floor(waited / self.aging_s))

    def order_key(self, ticket: Ticket, now_s: float) -> tuple[int, float, int]:
        """Smaller is served first."""
        return (self.effective_class(ticket, now_s), ticket.since_s, ticket.seq)

    def head(self, now_s: float) -> Ticket | None:
        """The ticket served next. Within a lane the oldest ticket is also the most aged, so only lane
        heads compete."""
        lanes = self._lanes
        if len(lanes) == 1:  # nothing to compare (the common case: one priority, one batch group)
            for lane in lanes.values():
                return next(iter(lane.values()))
        best: Ticket | None = None
        best_key: tuple[int, float, int] | None = None
        for lane in lanes.values():
            first = next(iter(lane.values()))
            key = self.order_key(first, now_s)
            if best_key is None or key < best_key:
                best, best_key = first, key
        return best

    def group_size(self, group: Hashable) -> int:
        return self._group_sizes.get(group, 0)

    def group_oldest_s(self, group: Hashable) -> float | None:
        """When the longest-waiting ticket of ``group`` was queued."""
        oldest: float | None = None
        for (_, lane_group), lane in self._lanes.items():
            if lane_group == group:
                first = next(iter(lane.values())).since_s
                oldest = first if oldest is None else min(oldest, first)
        return oldest

    def take_batch(self, now_s: float, max_n: int, group: Hashable | None = None) -> list[Ticket]:
        """Remove and return up to ``max_n`` tickets of one group in queue order. Without ``group``, the
        head's group: the batch then starts with the head."""
        if max_n < 1 or not self._size:
            return []
        if group is None:
            head = self.head(now_s)
            assert head is not None
            group = head.group
        candidates: list[Ticket] = []
        for (_, lane_group), lane in self._lanes.items():
            if lane_group == group:
                # Each lane is already in queue order, so the best max_n overall are among the first
                # max_n of each lane.
                for i, ticket in enumerate(lane.values()):
                    if i >= max_n:
                        break
                    candidates.append(ticket)
        if len(candidates) > 1:
            candidates.sort(key=lambda t: self.order_key(t, now_s))
        chosen = candidates[:max_n]
        for ticket in chosen:
            self._unlink(ticket)
        return chosen

    # -- removal ------------------------------------------------------------------------------------

    def _unlink(self, ticket: Ticket) -> None:
        assert ticket.lane is not None
        lane = self._lanes[ticket.lane]
        del lane[ticket.seq]
        if not lane:
            del self._lanes[ticket.lane]
        ticket.lane = None
        remaining = self._group_sizes[ticket.group] - 1
        if remaining:
            self._group_sizes[ticket.group] = remaining
        else:
            del self._group_sizes[ticket.group]
        self._class_sizes[ticket.priority] -= 1
        self._size -= 1

    def remove(self, ticket: Ticket) -> bool:
        """Take a ticket out without answering it; False when it is not queued (any more)."""
        lane = None if ticket.lane is None else self._lanes.get(ticket.lane)
        if lane is None or lane.get(ticket.seq) is not ticket:
            return False
        self._unlink(ticket)
        return True

    def purge(self, now_s: float) -> list[Ticket]:
        """Remove cancelled and expired tickets, failing each with the reason; returns them."""
        gone: list[Ticket] = []
        for ticket in list(self):
            request = ticket.request
            if request.cancelled.is_set():
                error: XpuflowError = RequestCancelled(
                    f"request {request.request_id} was cancelled by its client while queued on {self.name}"
                )
            elif request.deadline_s is not None and now_s >= request.deadline_s:
                error = DeadlineExceeded(
                    f"request {request.request_id} waited past its deadline in the queue of {self.name}; "
                    "raise its timeout or send it to a less loaded worker"
                )
            else:
                continue
            self._unlink(ticket)
            ticket.fail(error)
            gone.append(ticket)
        return gone

    def clear(self, make_error: Callable[[Ticket], BaseException]) -> list[Ticket]:
        """Remove every ticket, failing each with ``make_error(ticket)``; returns them."""
        gone = list(self)
        for ticket in gone:
            self._unlink(ticket)
            ticket.fail(make_error(ticket))
        return gone

    # -- inspection ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Ticket]:
        """Every queued ticket, lane by lane (not in service order)."""
        for lane in list(self._lanes.values()):
            yield from list(lane.values())

    def depth_by_priority(self) -> dict[Priority, int]:
        return {p: self._class_sizes[p] for p in Priority}

    def aging_bound_s(self, priority: Priority) -> float:
        """How long a request of ``priority`` waits at most before it competes as high priority."""
        return self._lane_index(priority) * self.aging_s


def make_queue(
    policy: QueuePolicy | str = QueuePolicy.PRIORITY,
    *,
    capacity: int = 256,
    aging_s: float = 5.0,
    high_reserve_fraction: float = 0.2,
    name: str = "worker",
) -> RequestQueue:
    """The queue for ``policy``: ``priority`` (lanes with aging and a high-priority reserve) or ``fifo``."""
    chosen = QueuePolicy(policy)
    if chosen is QueuePolicy.FIFO:
        return RequestQueue(capacity, chosen, math.inf, 0.0, name)
    return RequestQueue(capacity, chosen, aging_s, high_reserve_fraction, name)
