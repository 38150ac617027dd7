"""``LightEvent``: an ``asyncio.Event`` for events made per request and almost never waited on.

``asyncio.Event``'s ``__init__`` makes a deque of waiters and its methods are the same Python calls as
these; an event that is set or checked a few times per request, and waited on rarely, pays for the
deque every time. ``LightEvent`` keeps the same state (``_value``, ``_waiters``) and answers
``set``/``clear``/``is_set``/``wait`` exactly as ``asyncio.Event`` does, with the waiters' list made by
the first ``wait``. It finds the running loop only then (``asyncio.Event`` binds the loop at its first
wait as well). Used from one event loop's thread, as ``asyncio.Event`` is.
"""

from __future__ import annotations

import asyncio

__all__ = ["LightEvent"]


class LightEvent(asyncio.Event):
    """``asyncio.Event``, lighter to make; see the module docstring."""

    def __init__(self) -> None:  # asyncio.Event's state; the waiters' list is made by the first wait
        self._value = False
        self._waiters: list[asyncio.Future[bool]] | None = None  # type: ignore[assignment]

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:  # type: ignore[override]
        if self._value:
            return True
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = []
        waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            waiters.remove(waiter)
