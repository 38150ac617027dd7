"""The discrete-event loop: a trace through xpuflow's routing and scheduling code on a virtual clock.

Nothing sleeps. Events (arrivals, the end of a batch, a batcher's wake-up, a retry's backoff, an
attempt's timeout, a fault) are taken in time order from a heap; the ``FakeClock`` that every real
component reads (health trackers, metrics, the tier router's SLA circuits) is moved to each event's
time before it is handled::

    sim = Simulation(fleet, requests, policy=PolicyName.XPUFLOW, seed=7, faults=[parse_kill("big/0@30")])
    result = sim.run()
    result.e2e_s, result.ttft_s, result.outcomes, result.busy

The path of one request is the gateway's: the tier rule chain (``AdaptiveRouter``: complexity, VRAM
headroom, latency SLA, default) orders the tiers of a multi-tier model; in each tier the worker is
picked as ``routing.dispatch.Dispatcher._pick`` picks it (health verdicts, one half-open probe per
pick, the panic rule when every worker is unhealthy) and chosen by ``WorkerScorer.choose`` (or a
baseline, ``simulate.policies``); a failure or a full queue is retried on another worker of the tier
after ``RetryPolicy.backoff_s``, then on the next tier, then, in an outage, round the tiers again.
The dispatcher is asyncio code, so its loop is mirrored here event by event (an adapter, like
``simulate.worker``); the decisions themselves are the real objects'.

A trace has token counts but no text, so the complexity score the tier rules read is a length proxy:
``min(1, input_tokens / 4096)``.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from xpuflow.backends.base import GenerationParams
from xpuflow.clock import FakeClock
from xpuflow.errors import AdmissionRejected
from xpuflow.policy.snapshot_table import SnapshotTable
from xpuflow.policy.worker_scorer import WorkerNeeds, WorkerScorer
from xpuflow.routing.adaptive import AdaptiveRouter, RoutingConfig, TierConfig
from xpuflow.routing.retry import RetryPolicy
from xpuflow.scheduling.health import HealthState
from xpuflow.scheduling.request import RequestKind, WorkRequest
from xpuflow.simulate.faults import Fault, FaultKind, check_workers
from xpuflow.simulate.fleet import Fleet
from xpuflow.simulate.policies import PolicyName, WorkerPolicy, make_policy
from xpuflow.simulate.trace import SimRequest
from xpuflow.simulate.worker import COMPLETE, WAKE, Attempt, Batch, SimWorker
from xpuflow.telemetry.vram import VRAMMonitor

__all__ = ["OUTCOMES", "SimResult", "Simulation"]

RETRY, FAULT = 4, 5
OUTCOMES = ("ok", "error", "rejected", "timeout")
_LENGTH_SCALE_TOKENS = 4096.0


class _PresetScorer:
    """The tier router's complexity scorer: returns the score the engine set for the request at hand."""

    def __init__(self) -> None:
        self.next_score = 0.0

    def score(self, prompt: str) -> float:
        return self.next_score


@dataclass(eq=False, slots=True)
class _Flight:
    """One request on its way through the dispatcher."""

    index: int
    request: SimRequest
    work: WorkRequest
    group: Any
    needs: WorkerNeeds
    tiers: list[tuple[str, list[SimWorker]]]
    arrival_s: float
    tier_index: int = 0
    tried: set[str] = field(default_factory=set)
    attempts: int = 0
    round_first: int = 0
    only_admission: bool = True
    probe: bool = False


@dataclass
class SimResult:
    """Per request (in trace order): arrival, TTFT, end-to-end and queue seconds (NaN unless served),
    outcome (one of ``OUTCOMES``), worker; per worker: busy intervals; and the run's span."""

    policy: str
    arrival_s: list[float]
    ttft_s: list[float]
    e2e_s: list[float]
    queue_s: list[float]
    outcomes: list[str]
    worker: list[str]
    busy: dict[str, list[tuple[float, float]]]
    span_s: float
    events: int
    faults: list[str]


