"""``run_async``: an async test run on a fresh event loop, bounded so that a hang fails instead of stalling::

@run_async
async def test_it_answers() -> None:
    assert await worker.submit(request) is not None
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

__all__ = ["run_async"]


def run_async(test: Callable[..., Awaitable[None]], timeout_s: float = 20.0) -> Callable[..., None]:
    """``test`` as a plain function that runs it with ``asyncio.run``, failing past ``timeout_s``."""

    @functools.wraps(test)
    def wrapper(*args: object, **kwargs: object) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=timeout_s))

    return wrapper
