"""Which worker inside a tier takes a request: filter -> score -> weighted random among the top k (pure).

The scorer ranks ``WorkerSnapshot``s, the state workers publish; it never calls into a worker. Health
comes in as a precomputed flag per worker (``available``: healthy, or admitting its half-open probe),
and time and randomness are injected::

    scorer = WorkerScorer()
    choice = scorer.choose(snapshots, WorkerNeeds(tokens=900), rng=random.Random(7), now_s=clock.monotonic())
    choice.chosen.worker_id      # "chat-main/1"
    choice.ranked                # every candidate that passed the filter, best first, with its terms
    choice.rejected              # Alternative(candidate, reason) for every worker the filter refused

1. Filter. A worker is refused, with a reason, when it is not available (unhealthy and not admitting a
   probe), draining, cannot hold the request (``needs.tokens > max_seq_len``) or lacks the memory it
   needs (``needs.memory_bytes > free_memory_bytes``, checked only when both are known).
2. Score. Four terms in [0, 1] (1 is best), combined by normalised weights, plus an affinity bonus::

       load_i   = (queue_depth_i + in_flight_i) / capacity_i             batches ahead of this request
       E_i      = max(latency_i, stuck_i) * (1 + load_i + wait_weight * waiting_i)
                                                                         expected time to serve it here
       speed_i  = min_j E_j / E_i                                        relative to the best
       memory_i = free_memory_i / max_j free_memory_j                   headroom for batches and KV cache
       util_i   = 1 - utilization_pct_i / 100
       temp_i   = 1 below throttle_start_c, 0 at throttle_limit_c, linear between
       score_i  = sum_t w_t * term_t / sum_t w_t  +  w_affinity * affinity_i

   ``capacity_i`` is ``max_in_flight`` for a worker whose backend batches by itself (a remote server, a
   continuous session: load is the share of its in-flight slots in use), else the batch size the worker
   achieves (``mean_batch_size``, kept between 1 and ``max_batch_size``) when it reports one, else
   ``max_batch_size``. A worker whose requests rarely share a batch group (different ``max_tokens``)
   serves its queue about one request per batch: counted in full batches, its queue would look several
   times shorter than it is.
   ``wait_weight`` (default 0: ``E`` is the expected completion time) counts the wait before the request
   starts, and so before its first token, that many times more: ``waiting_i`` is ``load_i`` on a worker
   that forms batches, and the requests beyond its free slots over ``max_in_flight`` on one that batches
   by itself (a free slot starts a request at once). Set it for a time-to-first-token SLO: a fast worker
   with a queue then loses to a slower one that starts the request now (docs/worker_choice.md).
   ``ema_service_ms`` (else ``ema_latency_ms``) is the time one batch takes to serve (queue wait excluded:
   the queue is counted by ``load``). ``latency_i`` is that EMA, except that a worker slower than the
   candidates' median ``m`` drifts back toward it with the time since its last sample
   (``latency_sampled_at_s``): ``latency_i = m * (ema_i / m) ** (2 ** (-t / latency_half_life_s))``. A
   worker judged slow gets little traffic and so few new samples; without the drift one bad sample (a cold
   start, a burst of requests stuck through an outage) would starve it for good. With it the worker is
   tried again within a few half-lives and its own samples decide. ``stuck_i`` is the age of the worker's
   oldest request in flight (``oldest_in_flight_s``, aged to ``now_s``): a request running for 3 s says the
   worker now takes at least 3 s, whatever its EMA remembers, so a worker that hangs loses its traffic
   within a fraction of a second, long before a timeout or a health check. A worker with no latency reading
   yet is assumed as fast as the median of those with one; any other unknown reading scores ``NEUTRAL``
   (0.5): worse than a known-good worker, better than a known-bad one.
   Staleness: a snapshot of age ``a = now_s - taken_at_s`` weighs ``f = 2 ** (-a / staleness_half_life_s)``
   and every term is blended ``f * term + (1 - f) * NEUTRAL``, so state that has not been refreshed
   (a remote worker whose poll stalled) ages out toward "nothing known" instead of steering traffic.
3. Choose. A worker admitting its half-open probe (``probes``) takes the request, so the probe happens.
   Otherwise one of the ``top_k`` best is drawn with probability proportional to
   ``exp((score_i - best) / choice_temperature)``: near-equal workers share the traffic (many routers
   reading the same stale numbers do not herd onto one worker) while a clearly worse one is rarely hit.

``docs/worker_choice.md`` explains the choices.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xpuflow.policy.snapshot_table import SnapshotTable
from xpuflow.types import Alternative, WorkerSnapshot, frozen_from_fields

__all__ = [
    "NEUTRAL",
    "Affinity",
    "ScoredWorker",
    "ScoringWeights",
    "WorkerChoice",
    "WorkerNeeds",
    "WorkerScorer",
    "session_affinity",
]

#: The score of a reading nobody has: unknown values and stale state are pulled toward it.
NEUTRAL = 0.5

Affinity = Mapping[str, float] | Callable[[Sequence[WorkerSnapshot]], Mapping[str, float]]
"""Affinity bonus in [0, 1] per worker id, or a function of the candidates (after the filter) giving it.
Use it for prefix-cache or session stickiness; see ``session_affinity``."""

_GIB = float(1 << 30)


@dataclass(frozen=True)
class WorkerNeeds:
    """What one request needs from a worker. Unknown needs (None) are not checked.

    ``tokens`` is the prompt plus the new tokens it may generate, compared with ``max_seq_len``;
    ``memory_bytes`` is the extra memory it needs on the device (its KV cache, a large batch).
    """

    tokens: int | None = None
    memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.tokens is not None and self.tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {self.tokens}")
        if self.memory_bytes is not None and self.memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {self.memory_bytes}")


@dataclass(frozen=True)
class ScoringWeights:
    """Weights of the score's terms. The four state terms are normalised by their sum; ``affinity`` is
    added on top, so 0.3 lets stickiness outweigh a 0.3 difference in the state score.

    Speed (the expected time to serve) is what the client feels, so it dominates; memory headroom,
    utilisation (which sees other tenants of a shared device) and throttling risk are early warnings
    and tie-breakers between workers of similar speed."""

    speed: float = 0.7
    memory: float = 0.1
    utilization: float = 0.1
    temperature: float = 0.1
    affinity: float = 0.3

    def __post_init__(self) -> None:
        for name in ("speed", "memory", "utilization", "temperature", "affinity"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"weight {name} must be a finite number >= 0, got {value}")
        if self.speed + self.memory + self.utilization + self.temperature <= 0:
            raise ValueError(
                "at least one of the speed, memory, utilization, temperature weights must be > 0"
            )


@dataclass(frozen=True, slots=True)
class ScoredWorker:
    """A candidate that passed the filter: its score, each term (after staleness), and its freshness."""

    snapshot: WorkerSnapshot
    score: float
    terms: Mapping[str, float] = field(default_factory=dict)
    freshness: float = 1.0
    probe: bool = False

    @property
    def worker_id(self) -> str:
        return self.snapshot.worker_id

    def explain(self) -> str:
        """The terms as one line, e.g. ``speed 0.92, memory 0.50, utilization 0.50, temperature 0.50``."""
        terms = self.terms
        if tuple(terms) == _FOUR_TERMS:  # the usual four, in score()'s order: one format
            text = (
                f"speed {terms['speed']:.2f}, memory {terms['memory']:.2f}, "
                f"utilization {terms['utilization']:.2f}, temperature {terms['temperature']:.2f}"
            )
        else:
            text = ", ".join(f"{name} {value:.2f}" for name, value in terms.items())
        # the freshness where it reads below 100% (a worker's own snapshot is microseconds old)
        return f"{text}; state {self.freshness:.0%} fresh" if self.freshness < 0.995 else text


_FOUR_TERMS = ("speed", "memory", "utilization", "temperature")

_SCORED_WORKER_SLOTS = (
    object.__new__,
    *(
        ScoredWorker.__dict__[name].__set__  # the slot descriptors, which a frozen class's __setattr__ skips
        for name in ("snapshot", "score", "terms", "freshness", "probe")
    ),
)


@dataclass(frozen=True)
class WorkerChoice:
    """The outcome of ``WorkerScorer.choose``: the chosen worker (None when none passed the filter),
    every passing candidate best first, and every refused worker with its reason."""

    chosen: ScoredWorker | None
    ranked: tuple[ScoredWorker, ...]
    rejected: tuple[Alternative, ...]
    probability: float = 0.0
    reason: str = ""

    def alternatives(self) -> tuple[Alternative, ...]:
        """Every worker not chosen, with why: the ranked ones with their scores, then the refused ones."""
        best = self.chosen.score if self.chosen is not None else None
        lost = tuple(
            Alternative(c.worker_id, f"scored {c.score:.2f} vs {best:.2f} ({c.explain()})", round(c.score, 4))
            for c in self.ranked
            if c is not self.chosen and best is not None
        )
        return lost + self.rejected


def _choice(
    chosen: ScoredWorker,
    ranked: tuple[ScoredWorker, ...],
    rejected: tuple[Alternative, ...],
    probability: float,
    reason: str,
) -> WorkerChoice:
    """``WorkerChoice(chosen, ranked, rejected, probability, reason)`` without the frozen dataclass's
    ``__init__`` (a request's routing builds one)."""
    return frozen_from_fields(
        WorkerChoice,
        {
            "chosen": chosen,
            "ranked": ranked,
            "rejected": rejected,
            "probability": probability,
            "reason": reason,
        },
    )


@dataclass(frozen=True)
class WorkerScorer:
    """Filter, score and choose workers. Immutable settings; every method is a pure function of its
    arguments (the RNG passed to ``choose`` is the only source of randomness)."""

    weights: ScoringWeights = field(default_factory=ScoringWeights)
    top_k: int = 3
    choice_temperature: float = 0.1
    staleness_half_life_s: float = 5.0
    latency_half_life_s: float = 1.0
    throttle_start_c: float = 75.0
    throttle_limit_c: float = 90.0
    wait_weight: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.wait_weight) and self.wait_weight >= 0):
            raise ValueError(f"wait_weight must be a finite number >= 0, got {self.wait_weight}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not self.choice_temperature >= 0:
            raise ValueError(f"choice_temperature must be >= 0, got {self.choice_temperature}")
        if not self.staleness_half_life_s > 0:
            raise ValueError(f"staleness_half_life_s must be > 0, got {self.staleness_half_life_s}")
        if not self.latency_half_life_s > 0:
            raise ValueError(f"latency_half_life_s must be > 0, got {self.latency_half_life_s}")
        if not self.throttle_limit_c > self.throttle_start_c:
            raise ValueError(
                f"throttle_limit_c ({self.throttle_limit_c}) must be above throttle_start_c "
                f"({self.throttle_start_c})"
            )

    # -- 1. filter ------------------------------------------------------------------------------------

    def refusal(
        self, snapshot: WorkerSnapshot, needs: WorkerNeeds | None = None, *, available: bool | None = None
    ) -> str | None:
        """Why this worker cannot take the request, or None when it can. ``available`` overrides the
        snapshot's ``healthy`` flag (pass the health tracker's verdict, probe admission included)."""
        reasons: list[str] = []
        if not (snapshot.healthy if available is None else available):
            reasons.append("unhealthy: it failed recently and gets a probe only after its cooldown")
        if snapshot.draining:
            reasons.append("draining: it finishes its queue and takes no new requests")
        if needs is not None:
            if (
                needs.tokens is not None
                and snapshot.max_seq_len is not None
                and needs.tokens > snapshot.max_seq_len
            ):
                reasons.append(f"needs {needs.tokens} tokens but its max_seq_len is {snapshot.max_seq_len}")
            free = snapshot.free_memory_bytes
            if needs.memory_bytes is not None and free is not None and needs.memory_bytes > free:
                reasons.append(
                    f"needs {needs.memory_bytes / _GIB:.2f} GiB but {snapshot.device} has "
                    f"{free / _GIB:.2f} GiB free"
                )
        return "; ".join(reasons) if reasons else None

    def filter(
        self,
        snapshots: Sequence[WorkerSnapshot],
        needs: WorkerNeeds | None = None,
        *,
        available: Mapping[str, bool] | None = None,
    ) -> tuple[list[WorkerSnapshot], list[Alternative]]:
        """Split the workers into those that can take the request and the refused ones with reasons."""
        passed: list[WorkerSnapshot] = []
        rejected: list[Alternative] = []
        tokens = None if needs is None else needs.tokens
        memory = None if needs is None else needs.memory_bytes
        for snapshot in snapshots:
            flag = None if available is None else available.get(snapshot.worker_id, snapshot.healthy)
            # the checks of ``refusal``, inline: this runs for every worker on every request
            max_seq_len = snapshot.max_seq_len
            free = snapshot.free_memory_bytes
            if (
                (snapshot.healthy if flag is None else flag)
                and not snapshot.draining
                and (tokens is None or max_seq_len is None or tokens <= max_seq_len)
                and (memory is None or free is None or memory <= free)
            ):
                passed.append(snapshot)
            else:
                reason = self.refusal(snapshot, needs, available=flag)
                rejected.append(Alternative(snapshot.worker_id, reason or "refused"))
        return passed, rejected

    # -- 2. score -------------------------------------------------------------------------------------

    def freshness(self, snapshot: WorkerSnapshot, now_s: float | None) -> float:
        """Weight of the snapshot's readings: 1 when just taken, halving every ``staleness_half_life_s``."""
        if now_s is None:
            return 1.0
        age_s = max(0.0, now_s - snapshot.taken_at_s)
        return float(2.0 ** (-age_s / self.staleness_half_life_s))

    def latency_ms(self, snapshot: WorkerSnapshot, typical_ms: float, now_s: float | None) -> float:
        """The latency the score uses: the EMA (``typical_ms`` when unknown), drifting geometrically back
        toward ``typical_ms`` from above with the time since its last sample."""
        ema = _ema(snapshot.ema_service_ms or snapshot.ema_latency_ms, typical_ms)
        sampled_at = snapshot.latency_sampled_at_s
        if ema <= typical_ms or typical_ms <= 0 or now_s is None or sampled_at is None:
            return ema
        weight = 2.0 ** (-max(0.0, now_s - sampled_at) / self.latency_half_life_s)
        return float(typical_ms * (ema / typical_ms) ** weight)

    def _temperature_term(self, temperature_c: float | None) -> float:
        if temperature_c is None:
            return NEUTRAL
        span = self.throttle_limit_c - self.throttle_start_c
        return _clamp((self.throttle_limit_c - temperature_c) / span)

    def score(
        self,
        candidates: Sequence[WorkerSnapshot],
        *,
        now_s: float | None = None,
        affinity: Affinity | None = None,
        probes: Collection[str] = (),
    ) -> list[ScoredWorker]:
        """Score workers that passed the filter; best first (ties keep the input order).

        Terms are relative to the other candidates, so scores compare within one call only.
        """
        if not candidates:
            return []
        # The terms of ``latency_ms``, ``freshness``, the load, ``_stuck_ms``, ``_memory_term`` and
        # ``_temperature_term``, inline and in the same arithmetic (``x if x > 0.0 else 0.0`` is
        # ``max(0.0, x)`` and the conditionals are ``_clamp``, without a call): this runs for every
        # candidate of every request on the gateway's hot path. ``test_worker_scorer_equivalence``
        # holds it to the code it replaced: the same choices, scores and terms.
        # the per-batch service time when the worker reports one, else its latency EMA (docs/worker_choice.md)
        known_ema = [
            ema for s in candidates if (ema := s.ema_service_ms or s.ema_latency_ms) is not None and ema > 0
        ]
        prior_ema = _median(known_ema) if known_ema else 1.0
        half_life = self.latency_half_life_s
        wait_weight = self.wait_weight
        drifts = not (prior_ema <= 0 or now_s is None)
        expected: list[float] = []
        append = expected.append
        for s in candidates:
            ema = s.ema_service_ms or s.ema_latency_ms
            if ema is None or ema <= 0:
                ema = prior_ema
            elif drifts and ema > prior_ema and (sampled_at := s.latency_sampled_at_s) is not None:
                since_s = now_s - sampled_at  # type: ignore[operator]  # drifts: now_s is set
                weight = 2.0 ** (-(since_s if since_s > 0.0 else 0.0) / half_life)
                ema = float(prior_ema * (ema / prior_ema) ** weight)
            age_s = s.oldest_in_flight_s
            if age_s is not None:
                later_s = 0.0 if now_s is None else now_s - s.taken_at_s
                stuck = (age_s + (later_s if later_s > 0.0 else 0.0)) * 1000.0
                if stuck > ema:  # noqa: PLR1730 (max() costs a call per candidate)
                    ema = stuck
            max_in_flight = s.max_in_flight
            capacity: float = max_in_flight or s.max_batch_size
            achieved = s.mean_batch_size
            if achieved is not None and not max_in_flight:
                achieved = achieved if achieved > 1.0 else 1.0
                if achieved < capacity:  # noqa: PLR1730 (min() costs a call per candidate)
                    capacity = achieved
            outstanding = s.queue_depth + s.in_flight
            load = (outstanding if outstanding > 0 else 0) / (capacity if capacity > 1 else 1)
            if wait_weight:
                # the wait before it starts, in batches of this worker's (one slot of a continuous
                # worker frees every ema / max_in_flight), counted wait_weight more times
                if max_in_flight:
                    ahead = outstanding + 1 - max_in_flight
                    waiting = (ahead if ahead > 0 else 0) / max_in_flight
                else:
                    waiting = load
                append(ema * (1.0 + load) + wait_weight * (ema * waiting))
            else:
                append(ema * (1.0 + load))
        best_expected = min(expected)
        known_free = [free for s in candidates if (free := s.free_memory_bytes) is not None]
        max_free = max(known_free) if known_free else 0
        bonus = _affinity_bonus(affinity, candidates)
        w = self.weights
        w_affinity = w.affinity
        state_weight = w.speed + w.memory + w.utilization + w.temperature
        w_speed, w_memory, w_util, w_temp = w.speed, w.memory, w.utilization, w.temperature
        staleness_half_life = self.staleness_half_life_s
        limit_c = self.throttle_limit_c
        span_c = limit_c - self.throttle_start_c
        new, set_snapshot, set_score, set_terms, set_fresh, set_probe = _SCORED_WORKER_SLOTS
        scored: list[ScoredWorker] = []
        keep = scored.append
        for snapshot, expected_i in zip(candidates, expected, strict=True):
            age_s = 0.0 if now_s is None else now_s - snapshot.taken_at_s
            fresh = float(2.0 ** (-age_s / staleness_half_life)) if age_s > 0.0 else 1.0
            speed = best_expected / expected_i if expected_i > 0 else 1.0
            free = snapshot.free_memory_bytes
            if free is None:
                memory = NEUTRAL
            elif max_free > 0:
                memory = free / max_free
                memory = 0.0 if memory < 0.0 else 1.0 if memory > 1.0 else memory
            else:
                memory = 0.0
            util = snapshot.utilization_pct
            if util is None:
                utilization = NEUTRAL
            else:
                util = util / 100.0
                utilization = 1.0 - (0.0 if util < 0.0 else 1.0 if util > 1.0 else util)
            temperature_c = snapshot.temperature_c
            if temperature_c is None:
                temperature = NEUTRAL
            else:
                temperature = (limit_c - temperature_c) / span_c
                temperature = 0.0 if temperature < 0.0 else 1.0 if temperature > 1.0 else temperature
            if fresh < 1.0:
                stale = (1.0 - fresh) * NEUTRAL
                speed = fresh * speed + stale
                memory = fresh * memory + stale
                utilization = fresh * utilization + stale
                temperature = fresh * temperature + stale
            state = (
                w_speed * speed + w_memory * memory + w_util * utilization + w_temp * temperature
            ) / state_weight
            terms = {"speed": speed, "memory": memory, "utilization": utilization, "temperature": temperature}
            worker_id = snapshot.worker_id
            sticky = bonus.get(worker_id, 0.0) if bonus else 0.0
            if sticky:
                terms["affinity"] = sticky
            # ``ScoredWorker(snapshot, score, terms, fresh, probe)`` without the frozen dataclass's
            # __init__ (half the cost of a candidate); the object is the same
            one = new(ScoredWorker)
            set_snapshot(one, snapshot)
            set_score(one, state + w_affinity * sticky)
            set_terms(one, terms)
            set_fresh(one, fresh)
            set_probe(one, worker_id in probes)
            keep(one)
        keys = [-c.score for c in scored]
        return [scored[i] for i in sorted(range(len(scored)), key=keys.__getitem__)]

    # -- 3. choose ------------------------------------------------------------------------------------

    def choose(
        self,
        snapshots: Sequence[WorkerSnapshot],
        needs: WorkerNeeds | None = None,
        *,
        rng: random.Random,
        available: Mapping[str, bool] | None = None,
        probes: Collection[str] = (),
        now_s: float | None = None,
        affinity: Affinity | None = None,
    ) -> WorkerChoice:
        """Filter, score, then pick: a probe candidate first, else a draw among the ``top_k`` best.

        ``available`` maps worker id to the health verdict (missing ids use ``snapshot.healthy``);
        ``probes`` names workers that were just admitted for their half-open probe (they must be
        ``available`` too). ``now_s`` is the same monotonic clock as ``taken_at_s`` (None: all fresh).
        """
        passed, rejected = self.filter(snapshots, needs, available=available)
        ranked = tuple(self.score(passed, now_s=now_s, affinity=affinity, probes=probes))
        if not ranked:
            return WorkerChoice(None, (), tuple(rejected), 0.0, "no worker passed the filter")
        probe = next((c for c in ranked if c.probe), None) if probes else None
        if probe is not None:
            return WorkerChoice(
                probe,
                ranked,
                tuple(rejected),
                1.0,
                f"{probe.worker_id} takes the half-open probe after its cooldown",
            )
        top = ranked[: self.top_k]
        if len(top) == 1:
            # the draw among one: its weight is 1 whatever the score (the random number is still taken,
            # so that a seeded generator runs the same sequence as through _draw)
            rng.random()
            chosen = top[0]
            reason = f"{chosen.worker_id} is the only worker that can take it ({chosen.explain()})"
            return _choice(chosen, ranked, tuple(rejected), 1.0, reason)
        weights = self.selection_weights([c.score for c in top])
        index = _draw(rng, weights)
        chosen = top[index]
        probability = weights[index] / sum(weights)
        reason = (
            f"{chosen.worker_id} scored {chosen.score:.2f} ({chosen.explain()}); drawn among the "
            f"top {len(top)} with probability {probability:.2f}"
        )
        return _choice(chosen, ranked, tuple(rejected), probability, reason)

    def choose_rows(
        self,
        table: SnapshotTable,
        rows: tuple[int, ...] | None,
        needs: WorkerNeeds | None = None,
        *,
        rng: random.Random,
        now_s: float,
    ) -> int | None:
        """``choose`` over a ``SnapshotTable``'s rows (``rows``; None: all, in order) when every worker's
        health verdict is its snapshot's ``healthy`` flag and no probe or affinity applies, as on most
        requests: the chosen row, or None when none passed the filter. The scores are computed in C
        with this scorer's arithmetic; the choice and the random draw are those of ``choose`` over
        ``[table.snapshot(row) for row in rows]`` (tests/policy/test_snapshot_table.py holds it to that).
        It builds no ranking nor explanation, which is what makes it fast over many workers."""
        params = self.__dict__.get("_table_params")
        if params is None:  # the settings as the C scoring takes them, once per (immutable) scorer
            w = self.weights
            params = (
                w.speed,
                w.memory,
                w.utilization,
                w.temperature,
                w.affinity,
                self.latency_half_life_s,
                self.staleness_half_life_s,
                self.throttle_start_c,
                self.throttle_limit_c,
                self.choice_temperature,
                self.wait_weight,
            )
            self.__dict__["_table_params"] = params
        if needs is None:
            top = table.top(rows, now_s, None, None, self.top_k, params)
        else:
            top = table.top(rows, now_s, needs.tokens, needs.memory_bytes, self.top_k, params)
        if top is None:  # a NaN score: Python's sort places it, so let choose() rank them
            order = range(table.size) if rows is None else rows
            snapshots = [table.snapshot(row) for row in order]
            chosen = self.choose(snapshots, needs, rng=rng, now_s=now_s).chosen
            if chosen is None:
                return None
            return next(row for row, s in zip(order, snapshots, strict=True) if s is chosen.snapshot)
        best_rows, _, weights = top  # weights: selection_weights(scores), computed in C
        return best_rows[_draw(rng, weights)] if best_rows else None

    def selection_weights(self, scores: Sequence[float]) -> list[float]:
        """Relative draw weights for scores (best first): ``exp((s - best) / choice_temperature)``.
        A temperature of 0 draws uniformly among the workers tied for the best score."""
        best = max(scores)
        if self.choice_temperature == 0:
            return [1.0 if s >= best else 0.0 for s in scores]
        return [math.exp((s - best) / self.choice_temperature) for s in scores]


def session_affinity(key: str) -> Callable[[Sequence[WorkerSnapshot]], Mapping[str, float]]:
    """Sticky routing for a session or prompt prefix by rendezvous (highest-random-weight) hashing.

    Of the candidates that passed the filter, the one with the highest ``hash(key, worker_id)`` gets a
    bonus of 1. Adding or losing a worker moves only the keys that hashed to it, so prefix caches stay
    warm; when the favourite is filtered out, the key moves to its runner-up, still deterministically.
    """

    def affinity(candidates: Sequence[WorkerSnapshot]) -> Mapping[str, float]:
        if not candidates:
            return {}
        favourite = max(candidates, key=lambda s: _hrw(key, s.worker_id))
        return {favourite.worker_id: 1.0}

    return affinity


# -- helpers ----------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def _clamp(value: float) -> float:
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


def _ema(ema: float | None, prior_ms: float) -> float:
    return ema if ema is not None and ema > 0 else prior_ms


def _stuck_ms(snapshot: WorkerSnapshot, now_s: float | None) -> float:
    """How long its oldest request in flight has been running, in ms, at ``now_s`` (0: none)."""
    age_s = snapshot.oldest_in_flight_s
    if age_s is None:
        return 0.0
    later_s = 0.0 if now_s is None else max(0.0, now_s - snapshot.taken_at_s)
    return (age_s + later_s) * 1000.0


def _memory_term(free: int | None, max_free: int) -> float:
    if free is None:
        return NEUTRAL
    return _clamp(free / max_free) if max_free > 0 else 0.0


def _affinity_bonus(affinity: Affinity | None, candidates: Sequence[WorkerSnapshot]) -> Mapping[str, float]:
    if affinity is None:
        return {}
    values: Mapping[str, Any] = affinity(candidates) if callable(affinity) else affinity
    return {worker: _clamp(float(v)) for worker, v in values.items() if math.isfinite(float(v))}


def _hrw(key: str, worker_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{worker_id}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def _draw(rng: random.Random, weights: Sequence[float]) -> int:
    total = sum(weights)
    point = rng.random() * total
    for index, weight in enumerate(weights):
        point -= weight
        if point < 0:
            return index
    return max(range(len(weights)), key=lambda i: weights[i])  # rounding left a sliver: take the heaviest
