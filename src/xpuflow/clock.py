"""Injectable time.

Everything that waits or measures takes a ``Clock`` so tests and the simulator drive time by hand::

    clock = FakeClock()
    clock.advance(1.5)
    assert clock.monotonic() == 1.5
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "FakeClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Monotonic time for intervals, wall time for timestamps, and an async sleep."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock. ``monotonic`` and ``time`` are the ``time`` module's own functions, not methods
    that call them: the gateway reads the clock about 24 times per request."""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that moves only when told. ``sleep`` advances it instead of waiting."""

    def __init__(self, start_s: float = 0.0, wall_offset_s: float = 1_700_000_000.0) -> None:
        self._now = start_s
        self._wall_offset = wall_offset_s

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards; pass seconds >= 0")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
