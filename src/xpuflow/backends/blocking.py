"""Run blocking model code (llama.cpp, torch) from async sessions without blocking the event loop.

Each session owns one ``BlockingRunner``: a single worker thread, because most model objects are not
thread-safe, and a bridge that turns a blocking iterator (token streaming) into an async iterator
without buffering the whole stream::

    runner = BlockingRunner("llamacpp-smollm2")
    text = await runner.call(model.generate, prompt)
    async for piece in runner.iterate(lambda: model.stream(prompt)):
        ...
    runner.close()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

__all__ = ["BlockingRunner"]

T = TypeVar("T")

_DONE = object()


class BlockingRunner:
    """A single-thread executor for one model, with call and stream bridges."""

    def __init__(self, name: str) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def iterate(
        self, make_iter: Callable[[], Iterator[T]], *, max_buffered: int = 64
    ) -> AsyncIterator[T]:
        """Yield items of a blocking iterator as they are produced.

        At most ``max_buffered`` items wait between the producer and the consumer: a slow reader
        slows the producer down instead of growing an unbounded buffer. If the consumer stops early
        (client went away), the producer is told to stop at its next item, so the model thread is
        freed instead of generating tokens nobody reads.
        """
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be at least 1, got {max_buffered}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        room = threading.Semaphore(max_buffered)

        def produce() -> None:
            try:
                for item in make_iter():
                    while not room.acquire(timeout=0.05):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:  # delivered to the consumer, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, _Failure(exc))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self._executor, produce)
        try:
            while True:
                item = await queue.get()
                room.release()
                if item is _DONE:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            await asyncio.shield(future)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
