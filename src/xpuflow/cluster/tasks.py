"""Stopping the cluster layer's background loops for sure.

Python 3.10 and 3.11's ``asyncio.wait_for`` returns the inner result and drops a cancellation that
arrives in the same loop turn as that result (fixed in 3.12). The cluster's pollers wait on Ray calls
with ``wait_for``; when a Ray answer lands just as the gateway stops, one ``cancel()`` is lost and the
poller runs on, so ``stop`` hung until its caller's timeout. ``cancel_and_wait`` cancels again until
the task has ended::

    await cancel_and_wait(self._poller)
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["cancel_and_wait"]


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
