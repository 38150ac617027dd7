"""Send a request to a worker of its tier, retry on others with backoff, then fall to the next tier.

The tier router decides the order of tiers; the ``Dispatcher`` picks a worker inside each with the
``WorkerScorer`` and sees the request through::

    dispatcher = Dispatcher(policy=RetryPolicy(max_retries=2, attempt_timeout_s=30))
    done = await dispatcher.dispatch([("tier_high", high_workers), ("tier_low", low_workers)], request)
    done.result                 # the Completion (or embeddings)
    done.decision.worker        # "chat-main/2": tier, worker, device, reason, failed attempts, ...

    stream = await dispatcher.open_stream(tiers, request)   # returns once the first chunk has arrived
    async with stream:
        async for chunk in stream: ...                       # may raise StreamInterrupted

The contract:

- A retryable failure (a session or backend error, ``RemoteError(retryable=True)``, a full queue, an
  attempt that ran past ``attempt_timeout_s``) moves the request to the next-best *other* worker of the
  same tier after an exponential backoff with jitter, at most ``max_retries`` times per tier; then to
  the next tier. ``max_attempts`` bounds one round over the tiers.
- Outages of every worker: a tier whose workers are all unhealthy is tried anyway (panic: its best
  worker takes the request), and when a round has failed on every worker tried while every worker of
  every tier is failing, the request goes round again after the backoff, for up to ``outage_retry_s``
  (or its deadline), so a few seconds of every upstream answering 500 cost latency, not errors.
- A non-retryable error (``ConfigError``, ``RemoteError(retryable=False)``, anything carrying a 4xx
  status other than 408/429, ``CapabilityError``) is the client's problem: it is raised at once, as is.
- Nothing accepted is lost: every call ends with a result or a ``DispatchError`` naming each worker
  tried and why it failed, and each worker refused and why (``DispatchTimeout`` when the request's
  ``deadline_s`` passed; ``AdmissionRejected`` when every worker tried had a full queue).
- Health: workers record their own successes and failures; the dispatcher only asks
  ``health.available()`` (spending a half-open probe on a worker only when the scorer will choose it),
  records the timeouts it enforces itself (a hung worker never reports), and settles a probe the worker
  left open.
- A client that goes away (the task is cancelled, or ``request.cancelled`` is set, which the worker
  answers with ``RequestCancelled``) ends the call with ``CancelledError``: nothing is retried for nobody.
- Streams: a stream that fails before its first chunk is retried like any request, invisibly to the
  client. After the first chunk the client has seen output, so a failure ends the stream with
  ``StreamInterrupted`` (which names the worker and how many chunks got through).

The pieces: the retry policy, attempts and errors live in ``routing.retry``; the started stream
(``DispatchedStream``) in ``routing.dispatch_stream``. This module keeps the ``Dispatcher`` (worker
choice and the retry loop) and re-exports their public names, so import them from here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, cast

from xpuflow.backends.base import StreamChunk
from xpuflow.clock import Clock, SystemClock
from xpuflow.errors import (
    AdmissionRejected,
    DispatchError,
    DispatchTimeout,
    ModelDoesNotFit,
    RemoteError,
    StreamInterrupted,
    XpuflowError,
)
from xpuflow.policy.worker_scorer import Affinity, WorkerChoice, WorkerNeeds, WorkerScorer
from xpuflow.routing.dispatch_stream import DispatchedStream, _aclose, _first
from xpuflow.routing.retry import (
    Attempt,
    Dispatched,
    Result,
    RetryPolicy,
    _attempt_timeout,
    _AttemptTimeout,
    _describe,
    _within,
    is_retryable,
)
from xpuflow.scheduling.health import HealthState, HealthTracker
from xpuflow.scheduling.request import WorkRequest
from xpuflow.scheduling.worker import Worker
from xpuflow.types import Alternative, RoutingDecision, WorkerSnapshot, frozen_from_fields

__all__ = [
    "Attempt",
    "DispatchError",
    "DispatchTarget",
    "DispatchTimeout",
    "Dispatched",
    "DispatchedStream",
    "Dispatcher",
    "RetryPolicy",
    "StreamInterrupted",
    "Tiers",
    "is_retryable",
    "service_time_snapshot",
]

T = TypeVar("T")


class DispatchTarget(Protocol):
    """What the dispatcher needs of a worker (``scheduling.worker.Worker`` and remote workers have it)."""

    @property
    def worker_id(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def health(self) -> HealthTracker: ...

    async def submit(self, request: WorkRequest) -> Result: ...

    def stream(self, request: WorkRequest) -> AsyncIterator[StreamChunk]: ...

    def snapshot(self) -> WorkerSnapshot: ...


Tiers = Sequence[tuple[str, Sequence[DispatchTarget]]] | Mapping[str, Sequence[DispatchTarget]]
"""Tiers in the order to try them (the preferred one first), each with its workers."""


@dataclass
class _Pick:
    """The worker chosen in ``tier``, and the scorer's choice (None: it was the sole worker, not scored)."""

    tier: str
    target: DispatchTarget
    choice: WorkerChoice | None

    @property
    def probe(self) -> bool:
        choice = self.choice
        return choice is not None and choice.chosen is not None and choice.chosen.probe


