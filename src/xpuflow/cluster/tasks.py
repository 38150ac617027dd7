"""Task helpers of the cluster layer: stopping background loops for sure, and starting a thing once.

Python 3.10 and 3.11's ``asyncio.wait_for`` returns the inner result and drops a cancellation that
arrives in the same loop turn as that result (fixed in 3.12). The cluster's pollers wait on Ray calls
with ``wait_for``; when a Ray answer lands just as the gateway stops, one ``cancel()`` is lost and the
poller runs on, so ``stop`` hung until its caller's timeout. ``cancel_and_wait`` cancels again until
the task has ended::

    await cancel_and_wait(self._poller)

``Once`` runs a start-up coroutine (a worker's build, a channel's listener) for the first caller and
shares it with every caller that waits meanwhile; a failed start is forgotten, so the next call tries
again::

    self._server = Once(lambda: ChannelServer.start(handler, host=ip, token=token))
    server = await self._server()         # started by the first call, shared after
    self._server.value                    # None until started
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["Once", "cancel_and_wait"]

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[Any], timeout_s: float = 10.0) -> None:
    """Cancel ``task`` (again, if a cancellation was swallowed) until it ends or ``timeout_s`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
    if task.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()


class Once(Generic[T]):
    """The result of ``start()``, run once for all callers (see the module docstring)."""

    def __init__(self, start: Callable[[], Awaitable[T]]) -> None:
        self._start = start
        self._task: asyncio.Future[T] | None = None
        self.value: T | None = None

    async def __call__(self) -> T:
        if self.value is not None:
            return self.value
        if self._task is None:
            self._task = asyncio.ensure_future(self._start())
        task = self._task
        try:
            self.value = await asyncio.shield(task)  # a caller that gives up does not cancel the start
        except BaseException:
            if task.done() and self._task is task:
                self._task = None  # it failed: the next call starts again
            raise
        return self.value

    def reset(self) -> None:
        """Forget the result (the thing it started was closed)."""
        self._task, self.value = None, None
