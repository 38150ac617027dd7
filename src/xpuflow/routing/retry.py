"""The retry vocabulary of the dispatcher: its policy, its record of attempts and its errors.

``RetryPolicy`` bounds retries, backoff and waiting; each try on a worker is an ``Attempt``; a served
request is ``Dispatched``. ``is_retryable`` tells a failure another worker may fix from a final one
(bad input, a 4xx other than 408/429). When no worker serves a request, the dispatcher raises
``DispatchError`` (``DispatchTimeout`` past the request's deadline); a stream that fails after its first
chunk raises ``StreamInterrupted``. ``_within`` runs an attempt under its time limit, which
``_attempt_timeout`` derives from the policy and the request's deadline.

``routing.dispatch`` (the ``Dispatcher``, which uses all of this) re-exports the public names.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from xpuflow import deadlines
from xpuflow.backends.base import Completion
from xpuflow.errors import (
    AttemptTimeout,
    CapabilityError,
    ConfigError,
    DispatchError,
    DispatchTimeout,
    RemoteError,
    StreamInterrupted,
)
from xpuflow.scheduling.request import took_back
from xpuflow.types import RoutingDecision

__all__ = [
    "Attempt",
    "DispatchError",
    "DispatchTimeout",
    "Dispatched",
    "RetryPolicy",
    "StreamInterrupted",
    "is_retryable",
]

T = TypeVar("T")
Result = Completion | list[list[float]]


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds on retries, backoff and waiting. Backoff before the n-th retry is
    ``min(backoff_max_s, backoff_base_s * 2 ** (n - 1))`` scaled by a uniform draw in [0.5, 1]."""

    max_retries: int = 2  # per tier: a tier is given up after 1 + max_retries workers failed
    max_attempts: int = 6  # over all tiers
    backoff_base_s: float = 0.05
    backoff_max_s: float = 1.0
    attempt_timeout_s: float | None = 60.0  # one worker's time to answer (to the first chunk for streams)
    stream_idle_timeout_s: float | None = 60.0  # longest gap between chunks once a stream has started
    record_timeouts: bool = True  # count an attempt timeout as a failure in the worker's health
    # while every worker of every tier is failing (an outage of the whole tier set), a request goes
    # round them again, with backoff, for up to this long instead of failing at once
    outage_retry_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}", field="max_retries")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}", field="max_attempts")
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ConfigError(
                f"need 0 <= backoff_base_s <= backoff_max_s, got {self.backoff_base_s} and "
                f"{self.backoff_max_s}",
                field="backoff_base_s",
            )
        if not self.outage_retry_s >= 0:
            raise ConfigError(
                f"outage_retry_s must be >= 0 seconds, got {self.outage_retry_s}", field="outage_retry_s"
            )
        for name in ("attempt_timeout_s", "stream_idle_timeout_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0 seconds or None, got {value}", field=name)

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1-based). Jitter keeps the retries of many
        requests that failed together from arriving together."""
        cap = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** (retry - 1))
        return cap * (0.5 + 0.5 * rng.random())


@dataclass(frozen=True)
class Attempt:
    """One try on one worker: where, how long, the backoff before it, and its error (None: it served)."""

    tier: str
    worker: str
    device: str
    elapsed_s: float
    backoff_s: float = 0.0
    error: str | None = None
    probe: bool = False

    def describe(self) -> str:
        where = f"{self.tier}/{self.worker} on {self.device}"
        return f"{where}: {self.error}" if self.error else f"{where}: served"


@dataclass(frozen=True)
class Dispatched:
    """A served request: the result, the explained decision and every attempt (the last one served)."""

    result: Result
    decision: RoutingDecision
    attempts: tuple[Attempt, ...] = ()


# An attempt ran past its timeout: becomes a retry or a DispatchTimeout (a local worker raises it itself
# for the limit the dispatcher gives it: Worker.submit's attempt_timeout_s)
_AttemptTimeout = AttemptTimeout


def is_retryable(exc: BaseException) -> bool:
    """Whether another worker may succeed where this one failed. Input errors and 4xx are final."""
    if isinstance(exc, (ConfigError, CapabilityError, ValueError, TypeError)):
        return False
    if isinstance(exc, RemoteError):
        return exc.retryable
    status = getattr(exc, "status", None)
    client_error = isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)
    return not client_error


def _describe(exc: BaseException) -> str:
    text = str(exc) or "no message"
    return f"{type(exc).__name__}: {text}"


async def _within(work: Awaitable[T], timeout_s: float | None) -> T:
    """``work``'s result, or ``_AttemptTimeout`` past ``timeout_s`` (the work is cancelled, which makes a
    worker withdraw the request). Runs in the caller's task: no task per attempt or per chunk. A
    ``TimeoutError`` the work raises itself (a worker's deadline) passes through unchanged."""
    if timeout_s is None:
        return await work
    task = asyncio.current_task()
    if sys.version_info >= (3, 11) and task is not None:
        # asyncio.timeout's rule with one timer and no context object: it runs once per attempt and
        # once per streamed chunk. Expiry cancels the task; that cancellation, and only that one (not a
        # caller's that came with it), becomes _AttemptTimeout.
        cancelling = task.cancelling()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = deadlines.call_later_on(task.get_loop(), timeout_s, expire)
        try:
            return await work
        except asyncio.CancelledError:
            if expired and took_back(task, cancelling):
                raise _AttemptTimeout.after(timeout_s) from None
            raise
        finally:
            timer.cancel()
    try:  # pragma: no cover - Python 3.10, where asyncio.TimeoutError is not the builtin TimeoutError
        return await asyncio.wait_for(work, timeout_s)
    except asyncio.TimeoutError:  # pragma: no cover
        raise _AttemptTimeout.after(timeout_s) from None


class _IdleLimit:
    """``_within`` for the chunks of one stream, with one timer for the whole stream: each ``wait(work)``
    may take ``timeout_s`` from its start, or the work is cancelled and ``_AttemptTimeout`` raised. The
    timer is armed by the first wait; when it fires for a wait that has ended, it is armed again for the
    one in progress (or left off until the next), so a chunk costs a clock read instead of a timer."""

    __slots__ = ("_cancelling", "_expired", "_since", "_task", "_timer", "_waiting", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._since = 0.0
        self._waiting = False
        self._expired = False
        self._cancelling = 0

    async def wait(self, work: Awaitable[T]) -> T:
        # the reader's task; with the loop known (every chunk after the first), current_task costs no
        # getpid system call
        known = self._task
        task = asyncio.current_task() if known is None else asyncio.current_task(known.get_loop())
        assert task is not None  # a stream is read in a task
        if task is not self._task:
            self.close()  # another reader: the timer cancels the task that waits
            self._task = task
        loop = task.get_loop()
        self._since = loop.time()
        if sys.version_info >= (3, 11):
            self._cancelling = task.cancelling()
        self._waiting = True
        if self._timer is None:
            self._timer = loop.call_at(self._since + self.timeout_s, self._check)
        try:
            return await work
        except asyncio.CancelledError:
            if self._expired:
                self._expired = False
                if took_back(task, self._cancelling):
                    raise _AttemptTimeout.after(self.timeout_s) from None
            raise
        finally:
            self._waiting = False

    def _check(self) -> None:
        self._timer = None
        task = self._task
        if not self._waiting or task is None:
            return  # the next wait arms it again
        loop = task.get_loop()
        due = self._since + self.timeout_s
        if loop.time() < due:
            self._timer = loop.call_at(due, self._check)
            return
        self._expired = True
        task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _attempt_timeout(attempt_s: float | None, remaining_s: float | None) -> tuple[float | None, bool]:
    """The attempt's time limit, and whether the request's deadline (not the attempt limit) sets it."""
    if remaining_s is None:
        return attempt_s, False
    if attempt_s is None or remaining_s < attempt_s:
        return max(0.0, remaining_s), True
    return attempt_s, False
