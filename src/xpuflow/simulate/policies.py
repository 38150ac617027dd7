"""Worker-choice policies the simulator compares: xpuflow's scorer and the classic baselines.

Every policy sees the same candidates: the workers of the tier not yet tried for this request that the
dispatcher's filter lets through (healthy or admitting a probe, able to hold the request). Only the
choice among them differs; queues, batching, retries, failover and health are xpuflow's for all::

    policy = make_policy(PolicyName.P2C)
    worker = policy.choose(candidates, rng, now_s)

``xpuflow`` is not here: the engine runs ``WorkerScorer.choose`` itself, exactly as the dispatcher does
(snapshots, probes, the panic rule).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from enum import Enum
from typing import Protocol

from xpuflow.simulate.worker import SimWorker

__all__ = ["BASELINES", "PolicyName", "WorkerPolicy", "make_policy"]


class PolicyName(str, Enum):
    XPUFLOW = "xpuflow"
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    P2C = "p2c"
    JSQ = "jsq"
    LEAST_LATENCY = "least-latency"


BASELINES = (
    PolicyName.ROUND_ROBIN,
    PolicyName.RANDOM,
    PolicyName.P2C,
    PolicyName.JSQ,
    PolicyName.LEAST_LATENCY,
)


class WorkerPolicy(Protocol):
    """Picks one of ``candidates`` (never empty)."""

    def choose(self, candidates: Sequence[SimWorker], rng: random.Random, now_s: float) -> SimWorker: ...


class RoundRobin:
    """Each tier's workers in turn (a counter per tier), skipping those filtered out."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def choose(self, candidates: Sequence[SimWorker], rng: random.Random, now_s: float) -> SimWorker:
        key = candidates[0].deployment
        index = self._next.get(key, 0)
        self._next[key] = index + 1
        return candidates[index % len(candidates)]


class RandomChoice:
    """Uniformly at random."""

    def choose(self, candidates: Sequence[SimWorker], rng: random.Random, now_s: float) -> SimWorker:
        return candidates[int(rng.random() * len(candidates))]


class PowerOfTwo:
    """Two at random; the one with fewer requests queued or running (Mitzenmacher's two choices)."""

    def choose(self, candidates: Sequence[SimWorker], rng: random.Random, now_s: float) -> SimWorker:
        if len(candidates) == 1:
            return candidates[0]
        a, b = rng.sample(range(len(candidates)), 2)
        wa, wb = candidates[a], candidates[b]
        return wa if wa.outstanding <= wb.outstanding else wb


def _least(candidates: Sequence[SimWorker], rng: random.Random, key: list[float]) -> SimWorker:
    best = min(key)
    ties = [c for c, k in zip(candidates, key, strict=True) if k == best]
    return ties[0] if len(ties) == 1 else ties[int(rng.random() * len(ties))]


class JoinShortestQueue:
    """The fewest requests queued or running; ties at random."""

    def choose(self, candidates: Sequence[SimWorker], rng: random.Random, now_s: float) -> SimWorker:
        return _least(candidates, rng, [float(c.outstanding) for c in candidates])


class LeastLatency:
    """The lowest EMA of per-batch service time (a worker not measured yet counts as 0, so it is tried)."""

    def choose(self, candidates: Sequence[SimWorker], rng: random.Random, now_s: float) -> SimWorker:
        return _least(candidates, rng, [c.metrics.ema_service_ms or 0.0 for c in candidates])


def make_policy(name: PolicyName | str) -> WorkerPolicy:
    """The baseline called ``name`` (``xpuflow`` is run by the engine itself: ValueError here)."""
    chosen = PolicyName(name)
    table: dict[PolicyName, type[WorkerPolicy]] = {
        PolicyName.ROUND_ROBIN: RoundRobin,
        PolicyName.RANDOM: RandomChoice,
        PolicyName.P2C: PowerOfTwo,
        PolicyName.JSQ: JoinShortestQueue,
        PolicyName.LEAST_LATENCY: LeastLatency,
    }
    if chosen not in table:
        raise ValueError(f"{chosen.value} is the engine's own scorer, not a baseline")
    return table[chosen]()
