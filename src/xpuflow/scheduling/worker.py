"""A worker: one session behind a priority queue and an adaptive micro-batcher.

One batch loop per worker asks the batcher what to do with the head of the queue and runs batches
on the session: sessions that batch natively get the batch forms (``chat_batch``, ``generate_batch``,
one ``embed`` over every text of the batch); others get one request at a time. Every accepted request
ends with a result or an error, also when the worker stops::

    async with Worker(session, worker_id="chat-0", deployment="chat-main") as worker:
        reply = await worker.submit(WorkRequest.chat(messages, GenerationParams(max_tokens=32)))
        async for chunk in worker.stream(WorkRequest.chat(messages, params, stream=True)):
            print(chunk.text, end="")
        worker.snapshot()          # WorkerSnapshot for the router's scorer
        worker.metrics.to_dict()   # queue depth per priority, in flight, EMA latency, tokens/s, ...

Errors: ``submit`` raises the session's error (``SessionError``, ``RemoteError``, ...),
``QueueFull`` when the queue has no room, ``WorkerStopped`` when the worker is not running,
``DeadlineExceeded`` (a ``TimeoutError``) past ``request.deadline_s``, ``AttemptTimeout`` past a
dispatcher's ``attempt_timeout_s`` and ``RequestCancelled`` when ``request.cancelled`` is set before
the result arrives. The worker does not retry; it records every
batch's success or failure in ``health`` (request errors such as a bad prompt are not the worker's
failure and are not recorded), and the router reads ``health`` to choose and fail over.

A batch the session rejects with ``ConfigError`` (one bad request, such as a prompt longer than the
context) is re-run one request at a time, so only the bad request fails. Which requests share a batch
and which session calls run it is ``scheduling.session_calls``; streamed requests run alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from xpuflow import deadlines
from xpuflow.backends.base import BatchMode, Completion, Session, StreamChunk
from xpuflow.clock import Clock, SystemClock
from xpuflow.errors import (
    AdmissionRejected,
    AttemptTimeout,
    ConfigError,
    ModelDoesNotFit,
    SessionError,
    WorkerStopped,
    XpuflowError,
)
from xpuflow.scheduling.batcher import Action, Batcher, BatcherConfig, BatchPolicy, make_batcher
from xpuflow.scheduling.health import HealthTracker
from xpuflow.scheduling.metrics import WorkerMetrics
from xpuflow.scheduling.qos.residency import ModelResidency
from xpuflow.scheduling.queue import (
    STREAM_END,
    DeadlineExceeded,
    QueuePolicy,
    RequestCancelled,
    RequestQueue,
    Ticket,
    make_queue,
)
from xpuflow.scheduling.request import CancelSignal, WorkRequest, took_back
from xpuflow.scheduling.session_calls import (
    Result,
    batch_group,
    open_stream,
    run_batch,
    run_one,
    work_units,
)
from xpuflow.types import WorkerSnapshot

__all__ = ["Worker", "WorkerStopped"]

log = logging.getLogger(__name__)
_worker_ids = itertools.count()


def _current() -> asyncio.Task[None]:
    task = asyncio.current_task()
    assert task is not None  # batch runners always run in their own task
    return task


class Worker:
    """A session with its queue, batcher, health and metrics. See the module docstring.

    ``max_batch_size`` defaults to the session's; sessions that do not batch natively run one request
    at a time. ``queue_policy``, ``queue_capacity``, ``aging_s`` and ``high_reserve_fraction`` shape the
    queue (``scheduling.queue``); ``batch_policy``, ``max_wait_s``, ``max_wait_fraction`` and
    ``max_concurrent_batches`` the batcher (``scheduling.batcher``). ``max_in_flight`` caps the requests
    a continuous session (one that batches by itself: a remote server, the decode loop) runs at once;
    its default is the session's own ``max_in_flight`` (a remote server's connection limit) or else
    ``max_batch_size``; other sessions refuse it (ConfigError). ``device_state``, when given,
    returns live device readings for ``snapshot()`` (``free_memory_bytes``, ``utilization_pct``,
    ``temperature_c``); without it the snapshot reports the worker's own busy share as utilisation.
    ``stop_timeout_s`` bounds how long ``stop`` waits for queued and running work; ``close_session``
    closes the session after ``stop``. ``compute_gate``, when given, is entered around every batch's
    session call and every streamed generation (for example ``lambda: tokens.hold("chat")`` of a
    device's ``ComputeTokens``), so the workers of one device share its compute by partition weights.
    """

    def __init__(
        self,
        session: Session,
        *,
        worker_id: str | None = None,
        deployment: str = "",
        device: str | None = None,
        max_batch_size: int | None = None,
        queue_policy: QueuePolicy | str = QueuePolicy.PRIORITY,
        queue_capacity: int = 256,
        aging_s: float = 5.0,
        high_reserve_fraction: float = 0.2,
        batch_policy: BatchPolicy | str = BatchPolicy.ADAPTIVE,
        max_wait_s: float = 0.05,
        max_wait_fraction: float = 0.1,
        max_concurrent_batches: int = 1,
        max_in_flight: int | None = None,
        health: HealthTracker | None = None,
        clock: Clock | None = None,
        metrics_window_s: float = 10.0,
        device_state: Callable[[], Mapping[str, Any]] | None = None,
        stop_timeout_s: float = 60.0,
        close_session: bool = False,
        tags: frozenset[str] = frozenset(),
        compute_gate: Callable[[], AbstractAsyncContextManager[Any]] | None = None,
        residency: ModelResidency | None = None,
        max_seq_len: int | None = None,
    ) -> None:
        self.session = session
        self._max_seq_len = max_seq_len  # the context its backend takes, when the session does not say
        self.worker_id = worker_id or f"{session.model_id}-{next(_worker_ids)}"
        self._owner = f"worker '{self.worker_id}'"  # who failed, in a session's error message
        self.deployment = deployment or session.model_id
        self.device = device or (session.resources[0].id if session.resources else "unknown")
        self.native_batching = session.batch_mode is BatchMode.NATIVE
        cap = max_batch_size if max_batch_size is not None else max(1, session.max_batch_size)
        if cap < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {cap}", field="max_batch_size")
        self.max_batch_size = cap if self.native_batching else 1
        # a continuous session batches by itself at every step: the worker sends each request at once,
        # up to ``max_in_flight`` of them, and forms no batches (None: the worker batches)
        self.max_in_flight = self._in_flight_cap(session, max_in_flight, cap)
        self._clock = clock or SystemClock()
        self.health = health or HealthTracker(clock=self._clock)
        self.metrics = WorkerMetrics(self._clock, window_s=metrics_window_s)
        self.tags = frozenset(tags)
        self._queue = make_queue(
            queue_policy,
            capacity=queue_capacity,
            aging_s=aging_s,
            high_reserve_fraction=high_reserve_fraction,
            name=f"worker '{self.worker_id}'",
        )
        self._batcher = make_batcher(
            batch_policy,
            BatcherConfig(
                max_batch_size=self.max_batch_size,
                max_wait_s=max_wait_s,
                max_wait_fraction=max_wait_fraction,
                max_concurrent_batches=max_concurrent_batches,
            ),
        )
        self._device_state = device_state
        self._compute_gate = compute_gate
        # on-demand loading: the session is loaded (and this worker's ``session`` replaced) at the
        # first batch after it was unloaded; ``session`` then describes it while it is not resident
        self._residency = residency
        self._stop_timeout_s = stop_timeout_s
        self._close_session = close_session
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one start() ran on
        self._batches: set[asyncio.Task[None]] = set()
        self._started_at: dict[asyncio.Task[None], float] = {}  # running batch -> when it started
        self._answering: set[asyncio.Task[None]] = set()  # streams that have sent a chunk
        self._abandoned: dict[asyncio.Task[None], str] = {}  # batch -> why the worker gave it up
        self._inline: dict[asyncio.Task[Any], _InlineRun] = {}  # caller's task -> the request it runs here
        # the fast paths (submit's, _stream_inline) need a session that batches by itself and nothing
        # to enter first
        self._runs_inline = self.max_in_flight is not None and compute_gate is None and residency is None
        # only a worker that forms batches asks its batcher anything (a continuous session's calls start
        # as they come): the others do not keep it informed
        self._informs_batcher = self.max_in_flight is None
        self._accepting = False
        self._closing = False
        self._drained = False
        self._drain_rate_ema: float | None = None
        self._recovery_seen = self.health.recovered_at_s

    def _in_flight_cap(self, session: Session, max_in_flight: int | None, cap: int) -> int | None:
        continuous = session.batch_mode is BatchMode.CONTINUOUS
        if max_in_flight is not None:
            if not continuous:
                raise ConfigError(
                    f"worker '{self.worker_id}': max_in_flight applies to backends that batch by "
                    f"themselves (remote servers, continuous sessions), and this session batches "
                    f"{session.batch_mode.value}; drop max_in_flight and set max_batch_size instead",
                    field="max_in_flight",
                )
            if max_in_flight < 1:
                raise ConfigError(f"max_in_flight must be >= 1, got {max_in_flight}", field="max_in_flight")
            return max_in_flight
        if not continuous:
            return None
        own = getattr(session, "max_in_flight", None)  # what the session's server allows (remote)
        return own if isinstance(own, int) and own > 0 else cap

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._accepting

    @property
    def draining(self) -> bool:
        """True while the worker should get no new requests: an operator drained it, or it is
        stopping. The router's scorer skips draining workers (``snapshot().draining``); requests that
        still reach a drained (not stopping) worker are served, so a race with the drain loses none."""
        return self._drained or self._closing or not self._accepting

    @draining.setter
    def draining(self, value: bool) -> None:
        self._drained = bool(value)

    @property
    def queue(self) -> RequestQueue:
        """The request queue (for reading: depth, head, policy)."""
        return self._queue

    @property
    def batcher(self) -> Batcher:
        return self._batcher

    async def start(self) -> None:
        """Start the batch loop; idempotent."""
        if self._loop_task is not None:
            return
        self._accepting = True
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._loop_task = asyncio.create_task(self._batch_loop(), name=f"worker-{self.worker_id}")

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting requests. With ``drain`` the queued requests still run (without batching
        waits); without it they fail with ``WorkerStopped``. Running batches finish either way. Work
        still unanswered after ``stop_timeout_s`` fails with ``WorkerStopped``."""
        self._accepting = False
        if self._loop_task is None:
            return
        self._closing = True
        if not drain:
            self._fail_queued("stopped without draining")
        self._wakeup.set()
        loop_task = self._loop_task
        deadline = self._clock.monotonic() + self._stop_timeout_s
        # The loop ends once the queue is empty; batches it launched meanwhile are awaited after it.
        await asyncio.wait({loop_task}, timeout=self._stop_timeout_s)
        inline = self._inline_ends()
        if self._batches or inline:
            remaining = max(0.0, deadline - self._clock.monotonic())
            await asyncio.wait({*self._batches, *inline}, timeout=remaining)
        if not loop_task.done() or self._batches or self._inline_ends():
            log.warning(
                "worker %s: stop timed out after %.1f s; failing what is left",
                self.worker_id,
                self._stop_timeout_s,
            )
            tasks = [loop_task, *self._batches]
            for task in tasks:
                task.cancel()
            stopped = f"worker '{self.worker_id}' stopped while running this request; retry it elsewhere"
            for run in list(self._inline.values()):
                run.give_up(WorkerStopped(stopped, retry_after_s=0.0))
            await asyncio.gather(*tasks, *self._inline_ends(), return_exceptions=True)
        self._fail_queued("stopped before this request ran")
        self._loop_task = None
        if self._residency is not None:
            await self._residency.unload(self.worker_id)
        elif self._close_session:
            await self.session.close()

    def _inline_ends(self) -> list[asyncio.Future[None]]:
        """A future for the end of each request running in its caller's task (``submit``'s fast path), except
        the current task's own: the caller's whole task may run on after its request here."""
        current = asyncio.current_task()
        return [run.ended() for task, run in self._inline.items() if task is not current]

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(drain=True)

    def _fail_queued(self, why: str) -> None:
        gone = self._queue.clear(
            lambda t: WorkerStopped(
                f"worker '{self.worker_id}' {why} (request {t.request.request_id}); "
                "send it to another worker",
                retry_after_s=0.0,
            )
        )
        for _ in gone:
            self.metrics.record_dropped("stopped")
        self._update_depths()

    # -- submission ---------------------------------------------------------------------------------

    async def submit(self, request: WorkRequest, *, attempt_timeout_s: float | None = None) -> Result:
        """Queue ``request`` and wait for its result (a ``Completion``, or the vectors of an
        embedding request). Raises as described in the module docstring.

        ``attempt_timeout_s``: a dispatcher's time limit for this attempt, which comes no later than the
        request's deadline (the dispatcher passes the deadline's rest where that is shorter). Past it
        the request is given up, as its cancel signal would give it up, with ``AttemptTimeout`` for the
        dispatcher to retry elsewhere; the worker keeps it with the one timer it arms, so the
        dispatcher needs none of its own."""
        if request.stream:
            raise ConfigError(
                f"request {request.request_id} asks for a stream; use Worker.stream()", field="stream"
            )
        cancelled = request.cancelled
        if self._runs_inline and isinstance(cancelled, CancelSignal):
            now = self._admissible(request)
            if self._free_slot():
                # The fast path: a session that batches by itself with a free slot and nothing queued
                # ahead runs the request in the caller's own task (no ticket, no batch task, no hand-over
                # of the answer, and no coroutine between the caller and the session's call), with the
                # bookkeeping that a batch of one gets from _launch, _run_batch and _finish_batch.
                # Whoever gives the request up (its cancel signal, its deadline, abandon_in_flight, stop
                # past its timeout) cancels the caller's task with a reason; that cancellation, and only
                # that one, becomes the reason's error (a cancellation of the caller's own passes through
                # as it came). A request given up this way is no failure of the device.
                # the caller's task (with the loop known, current_task costs no getpid system call)
                task = asyncio.current_task(self._loop)
                assert task is not None  # a coroutine awaited in a task
                # no timer for a deadline the request's cancel signal is promised to come by (the
                # gateway's request timeout: CancelSignal.set_by_s); its callback gives it up then
                set_by_s, deadline_s = cancelled.set_by_s, request.deadline_s
                timed = deadline_s is not None and (set_by_s is None or set_by_s > deadline_s)
                run = self._inline_begin(
                    task, request, now, waiting=True, timed=timed, attempt_timeout_s=attempt_timeout_s
                )
                cancelling = 0
                if sys.version_info >= (3, 11):
                    cancelling = task.cancelling()
                ok = recorded = False  # recorded: record_alone has ended its metrics
                try:
                    try:
                        result = await run_one(
                            self.session, request, native=self.native_batching, owner=self._owner
                        )
                    except asyncio.CancelledError:
                        if run.error is None or not took_back(task, cancelling):
                            raise  # the caller's own cancellation
                        raise run.error from None
                except Exception as exc:
                    error, ok = self._inline_failure(run, exc)
                    if error is exc:
                        raise
                    raise error  # noqa: B904 (_as_xpuflow sets the cause)
                else:
                    ended = self._clock.monotonic()
                    self._sync_health()
                    tokens = result.completion_tokens if isinstance(result, Completion) else 0
                    self.metrics.record_alone(now, ended, tokens)
                    recorded = True
                    self.health.record_success()
                    ok = True
                    return result
                finally:
                    self._inline_end(task, run, now, ok, recorded=recorded)
            ticket = self._enqueue(request, now, streaming=False)
        else:
            ticket = self._admit(request, streaming=False)
        return await self._answer(ticket, request, attempt_timeout_s)

    async def _answer(
        self, ticket: Ticket, request: WorkRequest, attempt_timeout_s: float | None = None
    ) -> Result:
        """The queued path of ``submit``: wait for ``ticket``'s answer (or withdraw it): until its
        deadline, or ``attempt_timeout_s`` where one is given (see ``submit``)."""
        cancelled = request.cancelled
        watcher: asyncio.Future[Any] | None = None
        try:
            if isinstance(cancelled, CancelSignal):
                await self._answer_or_withdraw(ticket, request, cancelled, attempt_timeout_s)
            else:  # a plain asyncio.Event: watch it with a task
                watcher = asyncio.ensure_future(cancelled.wait())
                await asyncio.wait(
                    {ticket.future, watcher},
                    timeout=self._timeout_s(request) if attempt_timeout_s is None else attempt_timeout_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        except asyncio.CancelledError:
            self._withdraw(ticket, self._cancelled_error(request, "its caller was cancelled"))
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if not ticket.future.done():
            if request.cancelled.is_set():
                self._withdraw(ticket, self._cancelled_error(request, "its client went away"))
            elif attempt_timeout_s is not None:
                self._withdraw(ticket, AttemptTimeout.after(attempt_timeout_s))
            else:
                self._withdraw(ticket, self._deadline_error(request))
        result: Result = ticket.future.result()
        return result

    async def _answer_or_withdraw(
        self,
        ticket: Ticket,
        request: WorkRequest,
        cancelled: CancelSignal,
        attempt_timeout_s: float | None = None,
    ) -> None:
        """Until ``ticket`` is answered. Its cancellation signal and its deadline (or, where one is given,
        a dispatcher's ``attempt_timeout_s``, with ``AttemptTimeout``) withdraw it with their error,
        which answers it: the caller waits on the ticket's own future, woken by whichever comes first,
        with no other future or task. A caller cancelled meanwhile cancels that future, which withdraws
        the request as well (``submit`` takes it out of the queue)."""
        answer = ticket.future
        if answer.done() or cancelled.is_set():
            return

        def on_cancel() -> None:
            self._withdraw(ticket, self._cancelled_error(request, "its client went away"))

        cancelled.add_callback(on_cancel)
        timer: deadlines.Cancellable | None = None
        if attempt_timeout_s is not None:
            timer = deadlines.call_later(attempt_timeout_s, self._expire_attempt, ticket, attempt_timeout_s)
        elif (timeout_s := self._timeout_s(request)) is not None:
            timer = deadlines.call_later(timeout_s, self._expire, ticket)
        try:
            await answer
        finally:
            cancelled.remove_callback(on_cancel)
            if timer is not None:
                timer.cancel()

    async def stream(self, request: WorkRequest) -> AsyncIterator[StreamChunk]:
        """Queue ``request`` and yield its chunks as the session produces them; the last chunk carries
        ``finish_reason``. Admission errors (``QueueFull``, ``WorkerStopped``) are raised before the
        first chunk. A consumer that stops iterating withdraws the request and stops its generation.
        A session that batches by itself with a free slot streams to the consumer directly (see
        ``_stream_inline``)."""
        if self._runs_inline and isinstance(request.cancelled, CancelSignal):
            now = self._admissible(request)
            if self._free_slot():
                source = self._stream_inline(request, now)
                try:
                    async for chunk in source:
                        yield chunk
                finally:
                    await source.aclose()
                return
            ticket = self._enqueue(request, now, streaming=True)
        else:
            ticket = self._admit(request, streaming=True)
        chunks = ticket.chunks
        assert chunks is not None
        finished = False
        # one timer for the stream's deadline, which withdraws it (its error goes into the chunk queue
        # after what has arrived), not a timeout scope around every chunk
        timeout_s = self._timeout_s(request)
        timer = None if timeout_s is None else deadlines.call_later(timeout_s, self._expire, ticket)
        try:
            while True:
                item = chunks.get_nowait() if chunks.qsize() else await chunks.get()
                if item is STREAM_END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if timer is not None:
                timer.cancel()
            if not finished:
                self._withdraw(ticket, self._cancelled_error(request, "its consumer stopped reading"))

    def _timeout_s(self, request: WorkRequest) -> float | None:
        if request.deadline_s is None:
            return None
        return max(0.0, request.deadline_s - self._clock.monotonic())

    def _admit(self, request: WorkRequest, *, streaming: bool) -> Ticket:
        return self._enqueue(request, self._admissible(request), streaming=streaming)

    def _admissible(self, request: WorkRequest) -> float:
        """Now, when the worker may take ``request``; else the error that refuses it."""
        if not self._accepting:
            state = "is stopping" if self._closing else "is not running (call start())"
            raise WorkerStopped(
                f"worker '{self.worker_id}' {state}; send request {request.request_id} to another worker",
                retry_after_s=0.0,
            )
        if request.cancelled.is_set():
            raise self._cancelled_error(request, "it was cancelled before it was queued")
        now = self._clock.monotonic()
        if request.deadline_s is not None and now >= request.deadline_s:
            raise self._deadline_error(request)
        if request.queued_since_s is None:
            request.queued_since_s = now
        return now

    def _free_slot(self) -> bool:
        """A session that batches by itself, nothing queued ahead and a free slot: a request starts at
        once (an empty queue admits any priority)."""
        return (
            self.max_in_flight is not None
            and not self._queue
            and self.metrics.in_flight < self.max_in_flight
            and not self._closing
        )

    def _enqueue(self, request: WorkRequest, now: float, *, streaming: bool) -> Ticket:
        ticket = Ticket(
            request,
            enqueued_at_s=now,
            group=batch_group(request, streaming),
            future=asyncio.get_running_loop().create_future(),
            chunks=asyncio.Queue() if streaming else None,
            waiting_since_s=request.queued_since_s,
        )
        if self._free_slot():
            # what the batch loop's next step would do at once (take this ticket, the queue's only
            # one), done here, without queueing it or waking the loop
            self._launch([ticket], now, from_queue=False)
            return ticket
        try:
            self._queue.push(ticket, now)
        except AdmissionRejected:
            self.metrics.record_rejected()
            raise
        if self._informs_batcher:
            self._batcher.on_arrival(now)
        self._update_depths()
        self._wakeup.set()
        return ticket

    def _withdraw(self, ticket: Ticket, error: XpuflowError) -> None:
        """Answer ``ticket`` with ``error`` unless it is answered already, and take it out of the queue."""
        if self._queue.remove(ticket):
            self.metrics.record_dropped("expired" if isinstance(error, DeadlineExceeded) else "cancelled")
            self._update_depths()
            self._wakeup.set()
        ticket.fail(error)

    def _expire(self, ticket: Ticket) -> None:
        """The ticket's deadline has come: withdraw it with the deadline error (a timer's callback)."""
        self._withdraw(ticket, self._deadline_error(ticket.request))

    def _expire_attempt(self, ticket: Ticket, limit_s: float) -> None:
        """The dispatcher's limit for the ticket's attempt has come (``submit``'s ``attempt_timeout_s``):
        withdraw it with ``AttemptTimeout``."""
        self._withdraw(ticket, AttemptTimeout.after(limit_s))

    def _cancelled_error(self, request: WorkRequest, why: str) -> RequestCancelled:
        return RequestCancelled(
            f"request {request.request_id} on worker '{self.worker_id}' was withdrawn: {why}"
        )

    def _deadline_error(self, request: WorkRequest) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"request {request.request_id} passed its deadline on worker '{self.worker_id}'; raise its "
            "timeout or send it to a less loaded worker"
        )

    def _update_depths(self) -> None:
        self.metrics.set_queue_depth(self._queue.depth_by_priority())

    # -- dispatch -----------------------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        try:
            while True:
                self._wakeup.clear()
                try:
                    if not await self._step():
                        return
                except asyncio.CancelledError:
                    raise
                except Exception:  # a scheduler bug must not strand the queued requests
                    log.exception("worker %s: batch loop error; failing the queued requests", self.worker_id)
                    self._queue.clear(
                        lambda t: SessionError(
                            f"worker '{self.worker_id}' hit an internal error before running request "
                            f"{t.request.request_id}; retry it"
                        )
                    )
                    self._update_depths()
        finally:
            self._fail_queued("stopped before this request ran")

    async def _step(self) -> bool:
        """One decision; False when the loop should end (closing and nothing left to dispatch)."""
        now = self._clock.monotonic()
        for ticket in self._queue.purge(now):
            self.metrics.record_dropped("cancelled" if ticket.request.cancelled.is_set() else "expired")
            self._update_depths()
        head = self._queue.head(now)
        if head is None:
            if self._closing:
                return False
            await self._sleep(None)
            return True
        group = head.group
        streaming = head.chunks is not None
        if self.max_in_flight is not None:
            # metrics.in_flight drops before the finished call's task is gone from _batches
            if self.metrics.in_flight < self.max_in_flight:
                self._launch(self._queue.take_batch(now, 1, group), now)
            else:
                await self._sleep(None)  # a completion wakes the loop
            return True
        decision = self._batcher.decide(
            now,
            self._queue.group_size(group),
            self._queue.group_oldest_s(group),
            cap=1 if streaming else self.max_batch_size,
            units=work_units(head.request),
            draining=self._closing,
            outstanding=len(self._queue) + self.metrics.in_flight,
        )
        if decision.action is Action.DISPATCH:
            self._launch(self._queue.take_batch(now, decision.size, group), now)
        elif decision.action is Action.WAIT:
            await self._sleep(decision.until_s)
        else:
            await self._sleep(None)
        return True

    async def _sleep(self, until_s: float | None) -> None:
        """Until something changes (arrival, completion, withdrawal, stop) or ``until_s``."""
        if until_s is None:
            await self._wakeup.wait()
            return
        delay = until_s - self._clock.monotonic()
        if delay <= 0:
            return
        waker = asyncio.ensure_future(self._wakeup.wait())
        timer = asyncio.ensure_future(self._clock.sleep(delay))
        try:
            await asyncio.wait({waker, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
            timer.cancel()

    def _launch(self, tickets: list[Ticket], now: float, *, from_queue: bool = True) -> None:
        """Run ``tickets`` as one batch in a task of its own. ``from_queue``: they were taken from the
        queue, whose depths have changed (False: a ticket that never queued)."""
        if not tickets:
            return
        for ticket in tickets:
            ticket.dispatched_at_s = now
            # what the gateway reports as queue time (xpuflow_queue_time_seconds): this queue's wait
            ticket.request.metadata["queue_ms"] = (now - ticket.enqueued_at_s) * 1000.0
        if from_queue:
            self._update_depths()
        if self._informs_batcher:
            self._batcher.on_dispatch(now, len(tickets))
        # in a continuous session a request joins the ones in flight in one running batch
        joined = self.metrics.in_flight if self.max_in_flight is not None else 0
        self.metrics.record_batch_start(len(tickets), shares_with=joined)
        runner = self._run_stream(tickets[0]) if tickets[0].chunks is not None else self._run_batch(tickets)
        task = asyncio.create_task(runner, name=f"worker-{self.worker_id}-batch")
        self._batches.add(task)
        self._started_at[task] = now
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._started_at.pop(task, None)
        self._answering.discard(task)
        self._abandoned.pop(task, None)

    def abandon_in_flight(self, reason: str) -> int:
        """Give up the requests running here that have sent nothing back yet (non-streamed ones, streams
        before their first chunk): each fails with a ``SessionError`` naming ``reason``, which the
        router retries on another worker. For a device that stopped answering (a hung server, found by
        a failed health check), so its requests do not wait out their whole timeout. Streams that have
        sent chunks keep running: the client holds part of an answer. Returns how many were given up."""
        given_up = 0
        for task in list(self._batches):
            if task.done() or task in self._answering or task in self._abandoned:
                continue
            self._abandoned[task] = reason
            task.cancel()
            given_up += 1
        for run in list(self._inline.values()):
            if not run.answering and run.give_up(self._abandon_error(reason)):
                given_up += 1
        if given_up:
            log.warning("worker %s: gave up %d request(s) in flight: %s", self.worker_id, given_up, reason)
        return given_up

    def _abandon_error(self, why: str) -> SessionError:
        return SessionError(
            f"worker '{self.worker_id}' gave up this request while it ran: {why}; retry it elsewhere"
        )

    def _finish_batch(self, tickets: Sequence[Ticket], started: float, ok: bool) -> None:
        self._batch_ended(len(tickets), work_units(tickets[0].request), started, ok)

    def _batch_ended(
        self,
        size: int,
        units: float,
        started: float,
        ok: bool,
        *,
        task: asyncio.Task[Any] | None = None,
        recorded: bool = False,
    ) -> None:
        """``task``: the one that ran it (default: the current one); ``recorded``: the metrics have its
        end already (``WorkerMetrics.record_alone``)."""
        # not running any more: its age must not reach the next snapshot as a stuck batch (the task's
        # done callback, _forget, runs a loop turn later, after a caller woken by the answer has routed)
        self._started_at.pop(_current() if task is None else task, None)
        now = self._clock.monotonic()
        service_s = now - started
        if self._informs_batcher:
            self._batcher.on_complete(now, size, service_s if ok else None, units)
        self._sync_health()  # a probe that just succeeded: its latency samples describe the outage
        if not recorded:
            self.metrics.record_batch_end(size, service_s, ok, started_at_s=started)
        if ok and service_s > 0:
            rate = size / service_s
            old = self._drain_rate_ema
            self._drain_rate_ema = rate if old is None else old + 0.2 * (rate - old)
            self._queue.drain_rate_per_s = self._drain_rate_ema
        if self._queue:  # a free slot or batch for the next in line; with none queued, the loop sleeps on
            self._wakeup.set()

    async def _stream_inline(self, request: WorkRequest, now: float) -> AsyncGenerator[StreamChunk, None]:
        """The fast path of ``stream``: the consumer's own task pulls each chunk from the session (no
        stream task, no chunk queue between them). Giving it up works as in ``submit``'s fast path, with
        one difference: the consumer's task is cancelled only while it waits here for a chunk; given up
        while it is away (sending the last chunk on), the stream raises the reason's error when it asks
        for the next. ``abandon_in_flight`` spares a stream that has sent a chunk, as it spares a queued
        one."""
        key = _current()  # the task it is registered under (a consumer may read on from another)
        loop = key.get_loop()
        run = self._inline_begin(key, request, now, waiting=False)
        source = open_stream(self.session, request)
        ok = recorded = False  # recorded: record_alone has ended its metrics
        try:
            while True:
                if run.error is not None:
                    raise run.error  # given up while the consumer was away
                # the consumer's task now (current_task with the loop costs no getpid system call)
                task = asyncio.current_task(loop)
                assert task is not None  # a stream is read in a task
                cancelling = 0
                if sys.version_info >= (3, 11):
                    cancelling = task.cancelling()
                run.task, run.waiting = task, True
                try:
                    chunk = await source.__anext__()
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if run.error is None or not took_back(task, cancelling):
                        raise  # the consumer's own cancellation
                    raise run.error from None
                finally:
                    run.waiting = False
                run.answering = True
                if chunk.text:
                    self.metrics.record_tokens(1)
                yield chunk
            ended = self._clock.monotonic()
            self._sync_health()
            self.metrics.record_alone(now, ended)  # its tokens were counted as they came
            recorded = True
            self.health.record_success()
            ok = True
        except (GeneratorExit, asyncio.CancelledError):
            raise  # the consumer stopped reading, or was cancelled: no fault of the device
        except Exception as exc:
            error, ok = self._inline_failure(run, exc)
            if error is exc:
                raise
            raise error  # noqa: B904 (_as_xpuflow sets the cause)
        finally:
            with contextlib.suppress(Exception):
                await source.aclose()  # type: ignore[attr-defined]
            self._inline_end(key, run, now, ok, recorded=recorded)

    def _inline_begin(
        self,
        task: asyncio.Task[Any],
        request: WorkRequest,
        now: float,
        *,
        waiting: bool,
        timed: bool = True,
        attempt_timeout_s: float | None = None,
    ) -> _InlineRun:
        """Start a request on a fast path (``submit``'s, ``_stream_inline``) under ``task``: what
        ``_launch`` does for a batch of one, and the cancel signal and deadline that give it up
        (``timed``: a timer for its deadline; False where its signal comes by then). With
        ``attempt_timeout_s`` (``submit``'s) the one timer is for that limit instead, which comes no later
        than the deadline."""
        run = _InlineRun(task, request, waiting=waiting)
        request.metadata["queue_ms"] = 0.0
        self.metrics.record_batch_start(1, shares_with=self.metrics.in_flight)
        self._inline[task] = run
        self._started_at[task] = now
        signal = request.cancelled
        assert isinstance(signal, CancelSignal)  # the fast paths take no other
        run.on_cancel = functools.partial(self._cancel_inline, run)
        signal.add_callback(run.on_cancel)
        if attempt_timeout_s is not None:
            run.timer = deadlines.call_later_on(
                task.get_loop(), attempt_timeout_s, self._expire_inline_attempt, run, attempt_timeout_s
            )
        elif timed and request.deadline_s is not None:
            run.timer = deadlines.call_later_on(
                task.get_loop(), request.deadline_s - now, self._expire_inline, run
            )
        return run

    def _inline_failure(self, run: _InlineRun, exc: Exception) -> tuple[Exception, bool]:
        """Count a fast-path request that failed with ``exc``: the error to raise, and whether its batch
        of one still ended well (a bad request shows a working device). A request given up (``exc`` is
        its reason) is never the device's fault; one abandoned or stopped counts as failed, since the
        router retries it elsewhere."""
        if exc is run.error:
            if not isinstance(exc, (RequestCancelled, DeadlineExceeded, AttemptTimeout)):
                self.metrics.record_failure(1)
            return exc, False
        self.metrics.record_failure(1)
        if isinstance(exc, ConfigError):
            return exc, True
        if isinstance(exc, ModelDoesNotFit):
            return exc, False
        self.health.record_failure(f"{type(exc).__name__}: {exc}")
        return (exc if isinstance(exc, XpuflowError) else self._as_xpuflow(exc)), False

    def _inline_end(
        self, task: asyncio.Task[Any], run: _InlineRun, started: float, ok: bool, *, recorded: bool
    ) -> None:
        """A fast-path request registered under ``task`` has ended: what ``_finish_batch`` does for a
        batch of one (``recorded``: its metrics have the batch's end already, from ``record_alone``)."""
        signal = run.request.cancelled
        assert isinstance(signal, CancelSignal)
        if run.on_cancel is not None:
            signal.remove_callback(run.on_cancel)
            run.on_cancel = None  # it holds the run: a reference cycle left to the garbage collector
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None
        del self._inline[task]
        self._batch_ended(1, work_units(run.request), started, ok, task=task, recorded=recorded)
        run.end()

    def _cancel_inline(self, run: _InlineRun) -> None:
        run.give_up(self._cancelled_error(run.request, "its client went away"))

    def _expire_inline(self, run: _InlineRun) -> None:
        run.give_up(self._deadline_error(run.request))

    def _expire_inline_attempt(self, run: _InlineRun, limit_s: float) -> None:
        run.give_up(AttemptTimeout.after(limit_s))

    async def _run_batch(self, tickets: list[Ticket]) -> None:
        started = self._clock.monotonic()
        ok = False
        try:
            live = [t for t in tickets if not t.done]  # withdrawn while dispatching: skip
            if not live:
                ok = True
                return
            try:
                results = await self._call(live)
            except ConfigError as exc:
                if len(live) == 1:
                    self._fail(live, exc, device_fault=False)
                    ok = True
                    return
                # One bad request must not fail its batch-mates: run each alone.
                for ticket in live:
                    try:
                        self._deliver([ticket], await self._call([ticket]))
                    except ConfigError as single:
                        self._fail([ticket], single, device_fault=False)
                ok = True
                self.health.record_success()
                return
            self._deliver(live, results)
            self.health.record_success()
            ok = True
        except asyncio.CancelledError:
            why = self._abandoned.get(_current())
            if why is not None:  # given up by abandon_in_flight: the worker's own cancel, not its caller's
                self._fail(tickets, self._abandon_error(why), device_fault=False)
                return
            self._fail(
                tickets,
                WorkerStopped(
                    f"worker '{self.worker_id}' stopped while running this request; retry it elsewhere",
                    retry_after_s=0.0,
                ),
                device_fault=False,
            )
            raise
        except ModelDoesNotFit as exc:  # no room to load it now: not the device's fault
            self._fail(tickets, exc, device_fault=False)
        except Exception as exc:
            self._fail(tickets, self._as_xpuflow(exc), device_fault=True)
        finally:
            self._finish_batch(tickets, started, ok)

    def _deliver(self, tickets: Sequence[Ticket], results: Sequence[Result]) -> None:
        if len(results) != len(tickets):
            raise SessionError(
                f"session of worker '{self.worker_id}' returned {len(results)} results for "
                f"{len(tickets)} requests"
            )
        now = self._clock.monotonic()
        self._sync_health()
        for ticket, result in zip(tickets, results, strict=True):
            if ticket.finish(result):
                tokens = result.completion_tokens if isinstance(result, Completion) else 0
                self.metrics.record_request(
                    now - ticket.enqueued_at_s,
                    (ticket.dispatched_at_s or now) - ticket.enqueued_at_s,
                    tokens,
                    started_at_s=ticket.dispatched_at_s,
                )

    def _fail(self, tickets: Sequence[Ticket], exc: BaseException, *, device_fault: bool) -> None:
        failed = sum(1 for t in tickets if t.fail(exc))
        self.metrics.record_failure(failed)
        if device_fault:
            self.health.record_failure(f"{type(exc).__name__}: {exc}")

    def _as_xpuflow(self, exc: Exception) -> XpuflowError:
        if isinstance(exc, XpuflowError):
            return exc
        error = SessionError(f"session of worker '{self.worker_id}' failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    @contextlib.asynccontextmanager
    async def _resident(self, tickets: Sequence[Ticket]) -> AsyncIterator[None]:
        """Hold this worker's model loaded while a batch or stream runs (on-demand deployments); the
        requests of a batch that had to load it are marked ``metadata["cold_start"]``."""
        if self._residency is None:
            yield
            return
        async with self._residency.hold(self.worker_id) as held:
            self.session = held.handle
            if held.cold:
                for ticket in tickets:
                    ticket.request.metadata["cold_start"] = True
            yield

    async def _call(self, tickets: Sequence[Ticket]) -> list[Result]:
        if self._residency is None:  # always loaded: no context manager to enter (every batch pays it)
            return await self._call_loaded(tickets)
        async with self._resident(tickets):
            return await self._call_loaded(tickets)

    async def _call_loaded(self, tickets: Sequence[Ticket]) -> list[Result]:
        requests = [t.request for t in tickets]
        owner = self._owner
        if self._compute_gate is None:
            return await run_batch(self.session, requests, native=self.native_batching, owner=owner)
        async with self._compute_gate():  # the device's compute share: wait for this partition's turn
            return await run_batch(self.session, requests, native=self.native_batching, owner=owner)

    async def _run_stream(self, ticket: Ticket) -> None:
        started = self._clock.monotonic()
        request = ticket.request
        chunks = ticket.chunks
        assert chunks is not None
        ok = False
        try:
            if ticket.done:  # withdrawn before it started
                ok = True
                return
            gate = self._compute_gate() if self._compute_gate is not None else contextlib.nullcontext()
            async with self._resident([ticket]), gate:  # held loaded, and the partition's compute token
                source = open_stream(self.session, request)
                aclose = getattr(source, "aclose", None)
                try:
                    answering = self._answering
                    this = _current()
                    async for chunk in source:
                        if ticket.done or request.cancelled.is_set():
                            break  # the consumer went away: stop the generation
                        chunks.put_nowait(chunk)
                        answering.add(this)
                        if chunk.text:
                            self.metrics.record_tokens(1)
                finally:
                    if aclose is not None:
                        with contextlib.suppress(Exception):
                            await aclose()
            if ticket.finish(None):
                now = self._clock.monotonic()
                self._sync_health()
                self.metrics.record_request(
                    now - ticket.enqueued_at_s,
                    (ticket.dispatched_at_s or now) - ticket.enqueued_at_s,
                    started_at_s=ticket.dispatched_at_s,
                )  # its tokens were counted as they streamed
            self.health.record_success()
            ok = True
        except asyncio.CancelledError:
            why = self._abandoned.get(_current())
            if why is not None:
                self._fail([ticket], self._abandon_error(why), device_fault=False)
                return
            ticket.fail(
                WorkerStopped(
                    f"worker '{self.worker_id}' stopped during this stream; retry it elsewhere",
                    retry_after_s=0.0,
                )
            )
            raise
        except ConfigError as exc:
            self._fail([ticket], exc, device_fault=False)
            ok = True
        except ModelDoesNotFit as exc:
            self._fail([ticket], exc, device_fault=False)
        except Exception as exc:
            self._fail([ticket], self._as_xpuflow(exc), device_fault=True)
        finally:
            self._finish_batch([ticket], started, ok)

    # -- state --------------------------------------------------------------------------------------

    def _sync_health(self) -> None:
        """After the worker came back from being unhealthy, its latency EMAs describe the outage (or
        nothing), not the device: forget them, and ignore samples of work started before it came back."""
        recovered = self.health.recovered_at_s
        if recovered is not None and recovered != self._recovery_seen:
            self._recovery_seen = recovered
            self.metrics.forget_latency(since_s=recovered)

    def snapshot(self) -> WorkerSnapshot:
        """The worker's state now, for the router's scorer. Never raises."""
        self._sync_health()
        state: Mapping[str, Any] = {}
        if self._device_state is not None:
            try:
                state = self._device_state()
            except Exception:  # a failing telemetry read must not break routing
                log.debug("worker %s: device_state failed", self.worker_id, exc_info=True)
        free = state.get("free_memory_bytes")
        if free is None and self.session.resources:
            free = self.session.resources[0].free_memory_bytes
        utilization = state.get("utilization_pct")
        if utilization is None:
            utilization = self.metrics.utilization() * 100.0
        max_seq_len = getattr(self.session, "max_seq_len", None)
        if not isinstance(max_seq_len, int):
            max_seq_len = self._max_seq_len
        now = self._clock.monotonic()
        oldest = min(self._started_at.values(), default=None)
        return WorkerSnapshot.from_fields(
            {
                "worker_id": self.worker_id,
                "deployment": self.deployment,
                "device": self.device,
                "healthy": self.health.healthy,
                "draining": self.draining,
                "queue_depth": len(self._queue),
                "in_flight": self.metrics.in_flight,
                "max_batch_size": self.max_batch_size,
                "max_in_flight": self.max_in_flight,
                # the scorer counts queued work in the batches this worker achieves, not the largest it
                # could form (docs/worker_choice.md): without it, 8 queued on a worker that batches 2 read
                # as one batch ahead instead of four
                "mean_batch_size": self.metrics.mean_batch_size(),
                "ema_service_ms": self.metrics.ema_service_ms,
                "ema_latency_ms": self.metrics.ema_latency_ms,
                "free_memory_bytes": None if free is None else int(free),
                "utilization_pct": float(utilization),
                "temperature_c": state.get("temperature_c"),
                "max_seq_len": max_seq_len if isinstance(max_seq_len, int) else None,
                "taken_at_s": now,
                "tags": self.tags,
                "oldest_in_flight_s": None if oldest is None else max(0.0, now - oldest),
                "latency_sampled_at_s": self.metrics.latency_sampled_at_s,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything the dashboard shows about this worker."""
        return {
            "worker_id": self.worker_id,
            "deployment": self.deployment,
            "device": self.device,
            "health": self.health.state.value,
            "running": self.running,
            "queue_policy": self._queue.policy.value,
            "batching": {
                "policy": "continuous",
                "max_in_flight": self.max_in_flight,
                "in_flight": self.metrics.in_flight,
            }
            if self.max_in_flight is not None
            else self._batcher.to_dict(self._clock.monotonic()),
            "metrics": self.metrics.to_dict(),
        }


class _InlineRun:
    """A request running in its caller's task (``Worker.submit``'s fast path, ``Worker._stream_inline``):
    who gave it up, and why. The task is cancelled only while it is ``waiting`` on the session (a stream's
    consumer may be away, sending a chunk on); the error is there for the stream to raise when it comes
    back."""

    __slots__ = ("_ended", "answering", "error", "on_cancel", "request", "task", "timer", "waiting")

    def __init__(self, task: asyncio.Task[Any], request: WorkRequest, *, waiting: bool = True) -> None:
        self.task = task
        self.request = request
        self.waiting = waiting
        self.answering = False  # a stream that has sent a chunk (abandon_in_flight spares it)
        self.error: XpuflowError | None = None  # set once, by whoever gave it up
        self._ended: asyncio.Future[None] | None = None  # made only when stop() waits for it
        self.on_cancel: Callable[[], object] | None = None  # on its cancel signal (Worker._inline_begin)
        self.timer: deadlines.Cancellable | None = None  # its deadline

    def give_up(self, error: XpuflowError) -> bool:
        """Give it up with ``error`` (cancelling its task if it waits on the session now); False when it
        was given up already."""
        if self.error is not None:
            return False
        self.error = error
        if self.waiting:
            self.task.cancel()
        return True

    def ended(self) -> asyncio.Future[None]:
        if self._ended is None:
            self._ended = self.task.get_loop().create_future()
        return self._ended

    def end(self) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