class Simulation:
    """One run of ``requests`` (arrivals divided by ``scale``... multiplied rate) over ``fleet``."""

    def __init__(
        self,
        fleet: Fleet,
        requests: Sequence[SimRequest],
        *,
        policy: PolicyName | str = PolicyName.XPUFLOW,
        seed: int = 0,
        scale: float = 1.0,
        faults: Sequence[Fault] = (),
        scorer: WorkerScorer | None = None,
        snapshot_max_age_s: float = 0.05,
        sample: int | None = None,
        columnar: bool | None = None,
    ) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if sample is not None and sample < 1:
            raise ValueError(f"sample must be >= 1 (or None: every worker), got {sample}")
        self.sample = sample
        self.fleet = fleet
        self.requests = requests
        self.policy = PolicyName(policy)
        self.scale = scale
        self.faults = list(faults)
        self.clock = FakeClock(0.0)
        self.rng = random.Random(seed)
        self.scorer = scorer or WorkerScorer(wait_weight=fleet.wait_weight)
        self.snapshot_max_age_s = snapshot_max_age_s
        self._baseline: WorkerPolicy | None = (
            None if self.policy is PolicyName.XPUFLOW else make_policy(self.policy)
        )
        self.retry = RetryPolicy(max_retries=fleet.max_retries)
        self.attempt_timeout_s = max((d.timeout_s for d in fleet.deployments.values()), default=120.0)
        self._heap: list[tuple[float, int, int, Any]] = []
        self._timeouts: deque[tuple[float, Attempt]] = deque()
        self._seq = 0
        self.workers: dict[str, SimWorker] = {}
        self._not_healthy: set[str] = set()
        for dep in fleet.deployments.values():
            for worker_id in dep.worker_ids():
                self.workers[worker_id] = SimWorker(
                    worker_id, dep.name, dep.model, self.clock, self.schedule, self,
                    device=f"sim:{dep.model.name}", max_batch_size=dep.max_batch_size,
                    max_seq_len=dep.max_seq_len, queue_capacity=dep.queue_capacity,
                    queue_policy=dep.queue_policy, aging_s=dep.aging_s, batch_policy=dep.batch_policy,
                    max_wait_s=dep.max_wait_s, max_in_flight=dep.max_in_flight, not_healthy=self._not_healthy,
                )  # fmt: skip
        check_workers(self.faults, self.workers)
        self.tiers = [
            (name, [w for w in self.workers.values() if w.deployment in deps]) for name, deps in fleet.tiers
        ]
        if not any(workers for _, workers in self.tiers):
            raise ValueError(f"model '{fleet.model_name}' has no workers (every replica count is 0)")
        self._kv_per_token = {
            name: max((fleet.deployments[d].model.kv_bytes_per_token for d in deps), default=0)
            for name, deps in fleet.tiers
        }
        # The snapshots as columns (policy.snapshot_table), scored in C: the same choices as scoring
        # snapshot objects, several times faster over dozens of workers. Only for the scorer itself
        # (a subclass may choose its own way) and where the extension was built (None: then).
        if columnar is None:
            columnar = SnapshotTable.available()
        self._table: SnapshotTable | None = None
        self._changed: set[SimWorker] = set()
        self._by_row: list[SimWorker] = []
        self._rows: dict[int, tuple[list[SimWorker], tuple[int, ...] | None, frozenset[SimWorker]]] = {}
        if columnar and self._baseline is None and type(self.scorer) is WorkerScorer:
            self._table = SnapshotTable(len(self.workers))
            self._by_row = list(self.workers.values())
            for row, worker in enumerate(self._by_row):
                worker.attach(self._table, row, self._changed)
        self._params: dict[int, tuple[GenerationParams, tuple[Any, ...]]] = {}
        self._complexity = _PresetScorer()
        self.router = self._router() if len(self.tiers) > 1 else None
        n = len(requests)
        nan = math.nan
        self._ttft, self._e2e, self._queue = [nan] * n, [nan] * n, [nan] * n
        self._outcome = ["error"] * n
        self._worker = [""] * n
        self._events = 0

    def _router(self) -> AdaptiveRouter:
        refs = self.fleet.tier_refs
        configs = [
            TierConfig(
                name=ref.name,
                min_score=ref.min_score if 0 < i < len(refs) - 1 else None,
                vram_headroom_gb=ref.vram_headroom_gb,
                latency_sla_ms=ref.latency_sla_ms,
            )
            for i, ref in enumerate(refs)
        ]
        config = RoutingConfig(**{**self.fleet.routing, "tiers": configs, "vram_source": "none"})
        return AdaptiveRouter(config, scorer=self._complexity, monitor=VRAMMonitor(None), clock=self.clock)

    # -- the loop -------------------------------------------------------------------------------------

    def schedule(self, at_s: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at_s, self._seq, kind, payload))

    def run(self) -> SimResult:
        """Replay every request; returns when the last one has ended (served or failed)."""
        for fault in self.faults:
            self.schedule(fault.at_s, FAULT, fault)
        heap, clock, timeouts = self._heap, self.clock, self._timeouts
        requests, scale = self.requests, self.scale
        arrivals = [r.arrival_s / scale for r in requests]
        n, i = len(requests), 0
        pop, inf = heapq.heappop, math.inf
        # the FakeClock's time is set directly (advance() checks, and this is the hot path), never back
        while True:
            while timeouts and not timeouts[0][1].live:
                timeouts.popleft()  # answered long before its timeout: most are
            arrival = arrivals[i] if i < n else inf
            at_s = heap[0][0] if heap else inf
            timeout_s = timeouts[0][0] if timeouts else inf
            if timeout_s < at_s and timeout_s < arrival:
                now = clock._now
                if timeout_s > now:
                    clock._now = now = timeout_s
                self._timeout(timeouts.popleft()[1], now)
            elif at_s < arrival:
                _, _, kind, payload = pop(heap)
                now = clock._now
                if at_s > now:
                    clock._now = now = at_s
                if kind == COMPLETE:
                    batch: Batch = payload
                    batch.worker.complete(batch, now)
                elif kind == WAKE:
                    payload.wake(now)
                elif kind == RETRY:
                    self._try(payload, now)
                elif kind == FAULT:
                    self._fault(payload, now)
            elif i < n:
                now = clock._now
                if arrival > now:
                    clock._now = now = arrival
                self._arrive(i, requests[i], now)
                i += 1
            else:
                break
            self._events += 1
        return SimResult(
            self.policy.value,
            arrivals,
            self._ttft,
            self._e2e,
            self._queue,
            self._outcome,
            self._worker,
            {w.worker_id: w.busy for w in self.workers.values()},
            clock.monotonic(),
            self._events,
            [f.describe() for f in self.faults],
        )

    def _fault(self, fault: Fault, now: float) -> None:
        worker = self.workers[fault.worker]
        if fault.kind is FaultKind.KILL:
            worker.kill(now)
        else:
            worker.slow(fault.factor)

    # -- the dispatcher ---------------------------------------------------------------------------------

    def _arrive(self, index: int, request: SimRequest, now: float) -> None:
        tokens = request.input_tokens + request.output_tokens
        shared = self._params.get(request.output_tokens)
        if shared is None:  # immutable: one per distinct max_tokens, with its batch group
            params = GenerationParams(max_tokens=request.output_tokens)
            group = (
                RequestKind.CHAT,
                False,
                params.temperature,
                params.top_p,
                params.stop,
                params.seed,
                params.max_tokens,
            )
            shared = self._params[request.output_tokens] = (params, group)
        params, group = shared
        work = WorkRequest(
            RequestKind.CHAT,
            None,
            params,
            priority=request.priority,
            request_id=f"req-{index}",
        )
        tiers = self.tiers
        if self.router is not None:
            self._complexity.next_score = min(1.0, request.input_tokens / _LENGTH_SCALE_TOKENS)
            chosen = self.router.route("")
            tiers = [t for t in tiers if t[0] == chosen] + [t for t in tiers if t[0] != chosen]
        kv = self._kv_per_token[tiers[0][0]] * tokens
        needs = WorkerNeeds(tokens=tokens, memory_bytes=kv or None)
        flight = _Flight(index, request, work, group, needs, tiers, now)
        self._try(flight, now)

    def _try(self, flight: _Flight, now: float) -> None:
        """The dispatcher's round, from where this request is: pick, submit, or move on."""
        policy = self.retry
        while True:
            if flight.tier_index >= len(flight.tiers):
                if self._outage(flight, now):
                    flight.tier_index, flight.tried, flight.round_first = (
                        0,
                        set(),
                        flight.attempts,
                    )
                    self.schedule(now + policy.backoff_s(flight.attempts, self.rng), RETRY, flight)
                    return
                self._finish(
                    flight,
                    "rejected" if flight.only_admission and flight.attempts else "error",
                )
                return
            workers = flight.tiers[flight.tier_index][1]
            if (
                len(flight.tried) > policy.max_retries
                or flight.attempts - flight.round_first >= policy.max_attempts
            ):
                flight.tier_index, flight.tried = flight.tier_index + 1, set()
                continue
            tried = flight.tried
            untried = [w for w in workers if w.worker_id not in tried] if tried else workers
            worker, probe = self._pick(untried, flight.needs, now)
            if worker is None:
                flight.tier_index, flight.tried = flight.tier_index + 1, set()
                continue
            flight.tried.add(worker.worker_id)
            flight.attempts += 1
            flight.probe = probe
            request = flight.request
            attempt = Attempt(
                flight,
                flight.work,
                flight.group,
                request.input_tokens,
                request.output_tokens,
            )
            try:
                worker.submit(attempt, now)
            except AdmissionRejected as exc:
                attempt.worker = worker
                self._failed(attempt, now, exc, retryable=True, admission=True)
                return
            flight.only_admission = False
            # attempts start in time order with one timeout, so their deadlines queue in order
            self._timeouts.append((now + self.attempt_timeout_s, attempt))
            return

    def _outage(self, flight: _Flight, now: float) -> bool:
        if flight.attempts == 0 or now - flight.arrival_s >= self.retry.outage_retry_s:
            return False
        workers = [w for _, ws in flight.tiers for w in ws]
        return bool(workers) and all(
            w.health.state is not HealthState.HEALTHY or w.health.consecutive_failures > 0 for w in workers
        )

    def _fits(self, worker: SimWorker, needs: WorkerNeeds) -> bool:
        if needs.tokens is not None and worker.max_seq_len is not None and needs.tokens > worker.max_seq_len:
            return False
        free = worker.free_memory_bytes()
        return not (needs.memory_bytes is not None and free is not None and needs.memory_bytes > free)

    def _pick(
        self, workers: list[SimWorker], needs: WorkerNeeds, now: float
    ) -> tuple[SimWorker | None, bool]:
        """``Dispatcher._pick``: health verdicts (one probe per pick, only on a worker that fits), the
        choice, and the panic rule. With ``sample``, the verdicts and the choice are first taken on that
        many of the workers drawn at random, and on all of them only when none of those can take it."""
        if self.sample is not None and len(workers) > self.sample:
            drawn = self.rng.sample(workers, self.sample)
            chosen, probe = self._pick_among(drawn, needs, now, panic=False)
            if chosen is not None:
                return chosen, probe
        return self._pick_among(workers, needs, now, panic=True)

    def _pick_among(
        self, workers: list[SimWorker], needs: WorkerNeeds, now: float, *, panic: bool
    ) -> tuple[SimWorker | None, bool]:
        not_healthy = self._not_healthy
        available: dict[str, bool] | None = None  # all healthy: each snapshot's flag is the verdict
        probes: set[str] = set()
        if not_healthy and any(w.worker_id in not_healthy for w in workers):
            verdicts: dict[str, bool] = {}
            for worker in workers:
                health = worker.health
                if health.state is HealthState.HEALTHY:
                    verdicts[worker.worker_id] = True
                elif probes or not self._fits(worker, needs):
                    verdicts[worker.worker_id] = False
                else:
                    ok = health.available()
                    worker.note_health()
                    verdicts[worker.worker_id] = ok
                    if ok and health.state is HealthState.PROBING:
                        probes.add(worker.worker_id)
            available = verdicts
        chosen = self._choose(workers, needs, available, probes, now)
        if chosen is None and panic and any(self._fits(w, needs) for w in workers):
            everyone = {w.worker_id: True for w in workers}
            chosen = self._choose(workers, needs, everyone, set(), now)  # panic
        if chosen is None:
            return None, False
        return chosen, chosen.worker_id in probes

    def _choose(
        self,
        workers: list[SimWorker],
        needs: WorkerNeeds,
        available: dict[str, bool] | None,
        probes: set[str],
        now: float,
    ) -> SimWorker | None:
        if self._baseline is None:
            max_age_s = self.snapshot_max_age_s
            if self._table is not None and available is None and not probes:
                return self._choose_rows(workers, needs, now)
            snapshots = [w.snapshot(now, max_age_s) for w in workers]
            choice = self.scorer.choose(
                snapshots,
                needs,
                rng=self.rng,
                available=available,
                probes=probes,
                now_s=now,
            )
            if choice.chosen is None:
                return None
            return self.workers[choice.chosen.worker_id]
        fits = self._fits
        if available is None:
            candidates = [w for w in workers if fits(w, needs)]
        else:
            candidates = [w for w in workers if available[w.worker_id] and fits(w, needs)]
        if not candidates:
            return None
        for worker in candidates:
            if worker.worker_id in probes:
                return worker
        return self._baseline.choose(candidates, self.rng, now)

    def _choose_rows(self, workers: list[SimWorker], needs: WorkerNeeds, now: float) -> SimWorker | None:
        """``_choose`` over the snapshot table: the rows of workers whose state changed are set again
        (read in full now, as ``snapshot`` reads them), the others re-read if older than the maximum age
        (by the table, or by their worker when a busy interval left its window), then scored."""
        table, max_age_s = self._table, self.snapshot_max_age_s
        assert table is not None
        entry = self._rows.get(id(workers))
        if entry is None or entry[0] is not workers:
            listed = tuple(w._row for w in workers)
            entry = (workers, None if listed == tuple(range(table.size)) else listed, frozenset(workers))
            if workers in (tier for _, tier in self.tiers):  # the tier lists live as long as the run
                self._rows[id(workers)] = entry
        _, rows, members = entry
        changed = self._changed
        if changed:
            if rows is None:  # every worker: all of them
                for worker in changed:
                    if worker._stale:
                        worker.set_row(now)
                changed.clear()
            else:
                for worker in [w for w in changed if w in members]:
                    changed.discard(worker)
                    if worker._stale:
                        worker.set_row(now)
        by_row = self._by_row
        for row in table.reread(now, max_age_s, rows):
            by_row[row].reread_row(now)
        chosen = self.scorer.choose_rows(table, rows, needs, rng=self.rng, now_s=now)
        return None if chosen is None else by_row[chosen]

    def _settle_probe(self, flight: _Flight, worker: SimWorker | None, error: str | None) -> None:
        if flight.probe and worker is not None and worker.health.state is HealthState.PROBING:
            if error is None:
                worker.health.record_success()
            else:
                worker.health.record_failure(error)
            worker.note_health()

    # -- outcomes of attempts (the workers call these) ------------------------------------------------

    def attempt_done(self, attempt: Attempt, now_s: float, first_token_s: float, dispatched_s: float) -> None:
        if not attempt.live:
            return
        attempt.live = False
        flight: _Flight = attempt.flight
        self._settle_probe(flight, attempt.worker, None)
        i = flight.index
        self._ttft[i] = first_token_s - flight.arrival_s
        self._e2e[i] = now_s - flight.arrival_s
        self._queue[i] = dispatched_s - attempt.started_s
        self._worker[i] = attempt.worker.worker_id if attempt.worker is not None else ""
        self._outcome[i] = "ok"
        if self.router is not None:
            self.router.observe(flight.tiers[flight.tier_index][0], self._e2e[i] * 1000.0)

    def attempt_failed(
        self, attempt: Attempt, now_s: float, error: BaseException, *, retryable: bool
    ) -> None:
        self._failed(attempt, now_s, error, retryable=retryable, admission=False)

    def _failed(
        self,
        attempt: Attempt,
        now: float,
        error: BaseException,
        *,
        retryable: bool,
        admission: bool,
    ) -> None:
        if not attempt.live:
            return
        attempt.live = False
        flight: _Flight = attempt.flight
        if not admission:
            flight.only_admission = False
        self._settle_probe(flight, attempt.worker, str(error) if retryable else None)
        if not retryable:
            self._finish(flight, "timeout" if isinstance(error, TimeoutError) else "error")
            return
        self.schedule(now + self.retry.backoff_s(flight.attempts, self.rng), RETRY, flight)

    def _timeout(self, attempt: Attempt, now: float) -> None:
        if not attempt.live:
            return
        worker = attempt.worker
        if worker is not None:
            worker.withdraw(attempt)
            worker.health.record_failure(f"timed out after {self.attempt_timeout_s:g} s")
            worker.note_health()
        self._failed(
            attempt,
            now,
            TimeoutError("attempt timed out"),
            retryable=True,
            admission=False,
        )

    def _finish(self, flight: _Flight, outcome: str) -> None:
        self._outcome[flight.index] = outcome
