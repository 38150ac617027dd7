"""The client's side of a started stream: ``DispatchedStream``, and the iterator helpers it shares.

``Dispatcher.open_stream`` (``routing.dispatch``) retries a stream like any request until its first
chunk arrives, then hands it over as a ``DispatchedStream``::

    stream = await dispatcher.open_stream(tiers, request)   # returns once the first chunk has arrived
    async with stream:
        async for chunk in stream: ...                       # may raise StreamInterrupted

From there the stream cannot move to another worker (the client has seen output): a failure, or a
gap between chunks longer than ``stream_idle_timeout_s``, ends it with ``StreamInterrupted``.
``_first`` and ``_aclose`` read and close a worker's chunk iterator; the dispatcher uses them for the
first chunk. This module does not import ``routing.dispatch`` at run time (``routing.dispatch`` imports
it).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from xpuflow.backends.base import StreamChunk
from xpuflow.errors import StreamInterrupted
from xpuflow.routing.retry import Attempt, _describe, _IdleLimit
from xpuflow.scheduling.request import WorkRequest
from xpuflow.types import RoutingDecision

if TYPE_CHECKING:
    from xpuflow.routing.dispatch import _Pick

__all__ = ["DispatchedStream"]


class DispatchedStream:
    """A started stream: ``decision`` says where it runs; iterate it for the chunks (the first one has
    already arrived). Raises ``StreamInterrupted`` if the worker fails or stalls past
    ``stream_idle_timeout_s`` after the first chunk. Close it (or use ``async with``) when done early."""

    def __init__(
        self,
        decision: RoutingDecision,
        first: StreamChunk | None,
        iterator: AsyncIterator[StreamChunk],
        pick: _Pick,
        request: WorkRequest,
        attempts: tuple[Attempt, ...],
        idle_timeout_s: float | None,
    ) -> None:
        self.decision = decision
        self.attempts = attempts
        self.chunks_delivered = 0
        self._first = first
        self._iterator = iterator
        self._pick = pick
        self.request = request
        self._idle = None if idle_timeout_s is None else _IdleLimit(idle_timeout_s)  # one timer per stream
        self._done = first is None

    def __aiter__(self) -> DispatchedStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._first is not None:
            first, self._first = self._first, None
            self.chunks_delivered += 1
            return first
        if self._done:
            raise StopAsyncIteration
        idle = self._idle
        try:
            if idle is None:
                chunk = await self._iterator.__anext__()
            else:
                chunk = await idle.wait(self._iterator.__anext__())
        except StopAsyncIteration:
            self._end()
            raise
        except Exception as exc:
            self._end()
            await _aclose(self._iterator)
            target = self._pick.target
            raise StreamInterrupted(
                f"the stream from {self._pick.tier}/{target.worker_id} on {target.device} failed after "
                f"{self.chunks_delivered} chunk(s): {_describe(exc)}; the answer is incomplete, retry "
                "the request",
                worker=target.worker_id,
                tier=self._pick.tier,
                chunks_delivered=self.chunks_delivered,
            ) from exc
        except BaseException:
            self._end()
            await _aclose(self._iterator)
            raise
        self.chunks_delivered += 1
        return chunk

    def _end(self) -> None:
        self._done = True
        if self._idle is not None:
            self._idle.close()

    async def aclose(self) -> None:
        self._end()
        self._first = None
        await _aclose(self._iterator)

    async def __aenter__(self) -> DispatchedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _first(iterator: AsyncIterator[StreamChunk]) -> StreamChunk | None:
    """The next chunk, or None at the end of the stream."""
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None


async def _aclose(iterator: AsyncIterator[StreamChunk]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