@dataclass
class _Progress:
    """What one request has been through so far."""

    attempts: list[Attempt] = field(default_factory=list)
    rejected: dict[str, Alternative] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)


def service_time_snapshot(worker: DispatchTarget) -> WorkerSnapshot:
    """``worker.snapshot()``, the default ``snapshot_of`` of the dispatcher. The scorer reads the
    worker's per-batch service time from it (``ema_service_ms``, before ``ema_latency_ms``).

    The scorer multiplies the latency by the batches queued ahead (docs/worker_choice.md), so it wants
    the time to serve a batch, without queue wait. An end-to-end latency counts the queue twice, and
    worse: a worker that was briefly swamped keeps a high latency EMA, gets little traffic because of
    it, and so gets no new samples to bring it down, while the others take its share.
    """
    return worker.snapshot()


_CLIENT_GONE = "the client cancelled the request"


class Dispatcher:
    """Worker choice, retries and failover for one request at a time (it keeps no per-request state,
    so one dispatcher serves any number of concurrent requests)."""

    def __init__(
        self,
        *,
        scorer: WorkerScorer | None = None,
        policy: RetryPolicy | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        snapshot_of: Callable[[DispatchTarget], WorkerSnapshot] | None = None,
    ) -> None:
        """``snapshot_of`` reads a worker's state for the scorer (default ``service_time_snapshot``);
        pass one that overlays a remote deployment's polled state (``routing.remote_state``)."""
        self.scorer = scorer or WorkerScorer()
        self.policy = policy or RetryPolicy()
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self._snapshot_of = snapshot_of or service_time_snapshot
        # the decision for a sole worker served at once, per worker id: (worker, tier, tier decision, it)
        self._sole: dict[str, tuple[DispatchTarget, str, RoutingDecision | None, RoutingDecision]] = {}

    # -- public API -----------------------------------------------------------------------------------

    async def dispatch(
        self,
        tiers: Tiers,
        request: WorkRequest,
        *,
        needs: WorkerNeeds | None = None,
        affinity: Affinity | None = None,
        tier_decision: RoutingDecision | None = None,
    ) -> Dispatched:
        """Serve ``request`` on the best available worker, retrying and failing over as documented above.

        ``tier_decision`` (the tier router's) is folded into the returned decision's reason and
        alternatives. Raises the worker's error for non-retryable failures, else ``DispatchError``.
        """
        progress = _Progress()

        def attempt(target: DispatchTarget, timeout_s: float | None) -> Awaitable[Result]:
            local: object = target
            if type(local) is Worker:  # exactly a local Worker: it keeps the attempt's limit itself
                # (one timer where it had two, and no coroutine between this and its call)
                return cast("Awaitable[Result]", local.submit(request, attempt_timeout_s=timeout_s))
            # the coroutine itself, none around it
            return _within(target.submit(request), timeout_s)

        pick, result = await self._run(tiers, request, needs, affinity, progress, attempt)
        # Dispatched(result, decision, attempts) without the frozen dataclass's __init__
        return frozen_from_fields(
            Dispatched,
            {
                "result": result,
                "decision": self._decision(pick, progress, tier_decision),
                "attempts": tuple(progress.attempts),
            },
        )

    async def open_stream(
        self,
        tiers: Tiers,
        request: WorkRequest,
        *,
        needs: WorkerNeeds | None = None,
        affinity: Affinity | None = None,
        tier_decision: RoutingDecision | None = None,
    ) -> DispatchedStream:
        """Start a streamed generation; returns once the first chunk has arrived (so the decision is
        known before the client sees a byte). Failures before that are retried like ``dispatch``."""
        progress = _Progress()

        async def attempt(
            target: DispatchTarget, timeout_s: float | None
        ) -> tuple[StreamChunk | None, AsyncIterator[StreamChunk]]:
            iterator = target.stream(request)
            try:
                first = await _within(_first(iterator), timeout_s)
            except BaseException:
                await _aclose(iterator)
                raise
            return first, iterator

        pick, (first, iterator) = await self._run(tiers, request, needs, affinity, progress, attempt)
        decision = self._decision(pick, progress, tier_decision)
        return DispatchedStream(
            decision,
            first,
            iterator,
            pick,
            request,
            tuple(progress.attempts),
            self.policy.stream_idle_timeout_s,
        )

    # -- the retry loop -------------------------------------------------------------------------------

    async def _run(
        self,
        tiers: Tiers,
        request: WorkRequest,
        needs: WorkerNeeds | None,
        affinity: Affinity | None,
        progress: _Progress,
        attempt: Callable[[DispatchTarget, float | None], Awaitable[T]],
    ) -> tuple[_Pick, T]:
        tier_list = list(tiers.items()) if isinstance(tiers, Mapping) else tiers
        if request.cancelled.is_set():
            raise asyncio.CancelledError(_CLIENT_GONE)
        began = self.clock.monotonic()
        if not tier_list:
            return await self._retry(tier_list, request, needs, affinity, progress, attempt, began, None)
        # The first attempt, what most requests have and all they have: the first tier's best worker, the
        # loop's first turn without its bookkeeping (``_retry`` has it). When it fails, ``_retry`` goes on
        # from there exactly as if it had made this attempt itself.
        tier, workers = tier_list[0]
        deadline_s = request.deadline_s
        remaining = None if deadline_s is None else deadline_s - began
        if remaining is not None and remaining <= 0:
            raise self._failure(request, progress, deadline=True)
        pick, rejected = self._pick(tier, workers, needs, affinity, began)
        if rejected:
            for alternative in rejected:
                progress.rejected.setdefault(f"{tier}/{alternative.candidate}", alternative)
        if pick is None:  # the first tier can take it nowhere: the loop goes on to the next
            return await self._retry(tier_list, request, needs, affinity, progress, attempt, began, None)
        target = pick.target
        probe = pick.probe
        timeout_s, by_deadline = _attempt_timeout(self.policy.attempt_timeout_s, remaining)
        try:
            result = await attempt(target, timeout_s)
        except asyncio.CancelledError:
            if probe:
                self._settle_probe(target, "the client went away during the probe")
            raise
        except Exception as exc:
            self._failed(exc, request, progress, tier, target, probe, by_deadline, began, 0.0)
            tried = {target.worker_id}
            return await self._retry(tier_list, request, needs, affinity, progress, attempt, began, tried)
        self._served(progress, tier, target, probe, began, 0.0)
        return pick, result

    async def _retry(
        self,
        tier_list: Sequence[tuple[str, Sequence[DispatchTarget]]],
        request: WorkRequest,
        needs: WorkerNeeds | None,
        affinity: Affinity | None,
        progress: _Progress,
        attempt: Callable[[DispatchTarget, float | None], Awaitable[T]],
        began: float,
        first_tried: set[str] | None,
    ) -> tuple[_Pick, T]:
        """The retry loop over the tiers, from the start (``first_tried`` None) or after a first attempt
        on the first tier that failed on the workers in ``first_tried`` (its backoff comes first)."""
        policy = self.policy
        backoff_due = first_tried is not None
        before = errors_before = 0  # the round's first attempt and error
        while True:
            # one pass over the tiers: the pick and result, or on to the outage check when every try failed
            for tier, workers in tier_list:
                tried: set[str] = set()
                if first_tried is not None:
                    tried, first_tried = first_tried, None
                while (
                    len(tried) <= policy.max_retries and len(progress.attempts) - before < policy.max_attempts
                ):
                    if request.cancelled.is_set():
                        raise asyncio.CancelledError(_CLIENT_GONE)
                    untried = [w for w in workers if w.worker_id not in tried]
                    if not untried:
                        break  # nobody left to wait for in this tier
                    backoff = 0.0
                    if backoff_due:
                        backoff = policy.backoff_s(len(progress.attempts), self.rng)
                        remaining = self._remaining_s(request)
                        await self.clock.sleep(
                            backoff if remaining is None else max(0.0, min(backoff, remaining))
                        )
                        backoff_due = False
                    remaining = self._remaining_s(request)
                    if remaining is not None and remaining <= 0:
                        raise self._failure(request, progress, deadline=True)
                    pick, rejected = self._pick(tier, untried, needs, affinity, self.clock.monotonic())
                    for alternative in rejected:
                        progress.rejected.setdefault(f"{tier}/{alternative.candidate}", alternative)
                    if pick is None:
                        break
                    target = pick.target
                    tried.add(target.worker_id)
                    probe = pick.probe
                    timeout_s, by_deadline = _attempt_timeout(policy.attempt_timeout_s, remaining)
                    start = self.clock.monotonic()
                    try:
                        result = await attempt(target, timeout_s)
                    except asyncio.CancelledError:
                        if probe:
                            self._settle_probe(target, "the client went away during the probe")
                        raise
                    except Exception as exc:
                        self._failed(exc, request, progress, tier, target, probe, by_deadline, start, backoff)
                        backoff_due = True
                        continue
                    self._served(progress, tier, target, probe, start, backoff)
                    return pick, result
            # a round may try no one while every worker cools down or another request holds the
            # probe: during an outage that is a reason to wait and look again, not to fail. A full
            # queue is load, not a failure: it never makes an outage (the 429 goes out at once)
            failures = zip(progress.attempts[before:], progress.errors[errors_before:], strict=True)
            tried = {
                a.worker for a, exc in failures if not isinstance(exc, (AdmissionRejected, ModelDoesNotFit))
            }
            if not self._outage(tier_list, began, request, tried):
                raise self._failure(request, progress, deadline=False)
            backoff_due = True  # every worker failed: wait, then try them all again
            before, errors_before = len(progress.attempts), len(progress.errors)

    def _served(
        self,
        progress: _Progress,
        tier: str,
        target: DispatchTarget,
        probe: bool,
        start: float,
        backoff: float,
    ) -> None:
        """Account for the attempt that served the request (a probe's success settles its worker)."""
        if probe:
            self._settle_probe(target, None)
        # Attempt(tier, worker, device, elapsed_s, backoff_s, None, probe) without the frozen dataclass's
        # __init__
        progress.attempts.append(
            frozen_from_fields(
                Attempt,
                {
                    "tier": tier,
                    "worker": target.worker_id,
                    "device": target.device,
                    "elapsed_s": self.clock.monotonic() - start,
                    "backoff_s": backoff,
                    "error": None,
                    "probe": probe,
                },
            )
        )

    def _failed(
        self,
        exc: Exception,
        request: WorkRequest,
        progress: _Progress,
        tier: str,
        target: DispatchTarget,
        probe: bool,
        by_deadline: bool,
        start: float,
        backoff: float,
    ) -> None:
        """Account for an attempt that raised ``exc``; raise what ends the request (the client went
        away, or a failure no other worker can mend), else return for a retry."""
        if request.cancelled.is_set():
            # The worker dropped it because the client went away: nobody to retry for.
            if probe:
                self._settle_probe(target, "the client went away during the probe")
            raise asyncio.CancelledError(_CLIENT_GONE) from exc
        timed_out = isinstance(exc, _AttemptTimeout)
        if timed_out and self.policy.record_timeouts and not by_deadline:
            # A hung worker never reports its own failure; the timeout is the evidence.
            target.health.record_failure(f"timed out: {exc}")
        retryable = timed_out or is_retryable(exc)
        if probe:
            # A refused request (bad input) still shows the worker answering.
            self._settle_probe(target, _describe(exc) if retryable else None)
        elapsed = self.clock.monotonic() - start
        progress.attempts.append(
            Attempt(tier, target.worker_id, target.device, elapsed, backoff, _describe(exc), probe)
        )
        progress.errors.append(exc)
        if not retryable:
            raise exc

    def _outage(
        self,
        tier_list: Sequence[tuple[str, Sequence[DispatchTarget]]],
        began: float,
        request: WorkRequest,
        tried: set[str],
    ) -> bool:
        """Whether to go round the tiers again after a round whose every try failed: every worker of
        every tier is failing now (one this round ``tried`` failed it just now, whatever a health check
        said meanwhile; any other is unhealthy or its last request failed), and the request has waited
        less than ``outage_retry_s`` and has time left before its deadline. A health check that passes
        while requests fail (a server whose ``/health`` answers and whose model errors) must not end
        the retries of the requests it fails."""
        if self.clock.monotonic() - began >= self.policy.outage_retry_s:
            return False
        remaining = self._remaining_s(request)
        if remaining is not None and remaining <= 0:
            return False
        workers = [w for _, tier_workers in tier_list for w in tier_workers]
        return bool(workers) and all(
            w.worker_id in tried
            or w.health.state is not HealthState.HEALTHY
            or w.health.consecutive_failures > 0
            for w in workers
        )

    def _pick(
        self,
        tier: str,
        workers: Sequence[DispatchTarget],
        needs: WorkerNeeds | None,
        affinity: Affinity | None,
        now_s: float,
    ) -> tuple[_Pick | None, tuple[Alternative, ...]]:
        """Score the workers not tried yet; spend a half-open probe only on a worker the scorer will take.

        A sole worker that can take the request (healthy, not draining, no needs to check) is not
        scored: with nothing to compare, the scorer would take it whatever its state says, so its
        snapshot and scores are not worth their cost on every request (the decision says why it went
        there). Only a local ``Worker`` goes this way, whose ``draining`` is what its snapshot says."""
        if needs is None and len(workers) == 1:
            only = workers[0]
            local: object = only  # exactly a Worker: a subclass may answer its snapshot otherwise
            if type(local) is Worker and only.health.state is HealthState.HEALTHY and not local.draining:
                return _Pick(tier, only, None), ()
        snapshot_of = self._snapshot_of
        snapshots = [snapshot_of(w) for w in workers]
        available: dict[str, bool] = {}
        probes: set[str] = set()
        for worker, snapshot in zip(workers, snapshots, strict=True):
            health = worker.health
            if health.state is HealthState.HEALTHY:
                available[worker.worker_id] = True  # what available() answers for it, without its lock
            elif probes or self.scorer.refusal(snapshot, needs, available=True) is not None:
                # available() may move it to PROBING: allow one probe per pick, and only on a worker
                # that can take this request, or the probe would never be sent and it would stay shut.
                available[worker.worker_id] = False
            else:
                available[worker.worker_id] = health.available()
                if available[worker.worker_id] and health.state is HealthState.PROBING:
                    probes.add(worker.worker_id)
        choice = self.scorer.choose(
            snapshots, needs, rng=self.rng, available=available, probes=probes, now_s=now_s, affinity=affinity
        )
        if choice.chosen is None and any(
            self.scorer.refusal(s, needs, available=True) is None for s in snapshots
        ):
            # Panic (Envoy's panic threshold): every worker that could take it is unhealthy. Failing
            # everything until a cooldown ends would turn a blip of the whole tier into an outage of
            # the service; try the best of them anyway, with the retries' backoff bounding the load.
            everyone = dict.fromkeys(available, True)
            panic = self.scorer.choose(
                snapshots, needs, rng=self.rng, available=everyone, now_s=now_s, affinity=affinity
            )
            if panic.chosen is not None:
                reason = (
                    f"panic: every worker of tier {tier} is unhealthy, so the best is tried anyway; "
                    f"{panic.reason}"
                )
                choice = dataclasses.replace(panic, reason=reason)
        chosen = choice.chosen
        if chosen is None:
            return None, choice.rejected
        # the worker whose snapshot was chosen (one per worker, in the same order)
        chosen_snapshot = chosen.snapshot
        target = next(w for w, s in zip(workers, snapshots, strict=True) if s is chosen_snapshot)
        return _Pick(tier, target, choice), choice.rejected

    @staticmethod
    def _settle_probe(target: DispatchTarget, error: str | None) -> None:
        """A probe must end healthy or unhealthy: settle the one sent here if the worker did not."""
        health = target.health
        if health.state is HealthState.PROBING:
            if error is None:
                health.record_success()
            else:
                health.record_failure(error)

    def _remaining_s(self, request: WorkRequest) -> float | None:
        if request.deadline_s is None:
            return None
        return request.deadline_s - self.clock.monotonic()

    # -- outcomes -------------------------------------------------------------------------------------

    def _failure(self, request: WorkRequest, progress: _Progress, *, deadline: bool) -> XpuflowError:
        attempts = [a.describe() for a in progress.attempts]
        refused = [f"{key}: {alt.reason}" for key, alt in progress.rejected.items()]
        reasons = attempts + refused
        detail = "; ".join(reasons) if reasons else "no tier has workers"
        if deadline:
            error: XpuflowError = DispatchTimeout(
                f"request {request.request_id} passed its deadline after {len(attempts)} attempt(s): "
                f"{detail}",
                reasons=reasons,
                attempts=progress.attempts,
            )
        elif progress.errors and all(isinstance(e, AdmissionRejected) for e in progress.errors):
            retry_after = min(e.retry_after_s for e in progress.errors if isinstance(e, AdmissionRejected))
            error = AdmissionRejected(
                f"every worker tried for request {request.request_id} is full ({detail}); "
                f"retry after {retry_after:g} s",
                retry_after_s=retry_after,
            )
        elif progress.errors and all(isinstance(e, ModelDoesNotFit) for e in progress.errors):
            retry_after = min(e.retry_after_s for e in progress.errors if isinstance(e, ModelDoesNotFit))
            error = ModelDoesNotFit(
                f"no worker tried for request {request.request_id} has room to load its model now "
                f"({detail}); retry after {retry_after:g} s",
                retry_after_s=retry_after,
                reasons=reasons,
            )
        elif progress.errors and all(
            isinstance(e, RemoteError) and e.status is not None and (e.status == 429 or e.status >= 500)
            for e in progress.errors
        ):
            # every try was refused by an upstream server: the client gets what it said (429 with its
            # Retry-After, or a 5xx as 502), not a generic 503 of this gateway
            last = progress.errors[-1]
            assert isinstance(last, RemoteError)
            limited = [e for e in progress.errors if isinstance(e, RemoteError) and e.status == 429]
            status = 429 if len(limited) == len(progress.errors) else last.status
            waits = [e.retry_after_s for e in limited if e.retry_after_s is not None]
            error = RemoteError(
                f"request {request.request_id}: every upstream tried refused it: {detail}",
                status=status,
                retryable=True,
                retry_after_s=min(waits) if waits else None,
            )
        elif progress.attempts:
            error = DispatchError(
                f"request {request.request_id} failed on every worker tried: {detail}",
                reasons=reasons,
                attempts=progress.attempts,
            )
        else:
            error = DispatchError(
                f"no worker can take request {request.request_id}: {detail}", reasons=reasons
            )
        if progress.errors:
            error.__cause__ = progress.errors[-1]
        return error

    def _decision(
        self, pick: _Pick, progress: _Progress, tier_decision: RoutingDecision | None
    ) -> RoutingDecision:
        attempts = progress.attempts
        if pick.choice is None and len(attempts) == 1 and not progress.rejected:
            # a sole worker that served at the first attempt: the same decision every time, made once
            # (it is immutable) per worker, tier and tier decision
            target = pick.target
            cached = self._sole.get(target.worker_id)
            if (
                cached is not None
                and cached[0] is target
                and cached[1] == pick.tier
                and cached[2] is tier_decision
            ):
                return cached[3]
            decision = self._explain(pick, progress, tier_decision)
            self._sole[target.worker_id] = (target, pick.tier, tier_decision, decision)
            return decision
        return self._explain(pick, progress, tier_decision)

    def _explain(
        self, pick: _Pick, progress: _Progress, tier_decision: RoutingDecision | None
    ) -> RoutingDecision:
        choice = pick.choice
        attempts = progress.attempts
        # the last attempt served: with one attempt (most requests) none failed
        failed = [a for a in attempts if a.error is not None] if len(attempts) > 1 else []
        alternatives: list[Alternative] = []
        if choice is None:
            reason = f"{pick.target.worker_id} is the only worker that can take it"
            score: float | None = None
            confidence = probability = 1.0
            probe = False
            terms: dict[str, float] = {}
        else:
            chosen = choice.chosen
            assert chosen is not None  # a scored _Pick always has a chosen worker
            reason = choice.reason
            score = round(chosen.score, 4)
            confidence = max(0.0, min(1.0, chosen.score))
            probability = round(choice.probability, 4)
            probe = chosen.probe
            terms = {k: round(v, 4) for k, v in chosen.terms.items()}
            if len(choice.ranked) > 1 or choice.rejected:
                alternatives += choice.alternatives()
        if failed:
            reason += f", after {len(failed)} failed attempt(s): " + "; ".join(a.describe() for a in failed)
            alternatives[:0] = [
                Alternative(a.worker, f"attempt failed in {a.tier}: {a.error}") for a in failed
            ]
        if tier_decision is not None:
            reason = f"tier {pick.tier}: {tier_decision.reason}; worker {reason}"
        if progress.rejected:
            listed = {a.candidate for a in alternatives}
            alternatives += [a for a in progress.rejected.values() if a.candidate not in listed]
        if tier_decision is not None and tier_decision.alternatives:
            alternatives += tier_decision.alternatives
        return RoutingDecision.from_fields(
            {
                "device": pick.target.device,
                "reason": reason,
                "confidence": confidence,
                "alternatives": tuple(alternatives),
                "precision": None,
                "use_amp": False,
                "estimated_memory_bytes": None,
                "strategy": None,
                "tier": pick.tier,
                "worker": pick.target.worker_id,
                "details": {
                    "rule": tier_decision.details.get("rule") if tier_decision is not None else None,
                    "score": score,
                    "probability": probability,
                    "attempts": len(attempts),
                    "probe": probe,
                    "terms": terms,
                },
            }
        )
