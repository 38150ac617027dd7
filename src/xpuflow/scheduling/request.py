"""One unit of work as the scheduler sees it: what to run, how urgent, and whether anyone still waits.

Example::

    request = WorkRequest.chat([{"role": "user", "content": "hi"}], GenerationParams(max_tokens=16),
                               priority=Priority.HIGH, deadline_s=clock.monotonic() + 30)
    result = await worker.submit(request)
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from xpuflow.backends.base import ChatMessage, GenerationParams
from xpuflow.events import LightEvent
from xpuflow.types import Priority, RequestKind  # shared enums live in types.py

__all__ = ["CancelSignal", "Priority", "RequestKind", "WorkRequest", "took_back"]

_ids = itertools.count(1)


class CancelSignal(LightEvent):
    """An ``asyncio.Event`` that also calls back when it is set, so that a worker can wait for a result,
    a cancellation and a deadline on one future instead of a watcher task per request::

        signal = CancelSignal()
        signal.add_callback(wake)      # wake() runs once, when set() is first called
        signal.remove_callback(wake)   # no longer interested (a no-op when it already ran)

    One is made per request (``xpuflow.events.LightEvent``: no deque, no callback list, until needed).

    ``set_by_s``: where its maker promises to set it by a time (a monotonic clock reading, as
    ``WorkRequest.deadline_s``), that time; None otherwise. The gateway's request timeout promises so for
    a whole answer, and a worker then arms no timer of its own for a deadline the signal comes before
    (``Worker.submit``): the signal's callback gives the request up at that time already.
    """

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], object]] | None = None
        self.set_by_s: float | None = None

    def set(self) -> None:
        if self._value:
            return
        super().set()
        callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback()

    def add_callback(self, callback: Callable[[], object]) -> None:
        callbacks = self._callbacks
        if callbacks is None:
            self._callbacks = [callback]
        else:
            callbacks.append(callback)

    def remove_callback(self, callback: Callable[[], object]) -> None:
        callbacks = self._callbacks
        if callbacks and callback in callbacks:
            callbacks.remove(callback)


def took_back(task: asyncio.Task[Any], cancelling: int) -> bool:
    """For a timer or a watcher that cancelled ``task``, which had ``cancelling`` cancellations pending
    before: take its own cancellation back, and say whether it was the only new one (else a caller's
    came with it, and the ``CancelledError`` is the caller's). The rule of ``asyncio.timeout``; Python
    3.10 counts no cancellations, so there the canceller's is taken as the only one."""
    if sys.version_info >= (3, 11):
        return task.uncancel() <= cancelling
    return True  # pragma: no cover - Python 3.10


@dataclass(eq=False)
class WorkRequest:
    """A request queued on a worker. ``cancelled`` is set when the client goes away, so a queued
    request is dropped instead of computed for nobody. Identity equality: two requests are never equal."""

    kind: RequestKind
    payload: Any  # messages (chat), prompt str (completion) or list[str] (embedding)
    params: GenerationParams = field(default_factory=GenerationParams)
    priority: Priority = Priority.NORMAL
    stream: bool = False
    deadline_s: float | None = None  # monotonic time after which the answer is useless
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    cancelled: asyncio.Event = field(default_factory=CancelSignal)
    metadata: dict[str, Any] = field(default_factory=dict)
    # monotonic time it first joined a worker's queue, kept across retries (see scheduling.queue)
    queued_since_s: float | None = None

    @classmethod
    def chat(cls, messages: Sequence[ChatMessage], params: GenerationParams, **kw: Any) -> WorkRequest:
        return cls(RequestKind.CHAT, list(messages), params, **kw)

    @classmethod
    def completion(cls, prompt: str, params: GenerationParams, **kw: Any) -> WorkRequest:
        return cls(RequestKind.COMPLETION, prompt, params, **kw)

    @classmethod
    def embedding(cls, texts: Sequence[str], **kw: Any) -> WorkRequest:
        return cls(RequestKind.EMBEDDING, list(texts), **kw)

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys may share a batch (same kind, same sampling settings)."""
        p = self.params
        return (self.kind, self.stream, p.temperature, p.top_p, p.stop, p.seed)
