"""Timers for deadlines that almost never fire: one event-loop timer for all of them.

A request through the gateway is bounded at several layers (its ``request_timeout_s``, each attempt's
timeout, the worker's deadline, the upstream call's timeout), and each arms a timer that is cancelled a
few milliseconds later when the answer comes. On uvloop a loop timer costs a libuv handle each
(about 2 µs to arm and cancel, plus its close on the next loop turn). Here a deadline is an entry in
a bucket of ``resolution_s``; one loop timer waits for the earliest bucket, and cancelling is a dict
deletion::

    handle = call_later(30.0, on_timeout, request)   # like loop.call_later
    handle.cancel()

The contract:

- The callback runs once, at or after the deadline, and at most ``resolution_s`` (50 ms) after it plus
  the loop's own latency; never before it.
- Delays under ``PRECISE_BELOW_S`` (1 s) go to the loop's own ``call_later``: short timeouts keep their
  precision.
- ``cancel()`` before it runs means it never runs; after, it does nothing. Like ``loop.call_later``, the
  callback runs in the loop, and an exception it raises goes to the loop's exception handler.
- One ``DeadlineTimers`` per event loop (``for_loop``), used from that loop's thread only.
"""

from __future__ import annotations

import asyncio
import heapq
import weakref
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["PRECISE_BELOW_S", "Cancellable", "DeadlineTimers", "call_later", "call_later_on", "for_loop"]

PRECISE_BELOW_S = 1.0
_RESOLUTION_S = 0.05


class Cancellable(Protocol):
    def cancel(self) -> None: ...


def _no_call(*_args: object) -> None:
    return None


class _Bucket(dict):  # type: ignore[type-arg]  # _Deadline -> None, in arrival order
    """The deadlines of one tick, with the timers they belong to (so a deadline holds one reference)."""

    __slots__ = ("owner", "tick")

    def __init__(self, owner: DeadlineTimers, tick: int) -> None:
        super().__init__()
        self.owner = owner
        self.tick = tick


class _Deadline:
    """One pending deadline (what ``call_later`` returns); ``_bucket`` is None once it ran or was
    cancelled."""

    __slots__ = ("_bucket", "args", "callback")

    def __init__(self, bucket: _Bucket, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self._bucket: _Bucket | None = bucket
        self.callback = callback
        self.args = args

    def cancel(self) -> None:
        bucket = self._bucket
        if bucket is None:
            return  # ran or cancelled already
        self._bucket = None
        # what it would have called: let go of it, as asyncio's handles do (its arguments often hold
        # the object that holds this deadline: a reference cycle left to the garbage collector)
        self.callback, self.args = _no_call, ()
        del bucket[self]
        if not bucket:
            bucket.owner._drop(bucket)


class DeadlineTimers:
    """The deadlines of one event loop; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution_s: float = _RESOLUTION_S) -> None:
        if not resolution_s > 0:
            raise ValueError(f"resolution_s must be > 0, got {resolution_s}")
        self._loop = loop
        self._resolution_s = resolution_s
        self._buckets: dict[int, _Bucket] = {}  # tick -> its deadlines
        self._ticks: list[int] = []  # heap of bucket ticks (some may be emptied since: skipped lazily)
        self._armed: asyncio.TimerHandle | None = None
        self._armed_tick: int | None = None

    def call_later(self, delay_s: float, callback: Callable[..., object], *args: Any) -> Cancellable:
        """Run ``callback(*args)`` once ``delay_s`` has passed; returns the handle that cancels it."""
        loop = self._loop
        if delay_s < PRECISE_BELOW_S:
            return loop.call_later(delay_s, callback, *args)
        return self._add(loop.time() + delay_s, callback, args)

    def _add(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]) -> _Deadline:
        # the first bucket boundary at or after the deadline
        tick = int(when / self._resolution_s) + 1
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = _Bucket(self, tick)
            heapq.heappush(self._ticks, tick)
            armed = self._armed_tick
            if armed is None or tick < armed:
                self._arm(tick)
        deadline = _Deadline(bucket, callback, args)
        bucket[deadline] = None
        return deadline

    def pending(self) -> int:
        """Deadlines not yet run nor cancelled (for tests and debugging)."""
        return sum(len(bucket) for bucket in self._buckets.values())

    def _drop(self, bucket: _Bucket) -> None:
        if self._buckets.get(bucket.tick) is bucket:
            del self._buckets[bucket.tick]  # its heap entry is skipped when it comes up

    def _arm(self, tick: int) -> None:
        if self._armed is not None:
            self._armed.cancel()
        self._armed_tick = tick
        self._armed = self._loop.call_at(tick * self._resolution_s, self._fire)

    def _fire(self) -> None:
        self._armed = self._armed_tick = None
        loop = self._loop
        now = loop.time()
        ticks, buckets = self._ticks, self._buckets
        while ticks:
            tick = ticks[0]
            bucket = buckets.get(tick)
            if bucket is None:  # emptied by cancellations
                heapq.heappop(ticks)
                continue
            if tick * self._resolution_s > now:  # not due yet (the loop's clock may round): wait for it
                break
            heapq.heappop(ticks)
            del buckets[tick]
            for deadline in list(bucket):
                if deadline._bucket is None:
                    continue  # cancelled by an earlier callback of this bucket
                deadline._bucket = None
                try:
                    deadline.callback(*deadline.args)
                except Exception as exc:  # as the loop treats a failing callback: report, go on
                    loop.call_exception_handler(
                        {"message": "a deadline callback failed", "exception": exc, "handle": deadline}
                    )
        if ticks:
            self._arm(ticks[0])


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DeadlineTimers] = weakref.WeakKeyDictionary()


def for_loop(loop: asyncio.AbstractEventLoop) -> DeadlineTimers:
    """The ``DeadlineTimers`` of ``loop`` (made at the first call)."""
    timers = _by_loop.get(loop)
    if timers is None:
        timers = _by_loop[loop] = DeadlineTimers(loop)
    return timers


_last: list[Any] = [None, None]  # the loop asked for last and its timers (one loop serves the gateway)


def call_later(delay_s: float, callback: Callable[..., object], *args: Any) -> Cancellable:
    """``DeadlineTimers.call_later`` on the running loop's timers."""
    return call_later_on(asyncio.get_running_loop(), delay_s, callback, *args)


def call_later_on(
    loop: asyncio.AbstractEventLoop, delay_s: float, callback: Callable[..., object], *args: Any
) -> Cancellable:
    """``call_later`` on ``loop``'s timers, for a caller that knows its loop (a task's ``get_loop()``):
    on Python 3.11 every ``asyncio.get_running_loop()`` is a ``getpid`` system call."""
    last = _last
    if last[0] is loop:
        timers: DeadlineTimers = last[1]
    else:
        timers = for_loop(loop)
        last[1] = timers
        last[0] = loop
    if delay_s < PRECISE_BELOW_S:
        return loop.call_later(delay_s, callback, *args)
    return timers._add(loop.time() + delay_s, callback, args)  # DeadlineTimers.call_later's, inline
