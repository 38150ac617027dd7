"""xpuflow.deadlines: one loop timer for many far deadlines, none run early, none run after cancel()."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from xpuflow import deadlines
from xpuflow.deadlines import DeadlineTimers


class Clock:
    """A loop stand-in with a settable clock: records what it was asked to schedule."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Any]] = []
        self.errors: list[dict[str, Any]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> Any:
        loop = self

        class Handle:
            def cancel(self) -> None:
                loop.timers.remove(entry)

        entry = (when, callback)
        self.timers.append(entry)
        return Handle()

    def call_later(self, delay: float, callback: Any, *args: Any) -> str:
        return f"precise {delay}"

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    def run_until(self, when: float) -> None:
        """Advance the clock, running each armed timer that comes due."""
        while self.timers and min(t for t, _ in self.timers) <= when:
            entry = min(self.timers, key=lambda t: t[0])
            self.timers.remove(entry)
            self.now = max(self.now, entry[0])
            entry[1]()
        self.now = when


def timers() -> tuple[Clock, DeadlineTimers]:
    clock = Clock()
    return clock, DeadlineTimers(clock, resolution_s=0.05)  # type: ignore[arg-type]


def test_a_deadline_runs_once_not_before_its_time_and_at_most_a_resolution_after() -> None:
    clock, wheel = timers()
    ran: list[float] = []
    wheel.call_later(2.0, lambda: ran.append(clock.now))
    clock.run_until(101.99)
    assert ran == []
    clock.run_until(103.0)
    assert len(ran) == 1
    assert 102.0 <= ran[0] <= 102.05 + 1e-9
    assert wheel.pending() == 0


def test_one_loop_timer_waits_for_the_earliest_bucket_of_many() -> None:
    clock, wheel = timers()
    ran: list[str] = []
    for i in range(100):
        wheel.call_later(5.0, ran.append, f"late {i}")
    wheel.call_later(2.0, ran.append, "early")
    assert len(clock.timers) == 1  # one loop timer, armed for the earliest
    clock.run_until(103.0)
    assert ran == ["early"]
    clock.run_until(106.0)
    assert ran == ["early"] + [f"late {i}" for i in range(100)]  # in the order they were set


def test_cancelled_deadlines_never_run_and_free_their_bucket() -> None:
    clock, wheel = timers()
    ran: list[str] = []
    handles = [wheel.call_later(2.0 + i * 0.01, ran.append, str(i)) for i in range(10)]
    for handle in handles[:9]:
        handle.cancel()
    handles[0].cancel()  # twice: nothing
    assert wheel.pending() == 1
    clock.run_until(110.0)
    assert ran == ["9"]
    handles[9].cancel()  # after it ran: nothing
    assert wheel.pending() == 0
    assert clock.timers == []  # nothing left armed


def test_a_cancelled_deadline_lets_go_of_its_callback_and_arguments() -> None:
    """As asyncio's handles do: an owner that keeps its deadline and is among its arguments would
    otherwise make a reference cycle for the garbage collector."""
    import weakref

    class Owner:
        def on_deadline(self) -> None:
            raise AssertionError("cancelled: never runs")

    clock, wheel = timers()
    owner = Owner()
    handle = wheel.call_later(2.0, owner.on_deadline)
    gone = weakref.ref(owner)
    del owner
    assert gone() is not None  # the pending deadline keeps it
    handle.cancel()
    assert gone() is None
    clock.run_until(110.0)


def test_a_callback_can_cancel_another_of_its_bucket() -> None:
    clock, wheel = timers()
    ran: list[str] = []
    second: list[Any] = []
    wheel.call_later(2.0, lambda: (ran.append("first"), second[0].cancel()))
    second.append(wheel.call_later(2.0, ran.append, "second"))
    clock.run_until(103.0)
    assert ran == ["first"]


def test_a_failing_callback_goes_to_the_loops_handler_and_the_rest_still_run() -> None:
    clock, wheel = timers()
    ran: list[str] = []
    wheel.call_later(2.0, lambda: 1 / 0)
    wheel.call_later(2.0, ran.append, "after")
    clock.run_until(103.0)
    assert ran == ["after"]
    assert isinstance(clock.errors[0]["exception"], ZeroDivisionError)


def test_short_delays_keep_the_loops_own_precise_timer() -> None:
    _, wheel = timers()
    assert wheel.call_later(0.2, print) == "precise 0.2"


def test_on_a_real_loop_it_fires_and_cancels() -> None:
    async def go() -> list[str]:
        ran: list[str] = []
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadlines.call_later(1.0, ran.append, "fired")
        deadlines.call_later(1.0, ran.append, "cancelled").cancel()
        await asyncio.sleep(1.2)
        assert loop.time() - start >= 1.0
        assert deadlines.for_loop(loop) is deadlines.for_loop(loop)
        return ran

    assert asyncio.run(go()) == ["fired"]


def test_resolution_must_be_positive() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="resolution_s"):
            DeadlineTimers(loop, resolution_s=0)
    finally:
        loop.close()
