"""The worker scorer as it was before its speed work (commit 26eb2c7), kept verbatim as the oracle of
``test_worker_scorer_equivalence``: every later change to ``WorkerScorer`` that only makes it faster must
give the same choices, rankings, scores and terms as this, and draw the same random numbers."""

# ruff: noqa
# mypy: ignore-errors

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence

from xpuflow.policy.worker_scorer import (
    NEUTRAL,
    Affinity,
    ScoredWorker,
    WorkerChoice,
    WorkerNeeds,
    WorkerScorer,
)
from xpuflow.types import Alternative, WorkerSnapshot


class ReferenceScorer(WorkerScorer):
    """``WorkerScorer`` with its filter, score, choose and selection weights as of commit 26eb2c7."""

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
        # ``max(0.0, x)`` without a call): this runs for every candidate of every request on the
        # gateway's hot path.
        known_ema = [ema for s in candidates if (ema := s.ema_latency_ms) is not None and ema > 0]
        prior_ema = _median(known_ema) if known_ema else 1.0
        half_life = self.latency_half_life_s
        expected: list[float] = []
        for s in candidates:
            ema = s.ema_latency_ms
            if ema is None or ema <= 0:
                ema = prior_ema
            sampled_at = s.latency_sampled_at_s
            if not (ema <= prior_ema or prior_ema <= 0 or now_s is None or sampled_at is None):
                since_s = now_s - sampled_at
                weight = 2.0 ** (-(since_s if since_s > 0.0 else 0.0) / half_life)
                ema = float(prior_ema * (ema / prior_ema) ** weight)
            age_s = s.oldest_in_flight_s
            if age_s is not None:
                later_s = 0.0 if now_s is None else now_s - s.taken_at_s
                stuck = (age_s + (later_s if later_s > 0.0 else 0.0)) * 1000.0
                if stuck > ema:  # noqa: PLR1730 (max() costs a call per candidate)
                    ema = stuck
            capacity: float = s.max_in_flight or s.max_batch_size
            achieved = s.mean_batch_size
            if achieved is not None and not s.max_in_flight:
                capacity = min(capacity, max(1.0, achieved))
            outstanding = s.queue_depth + s.in_flight
            load = (outstanding if outstanding > 0 else 0) / (capacity if capacity > 1 else 1)
            expected.append(ema * (1.0 + load))
        best_expected = min(expected)
        known_free = [s.free_memory_bytes for s in candidates if s.free_memory_bytes is not None]
        max_free = max(known_free) if known_free else 0
        bonus = _affinity_bonus(affinity, candidates)
        w = self.weights
        w_speed, w_memory, w_util, w_temp = w.speed, w.memory, w.utilization, w.temperature
        state_weight = w_speed + w_memory + w_util + w_temp
        staleness_half_life = self.staleness_half_life_s
        limit_c = self.throttle_limit_c
        span_c = limit_c - self.throttle_start_c
        scored: list[ScoredWorker] = []
        for snapshot, expected_i in zip(candidates, expected, strict=True):
            age_s = 0.0 if now_s is None else now_s - snapshot.taken_at_s
            fresh = float(2.0 ** (-age_s / staleness_half_life)) if age_s > 0.0 else 1.0
            speed = best_expected / expected_i if expected_i > 0 else 1.0
            free = snapshot.free_memory_bytes
            if free is None:
                memory = NEUTRAL
            elif max_free > 0:
                memory = _clamp(free / max_free)
            else:
                memory = 0.0
            util = snapshot.utilization_pct
            utilization = NEUTRAL if util is None else 1.0 - _clamp(util / 100.0)
            temperature_c = snapshot.temperature_c
            temperature = NEUTRAL if temperature_c is None else _clamp((limit_c - temperature_c) / span_c)
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
            sticky = bonus.get(snapshot.worker_id, 0.0) if bonus else 0.0
            if sticky:
                terms["affinity"] = sticky
            scored.append(
                ScoredWorker(
                    snapshot, state + w.affinity * sticky, terms, fresh, snapshot.worker_id in probes
                )
            )
        keys = [-c.score for c in scored]
        return [scored[i] for i in sorted(range(len(scored)), key=keys.__getitem__)]

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
        probe = next((c for c in ranked if c.probe), None)
        if probe is not None:
            return WorkerChoice(
                probe,
                ranked,
                tuple(rejected),
                1.0,
                f"{probe.worker_id} takes the half-open probe after its cooldown",
            )
        top = ranked[: self.top_k]
        weights = self.selection_weights([c.score for c in top])
        index = _draw(rng, weights)
        chosen = top[index]
        probability = weights[index] / sum(weights)
        if len(top) == 1:
            reason = f"{chosen.worker_id} is the only worker that can take it ({chosen.explain()})"
        else:
            reason = (
                f"{chosen.worker_id} scored {chosen.score:.2f} ({chosen.explain()}); drawn among the "
                f"top {len(top)} with probability {probability:.2f}"
            )
        return WorkerChoice(chosen, ranked, tuple(rejected), probability, reason)

    def selection_weights(self, scores: Sequence[float]) -> list[float]:
        """Relative draw weights for scores (best first): ``exp((s - best) / choice_temperature)``.
        A temperature of 0 draws uniformly among the workers tied for the best score."""
        best = max(scores)
        if self.choice_temperature == 0:
            return [1.0 if s >= best else 0.0 for s in scores]
        return [math.exp((s - best) / self.choice_temperature) for s in scores]


# -- helpers (verbatim) --


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
