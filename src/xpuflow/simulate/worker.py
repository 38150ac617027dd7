"""A simulated worker: xpuflow's own queue, batcher, health tracker and metrics around a device model.

``scheduling.worker.Worker`` runs its batch loop as asyncio tasks that sleep; the simulator has no
tasks and no sleeping, so this adapter drives the same parts (``RequestQueue``, ``Batcher``,
``HealthTracker``, ``WorkerMetrics``) by hand, in the order ``Worker._step`` does, on the virtual
clock. Only the session is replaced: a batch takes the time its ``DeviceModel`` says, scheduled as an
event instead of awaited::

    worker = SimWorker("chat-gpu/0", "chat-gpu", model, clock=clock, schedule=engine.schedule, sink=engine)
    worker.submit(attempt, now_s)      # queue it (raises QueueFull like the real worker)
    worker.step(now_s)                 # ask the batcher; dispatch, or set a wake-up timer
    worker.complete(batch, now_s)      # the scheduled end of a batch

``snapshot`` is ``Worker.snapshot`` as the dispatcher reads it (``service_time_snapshot``: the EMA is
the per-batch service time), plus ``mean_batch_size``, the batch size the worker achieves.

A continuous device model (``continuous: true``) makes the worker what ``Worker`` is over a continuous
session: each request is sent at once, up to ``max_in_flight``, no batches are formed, and a request
runs at the speed of the concurrency it starts with (``DeviceModel.request_timing``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from xpuflow.clock import FakeClock
from xpuflow.errors import SessionError
from xpuflow.policy.snapshot_table import SnapshotTable, snapshot_from_fields
from xpuflow.scheduling.batcher import Action, BatcherConfig, BatchPolicy, make_batcher
from xpuflow.scheduling.health import HealthState, HealthTracker
from xpuflow.scheduling.metrics import WorkerMetrics
from xpuflow.scheduling.queue import QueuePolicy, Ticket, make_queue
from xpuflow.scheduling.request import WorkRequest
from xpuflow.simulate.device_model import DeviceModel
from xpuflow.simulate.faults import KILL_FAIL_S
from xpuflow.types import WorkerSnapshot

__all__ = ["Attempt", "Batch", "SimWorker", "WorkerSink"]

_new_snapshot = object.__new__
_NO_TAGS: frozenset[str] = frozenset()


@dataclass(eq=False, slots=True)
class Attempt:
    """One try of one request on one worker. ``live`` turns False when the dispatcher gave up on it
    (timeout); a result arriving later is then ignored."""

    flight: Any  # the engine's per-request state
    work: WorkRequest
    group: Any
    input_tokens: int
    output_tokens: int
    worker: SimWorker | None = None
    ticket: Ticket | None = None
    started_s: float = 0.0
    live: bool = True


class _Answer:
    """Stands in for the asyncio future of a ``Ticket``: the queue answers a ticket exactly once."""

    __slots__ = ("attempt", "error", "finished")

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt
        self.finished = False
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.finished

    def set_result(self, result: object) -> None:
        self.finished = True

    def set_exception(self, exc: BaseException) -> None:
        self.finished = True
        self.error = exc

    def add_done_callback(self, callback: Callable[[Any], object]) -> None:
        pass


@dataclass(eq=False, slots=True)
class Batch:
    """A batch running on a simulated device."""

    worker: SimWorker
    tickets: list[Ticket]
    started_s: float
    first_token_s: float
    ok: bool
    units: float
    kv_bytes: int
    aborted: bool = False


class WorkerSink(Protocol):
    """What a worker tells the engine about each attempt it ends."""

    def attempt_done(
        self, attempt: Attempt, now_s: float, first_token_s: float, dispatched_s: float
    ) -> None: ...

    def attempt_failed(
        self, attempt: Attempt, now_s: float, error: BaseException, *, retryable: bool
    ) -> None: ...


Schedule = Callable[[float, int, Any], None]
WAKE, COMPLETE = (
    1,
    2,
)  # event kinds this worker schedules (the engine owns the numbering)


@dataclass(eq=False)
class SimWorker:
    """See the module docstring. ``max_batch_size`` is the deployment's, capped by the device model's."""

    worker_id: str
    deployment: str
    model: DeviceModel
    clock: FakeClock
    schedule: Schedule
    sink: WorkerSink
    device: str = "sim"
    max_batch_size: int = 8
    max_seq_len: int | None = None
    queue_capacity: int = 256
    queue_policy: str = QueuePolicy.PRIORITY.value
    aging_s: float = 5.0
    batch_policy: str = BatchPolicy.ADAPTIVE.value
    max_wait_s: float = 0.05
    max_in_flight: int | None = None
    slowdown: float = 1.0
    dead: bool = False
    kv_in_use: int = 0
    busy: list[tuple[float, float]] = field(default_factory=list)
    #: ids of the workers whose health is not HEALTHY, shared by the engine's workers (see note_health)
    not_healthy: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        cap = max(1, min(self.max_batch_size, self.model.max_batch_size))
        if self.model.continuous:
            # as Worker does with a continuous session: each request is sent at once, up to
            # max_in_flight of them, and the worker forms no batches
            self.max_in_flight = self.max_in_flight or cap
            self.max_batch_size = 1
        else:
            self.max_in_flight = None
            self.max_batch_size = cap
        self.queue = make_queue(
            self.queue_policy,
            capacity=self.queue_capacity,
            aging_s=self.aging_s,
            name=f"worker '{self.worker_id}'",
        )
        self.batcher = make_batcher(
            self.batch_policy,
            BatcherConfig(max_batch_size=self.max_batch_size, max_wait_s=self.max_wait_s),
        )
        self.health = HealthTracker(clock=self.clock)
        self.metrics = WorkerMetrics(self.clock)
        self.running: list[Batch] = []
        self.wake_at_s = math.inf
        self._busy_since_s = 0.0
        self._snapshot: WorkerSnapshot | None = None  # dropped on every change the scorer can see
        self._table: SnapshotTable | None = None  # see attach
        self._stale = True  # attached: the row needs a full read (the worker changed since the last)
        self._row = 0
        self._changed_set: set[SimWorker] | None = None
        self._drain_rate_ema: float | None = None
        self._recovery_seen = self.health.recovered_at_s

    # -- inputs -------------------------------------------------------------------------------------

    def submit(self, attempt: Attempt, now_s: float) -> None:
        """Queue an attempt; raises ``QueueFull`` (an ``AdmissionRejected``) when the queue is full."""
        answer: Any = _Answer(attempt)  # the queue only calls done/set_result/set_exception on it
        ticket = Ticket(attempt.work, enqueued_at_s=now_s, group=attempt.group, future=answer)
        try:
            self.queue.push(ticket, now_s)
        except Exception:
            self.metrics.record_rejected()
            raise
        attempt.worker, attempt.ticket, attempt.started_s = self, ticket, now_s
        self.batcher.on_arrival(now_s)
        self._changed()
        self.step(now_s)

    def withdraw(self, attempt: Attempt) -> None:
        """The dispatcher gave up on an attempt: take it out of the queue if it is still there."""
        ticket = attempt.ticket
        if ticket is not None and self.queue.remove(ticket):
            self.metrics.record_dropped("expired")
            self._changed()

    def step(self, now_s: float) -> None:
        """``Worker._step`` until the batcher says wait: dispatch batches or arm the wake-up timer."""
        queue = self.queue
        if self.max_in_flight is not None:
            while self.metrics.in_flight < self.max_in_flight:
                head = queue.head(now_s)
                if head is None:
                    return
                self._launch(queue.take_batch(now_s, 1, head.group), now_s)
            return
        while True:
            # Simulated requests carry no deadline and are never cancelled (the gateway sets a deadline
            # only when a client asks for a timeout), so ``queue.purge`` would find nothing: skipped.
            head = queue.head(now_s)
            if head is None:
                return
            group = head.group
            decision = self.batcher.decide(
                now_s,
                queue.group_size(group),
                queue.group_oldest_s(group),
                cap=self.max_batch_size,
                units=float(head.request.params.max_tokens),
                outstanding=len(queue) + self.metrics.in_flight,
            )
            action = decision.action
            if action is Action.DISPATCH:
                self._launch(queue.take_batch(now_s, decision.size, group), now_s)
                continue
            if action is Action.WAIT and decision.until_s is not None and decision.until_s < self.wake_at_s:
                self.wake_at_s = decision.until_s
                self.schedule(decision.until_s, WAKE, self)
            return

    def wake(self, now_s: float) -> None:
        """The batcher's wait ended (a stale timer is harmless: ``step`` decides again)."""
        if now_s >= self.wake_at_s:
            self.wake_at_s = math.inf
        self.step(now_s)

    def _launch(self, tickets: list[Ticket], now_s: float) -> None:
        if not tickets:
            return
        for ticket in tickets:
            ticket.dispatched_at_s = now_s
        n = len(tickets)
        self.batcher.on_dispatch(now_s, n)
        # on a continuous device a request joins the ones in flight in one running batch
        joined = self.metrics.in_flight if self.max_in_flight is not None else 0
        self.metrics.record_batch_start(n, shares_with=joined)
        attempts = [t.future.attempt for t in tickets]  # type: ignore[attr-defined]
        model = self.model
        kv = 0
        for a in attempts:
            kv += model.memory_needed_bytes(a.input_tokens, a.output_tokens)
        units = float(tickets[0].request.params.max_tokens)
        if self.dead:
            batch = Batch(self, tickets, now_s, now_s + KILL_FAIL_S, False, units, kv)
            end_s = now_s + KILL_FAIL_S
        elif self.max_in_flight is not None:
            one = attempts[0]
            timing = self.model.request_timing(one.input_tokens, one.output_tokens, joined + 1, self.slowdown)
            batch = Batch(self, tickets, now_s, now_s + timing.first_token_s, True, units, kv)
            end_s = now_s + timing.total_s
        else:
            timing = self.model.batch_timing(
                [(a.input_tokens, a.output_tokens) for a in attempts], self.slowdown
            )
            batch = Batch(self, tickets, now_s, now_s + timing.first_token_s, True, units, kv)
            end_s = now_s + timing.total_s
        self.kv_in_use += kv
        if not self.running:
            self._busy_since_s = now_s
        self.running.append(batch)
        self._changed()
        self.schedule(end_s, COMPLETE, batch)

    def complete(self, batch: Batch, now_s: float) -> None:
        """A batch's scheduled end: deliver (or fail) its requests, then ``_finish_batch``."""
        if batch.aborted:
            return
        self._end(batch, now_s, batch.ok, None)
        self.step(now_s)

    def _end(self, batch: Batch, now_s: float, ok: bool, why: str | None) -> None:
        self.running.remove(batch)
        self.kv_in_use -= batch.kv_bytes
        tickets = batch.tickets
        if ok:
            self._sync_health()
            for ticket in tickets:
                answer: _Answer = ticket.future  # type: ignore[assignment]
                answer.attempt.ticket = None  # out of the queue for good (and no cycle left to collect)
                if ticket.finish(None):
                    dispatched = now_s if ticket.dispatched_at_s is None else ticket.dispatched_at_s
                    self.metrics.record_request(
                        now_s - ticket.enqueued_at_s,
                        dispatched - ticket.enqueued_at_s,
                        answer.attempt.output_tokens,
                        started_at_s=ticket.dispatched_at_s,
                    )
                    if answer.attempt.live:
                        self.sink.attempt_done(answer.attempt, now_s, batch.first_token_s, dispatched)
            self.health.record_success()
        else:
            error = SessionError(
                f"worker '{self.worker_id}' {why or 'is down'}: connection refused; retry it elsewhere"
            )
            for ticket in tickets:
                answer = ticket.future  # type: ignore[assignment]
                answer.attempt.ticket = None
                if ticket.fail(error) and answer.attempt.live:
                    self.sink.attempt_failed(answer.attempt, now_s, error, retryable=True)
            self.metrics.record_failure(len(tickets))
            self.health.record_failure(f"SessionError: {error}")
        service_s = now_s - batch.started_s
        self.batcher.on_complete(now_s, len(tickets), service_s if ok else None, batch.units)
        self._sync_health()
        self.metrics.record_batch_end(len(tickets), service_s, ok, started_at_s=batch.started_s)
        if ok and service_s > 0:
            rate = len(tickets) / service_s
            old = self._drain_rate_ema
            self._drain_rate_ema = rate if old is None else old + 0.2 * (rate - old)
            self.queue.drain_rate_per_s = self._drain_rate_ema
        if not self.running:  # busy while anything runs (on a continuous device, requests overlap)
            self.busy.append((self._busy_since_s, now_s))
        self.note_health()

    # -- faults -------------------------------------------------------------------------------------

    def kill(self, now_s: float) -> None:
        """The device is gone: running batches fail now, later ones as soon as they start."""
        self.dead = True
        for batch in list(self.running):
            batch.aborted = True
            self._end(batch, now_s, False, "was killed")
        self.step(now_s)

    def slow(self, factor: float) -> None:
        self.slowdown = factor

    # -- state --------------------------------------------------------------------------------------

    def note_health(self) -> None:
        """Call after anything may have moved this worker's health state: the snapshot is read again
        and ``not_healthy`` (which lets the engine skip health verdicts while all are healthy) follows."""
        self._changed()
        if self.health.state is HealthState.HEALTHY:
            self.not_healthy.discard(self.worker_id)
        else:
            self.not_healthy.add(self.worker_id)

    def _sync_health(self) -> None:
        recovered = self.health.recovered_at_s
        if recovered is not None and recovered != self._recovery_seen:
            self._recovery_seen = recovered
            self.metrics.forget_latency(since_s=recovered)

    @property
    def outstanding(self) -> int:
        """Requests queued or running here."""
        return len(self.queue) + self.metrics.in_flight

    def free_memory_bytes(self) -> int | None:
        if self.model.memory_bytes is None:
            return None
        return max(0, self.model.memory_bytes - self.model.weights_bytes - self.kv_in_use)

    def attach(self, table: SnapshotTable, row: int, changed: set[SimWorker]) -> None:
        """Keep this worker's snapshot in ``table`` at ``row``: from now on the row is the cached
        snapshot, and the worker joins ``changed`` whenever its state changes (its row is then set again
        by the next ``snapshot``: ``refresh_row``)."""
        self._table, self._row, self._changed_set = table, row, changed
        self._changed()

    def _changed(self) -> None:
        self._snapshot = None
        self._stale = True
        if self._changed_set is not None:
            self._changed_set.add(self)

    def set_row(self, now_s: float) -> None:
        """Read this worker in full at ``now_s`` into its table row."""
        assert self._table is not None
        self._table.set(self._row, self._fields(now_s), self.metrics.busy_state())
        self._stale = False

    def reread_row(self, now_s: float) -> None:
        """The table could not re-read this worker's row by itself (a busy interval left the window):
        read the metrics (which drop it) and pass the reading on."""
        assert self._table is not None
        utilization_pct = self.metrics.utilization() * 100.0
        self._table.reread_row(self._row, now_s, utilization_pct, self.metrics.busy_state())

    def snapshot(self, now_s: float, max_age_s: float = 0.05) -> WorkerSnapshot:
        """``service_time_snapshot(worker)`` of the real dispatcher. Reused while nothing the scorer reads
        changed (every change drops it), for at most ``max_age_s`` of simulated time: meanwhile only the
        utilisation goes stale (the scorer ages ``oldest_in_flight_s`` itself) and the snapshot weighs
        ``2 ** (-max_age_s / 5 s)``, 0.993 at 50 ms, in the scorer's staleness blend. Older and unchanged,
        it is read again at ``now_s`` (the time-dependent fields only). Attached to a table, the cached
        snapshot is the table's row, which the table re-reads by itself the same way."""
        table = self._table
        if table is not None:
            if self._stale:
                self.set_row(now_s)
            elif table.reread(now_s, max_age_s, (self._row,)):
                self.reread_row(now_s)
            return table.snapshot(self._row)
        cached = self._snapshot
        if cached is not None:
            age_s = now_s - cached.taken_at_s
            if age_s <= max_age_s:
                return cached
            # Only time moved since: the same state read at now_s. Copying the fields skips the
            # frozen dataclass's __init__ (a third of a full read), which every pick pays per worker.
            fresh = _new_snapshot(WorkerSnapshot)
            fields = fresh.__dict__
            fields.update(cached.__dict__)
            fields["taken_at_s"] = now_s
            fields["utilization_pct"] = self.metrics.utilization() * 100.0
            if cached.oldest_in_flight_s is not None:
                fields["oldest_in_flight_s"] = cached.oldest_in_flight_s + age_s
            self._snapshot = fresh
            return fresh
        return self._read(now_s)

    def _read(self, now_s: float) -> WorkerSnapshot:
        """The snapshot read in full at ``now_s`` (and cached)."""
        snap = snapshot_from_fields(self._fields(now_s))
        self._snapshot = snap
        return snap

    def _fields(self, now_s: float) -> tuple[Any, ...]:
        """What a full read at ``now_s`` gives, as the values of ``WorkerSnapshot``'s fields in order
        (``SNAPSHOT_FIELDS``): the table takes them without an object being built."""
        if self.health.recovered_at_s != self._recovery_seen:
            self._sync_health()
        metrics = self.metrics
        running = self.running
        if running:
            oldest = running[0].started_s
            for batch in running:
                if batch.started_s < oldest:  # noqa: PLR1730 (min() is a call per read)
                    oldest = batch.started_s
            age_s = now_s - oldest
            oldest_age_s: float | None = age_s if age_s > 0.0 else 0.0  # max(0.0, now - oldest)
        else:
            oldest_age_s = None
        service_ms = metrics.ema_service_ms
        return (
            self.worker_id,
            self.deployment,
            self.device,
            self.health.healthy,
            False,  # draining
            len(self.queue),
            metrics.in_flight,
            self.max_batch_size,
            service_ms if service_ms is not None and service_ms > 0 else metrics.ema_latency_ms,
            None if self.model.memory_bytes is None else self.free_memory_bytes(),
            metrics.utilization() * 100.0,
            None,  # temperature_c
            self.max_seq_len,
            now_s,  # taken_at_s
            _NO_TAGS,
            self.max_in_flight,
            oldest_age_s,
            metrics.latency_sampled_at_s,
            metrics.mean_batch_size(),
            None,  # ema_service_ms (the EMA above is the service time)
        )
