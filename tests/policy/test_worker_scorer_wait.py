"""``WorkerScorer(wait_weight=...)``: the TTFT objective prefers a worker that starts the request now."""

from __future__ import annotations

import random

import pytest

from xpuflow.policy.worker_scorer import WorkerScorer
from xpuflow.types import WorkerSnapshot


def _worker(name: str, latency_ms: float, queued: int, *, max_in_flight: int | None = None) -> WorkerSnapshot:
    return WorkerSnapshot(
        worker_id=name,
        deployment="chat",
        device="sim",
        queue_depth=queued,
        in_flight=1 if queued else 0,
        max_batch_size=1,
        max_in_flight=max_in_flight,
        ema_latency_ms=latency_ms,
    )


@pytest.mark.parametrize("max_in_flight", [None, 1])
def test_a_ttft_objective_starts_the_request_now(max_in_flight: int | None) -> None:
    # a fast worker with two requests ahead (one running) ends a new one after 300 ms, a slow idle one
    # after 350 ms: the completion time prefers the fast one, the wait before the start the slow one
    fast, slow = _worker("fast", 100.0, 1, max_in_flight=max_in_flight), _worker("slow", 350.0, 0)
    by_completion = WorkerScorer(top_k=1).choose([fast, slow], rng=random.Random(0))
    by_ttft = WorkerScorer(top_k=1, wait_weight=10.0).choose([fast, slow], rng=random.Random(0))
    assert by_completion.chosen is not None
    assert by_completion.chosen.worker_id == "fast"
    assert by_ttft.chosen is not None
    assert by_ttft.chosen.worker_id == "slow"


def test_wait_weight_is_checked() -> None:
    with pytest.raises(ValueError, match="wait_weight"):
        WorkerScorer(wait_weight=-1.0)
    with pytest.raises(ValueError, match="wait_weight"):
        WorkerScorer(wait_weight=float("inf"))
