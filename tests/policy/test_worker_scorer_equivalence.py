"""``WorkerScorer`` after its speed work gives exactly what it gave before (``reference_worker_scorer``).

Random fleets of 1 to 96 snapshots, with every reading known, unknown, stale or odd, random needs,
health verdicts, probes and affinity: the chosen worker, the ranking with every score and term, the
refusals, the probability, the reason and the random numbers drawn must all be the same.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from reference_worker_scorer import ReferenceScorer

from xpuflow.policy.worker_scorer import (
    ScoringWeights,
    WorkerChoice,
    WorkerNeeds,
    WorkerScorer,
    session_affinity,
)
from xpuflow.types import WorkerSnapshot

GIB = 1 << 30


def _maybe(rng: random.Random, value: Any, none_share: float = 0.3) -> Any:
    return None if rng.random() < none_share else value


def random_snapshot(rng: random.Random, index: int, now_s: float) -> WorkerSnapshot:
    continuous = rng.random() < 0.3
    return WorkerSnapshot(
        worker_id=f"{rng.choice(['fast', 'mid', 'slow'])}/{index}",
        deployment="chat",
        device=f"sim:{index}",
        healthy=rng.random() < 0.9,
        draining=rng.random() < 0.05,
        queue_depth=rng.choice([0, 0, 1, 2, 5, 40]),
        in_flight=rng.choice([0, 1, 3, 8]),
        max_batch_size=rng.choice([1, 4, 8]),
        # a few exact ties (the same EMA on several workers) and a few non-positive readings
        ema_latency_ms=_maybe(rng, rng.choice([rng.uniform(1, 8000), 250.0, 250.0, 0.0, -5.0])),
        free_memory_bytes=_maybe(rng, rng.choice([rng.randint(0, 80 * GIB), 0, 16 * GIB])),
        utilization_pct=_maybe(rng, rng.choice([rng.uniform(0, 100), 0.0, 100.0, 130.0, -3.0])),
        temperature_c=_maybe(rng, rng.choice([rng.uniform(40, 100), 75.0, 90.0]), 0.6),
        max_seq_len=_maybe(rng, rng.choice([2048, 8192, 65536])),
        taken_at_s=now_s - rng.choice([0.0, 0.0, 0.01, 0.5, 12.0, -0.2]),
        max_in_flight=rng.choice([8, 64]) if continuous else None,
        oldest_in_flight_s=_maybe(rng, rng.choice([0.0, rng.uniform(0, 30)]), 0.5),
        latency_sampled_at_s=_maybe(rng, now_s - rng.choice([0.0, 0.3, 2.0, 60.0, -1.0])),
        mean_batch_size=_maybe(rng, rng.choice([0.5, 1.0, 1.7, 3.0, 12.0]), 0.4),
    )


def same_choice(fast: WorkerChoice, reference: WorkerChoice) -> None:
    assert (fast.chosen is None) == (reference.chosen is None)
    if fast.chosen is not None and reference.chosen is not None:
        assert fast.chosen.worker_id == reference.chosen.worker_id
    assert [(c.worker_id, c.score, dict(c.terms), c.freshness, c.probe) for c in fast.ranked] == [
        (c.worker_id, c.score, dict(c.terms), c.freshness, c.probe) for c in reference.ranked
    ]
    assert [c.snapshot for c in fast.ranked] == [c.snapshot for c in reference.ranked]
    assert fast.rejected == reference.rejected
    assert fast.probability == reference.probability
    assert fast.reason == reference.reason


SCORERS = [
    {},
    {"top_k": 1},
    {"top_k": 8, "choice_temperature": 0.0},
    {"weights": ScoringWeights(speed=0.4, memory=0.2, utilization=0.3, temperature=0.1, affinity=0.0)},
    {"staleness_half_life_s": 0.5, "latency_half_life_s": 5.0},
]


@pytest.mark.parametrize("settings", SCORERS)
def test_choices_equal_the_reference_on_random_fleets(settings: dict[str, Any]) -> None:
    fast_scorer, reference_scorer = WorkerScorer(**settings), ReferenceScorer(**settings)
    rng = random.Random(20261207)
    for case in range(1500):
        now_s = rng.choice([100.0, 3600.5])
        n = rng.choice([1, 2, 3, 8, 17, 64, 96])
        snapshots = [random_snapshot(rng, i, now_s) for i in range(n)]
        needs = rng.choice(
            [
                None,
                WorkerNeeds(),
                WorkerNeeds(tokens=rng.randint(1, 70000)),
                WorkerNeeds(tokens=1000, memory_bytes=rng.randint(0, 40 * GIB)),
            ]
        )
        ids = [s.worker_id for s in snapshots]
        available = None if rng.random() < 0.5 else {w: rng.random() < 0.8 for w in ids if rng.random() < 0.7}
        probes = set(rng.sample(ids, 1)) if rng.random() < 0.1 else set()
        affinity: Any = rng.choice(
            [None, session_affinity(f"key-{case}"), {ids[0]: rng.choice([0.5, 1.0, 2.0, float("nan")])}]
        )
        clock = rng.choice([None, now_s])
        seed = rng.randrange(1 << 30)
        draws_fast, draws_reference = random.Random(seed), random.Random(seed)
        fast = fast_scorer.choose(
            snapshots,
            needs,
            rng=draws_fast,
            available=available,
            probes=probes,
            now_s=clock,
            affinity=affinity,
        )
        reference = reference_scorer.choose(
            snapshots,
            needs,
            rng=draws_reference,
            available=available,
            probes=probes,
            now_s=clock,
            affinity=affinity,
        )
        same_choice(fast, reference)
        assert draws_fast.getstate() == draws_reference.getstate()
