"""``SnapshotTable`` and ``WorkerScorer.choose_rows`` (the C scoring) against ``WorkerScorer.choose`` and
``WorkerMetrics.utilization`` (the Python code they mirror): the same choices and random draws on random
fleets, and the same re-read snapshots, bit for bit."""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import sysconfig
from typing import Any

import pytest
from test_worker_scorer_equivalence import SCORERS, random_snapshot

from xpuflow.clock import FakeClock
from xpuflow.policy.snapshot_table import SNAPSHOT_FIELDS, SnapshotTable
from xpuflow.policy.worker_scorer import WorkerNeeds, WorkerScorer
from xpuflow.scheduling.metrics import WorkerMetrics

needs_table = pytest.mark.skipif(
    not SnapshotTable.available(), reason="the C extension is not built (no C compiler)"
)


def test_the_extension_is_built_where_a_compiler_is() -> None:
    if shutil.which(sysconfig.get_config_var("CC") or "cc") is None:
        pytest.skip("no C compiler here")
    assert SnapshotTable.available(), (
        "a C compiler is present but xpuflow.policy._snapshot_table is not importable: reinstall with "
        "pip install -e ."
    )


@needs_table
@pytest.mark.parametrize("settings", [*SCORERS, {"wait_weight": 10.0}, {"wait_weight": 0.5, "top_k": 1}])
def test_choose_rows_draws_what_choose_draws(settings: dict[str, Any]) -> None:
    scorer = WorkerScorer(**settings)
    rng = random.Random(11)
    for case in range(3000):
        now_s = 1000.0 + rng.uniform(0, 50)
        size = rng.choice([1, 2, 3, 8, 64, 96])
        snapshots = [random_snapshot(rng, i, now_s) for i in range(size)]
        table = SnapshotTable(size)
        for row, snapshot in enumerate(snapshots):
            table.set(row, snapshot)
        rows = None if rng.random() < 0.5 else tuple(rng.sample(range(size), rng.randint(1, size)))
        needs = rng.choice(
            [
                None,
                WorkerNeeds(),
                WorkerNeeds(tokens=rng.choice([100, 4000, 70000]), memory_bytes=None),
                WorkerNeeds(tokens=1000, memory_bytes=rng.randint(0, 40 << 30)),
            ]
        )
        if rng.random() < 0.02:  # a NaN reading: C leaves the ranking to Python's sort
            snapshots[0] = dataclasses.replace(snapshots[0], ema_latency_ms=math.nan, healthy=True)
            table.set(0, snapshots[0])
        seed = rng.random()
        chosen_rng, reference_rng = random.Random(seed), random.Random(seed)
        row = scorer.choose_rows(table, rows, needs, rng=chosen_rng, now_s=now_s)
        order = range(size) if rows is None else rows
        reference = scorer.choose([snapshots[r] for r in order], needs, rng=reference_rng, now_s=now_s)
        if reference.chosen is None:
            assert row is None, case
        else:
            assert row is not None, case
            assert snapshots[row] is reference.chosen.snapshot, case
        assert chosen_rng.getstate() == reference_rng.getstate(), case


@needs_table
def test_top_scores_equal_the_ranking() -> None:
    scorer = WorkerScorer()
    rng = random.Random(5)
    params = (0.7, 0.1, 0.1, 0.1, 0.3, 1.0, 5.0, 75.0, 90.0, 0.1, 0.0)
    for _ in range(500):
        now_s = 50.0
        snapshots = [random_snapshot(rng, i, now_s) for i in range(rng.randint(1, 40))]
        table = SnapshotTable(len(snapshots))
        for row, snapshot in enumerate(snapshots):
            table.set(row, snapshot)
        top = table.top(None, now_s, None, None, 100, params)
        ranked = scorer.choose(snapshots, rng=random.Random(0), now_s=now_s).ranked
        assert top is not None
        rows, scores, weights = top
        assert [(snapshots[r].worker_id, score) for r, score in zip(rows, scores, strict=True)] == [
            (c.worker_id, c.score) for c in ranked
        ]
        assert weights == (scorer.selection_weights(scores) if scores else [])
        # the same row from the tuple of the snapshot's fields
        as_tuple = SnapshotTable(len(snapshots))
        for row, snapshot in enumerate(snapshots):
            as_tuple.set(row, tuple(getattr(snapshot, name) for name in SNAPSHOT_FIELDS))
        assert as_tuple.top(None, now_s, None, None, 100, params) == top
        assert [as_tuple.snapshot(r) for r in range(len(snapshots))] == snapshots


@needs_table
def test_reread_is_the_metrics_utilization_at_now() -> None:
    rng = random.Random(3)
    for _ in range(300):
        clock = FakeClock(rng.uniform(0, 5))
        metrics = WorkerMetrics(clock, window_s=rng.choice([1.0, 10.0]))
        snapshot = random_snapshot(rng, 0, clock.monotonic())
        snapshot = dataclasses.replace(snapshot, taken_at_s=clock.monotonic())
        table = SnapshotTable(1)
        table.set(0, snapshot, metrics.busy_state())
        expected = snapshot
        for _ in range(40):
            step = rng.choice([0.001, 0.03, 0.2, 1.5, 7.0])
            clock.advance(step)
            event = rng.random()
            if event < 0.3:
                metrics.record_batch_start(1)
            elif event < 0.6 and metrics.running_batches:
                metrics.record_batch_end(1, 0.1, True)
            else:
                # an unchanged worker read again: the table does it by itself, or hands it back
                now_s = clock.monotonic()
                max_age_s = rng.choice([0.0, 0.05, 1.0])
                left = table.reread(now_s, max_age_s)
                age_s = now_s - expected.taken_at_s
                if age_s > max_age_s:
                    utilization = metrics.utilization() * 100.0
                    if left:
                        table.reread_row(0, now_s, utilization, metrics.busy_state())
                    oldest = expected.oldest_in_flight_s
                    expected = dataclasses.replace(
                        expected,
                        taken_at_s=now_s,
                        utilization_pct=utilization,
                        oldest_in_flight_s=None if oldest is None else oldest + age_s,
                    )
                else:
                    assert left == []
                assert table.snapshot(0) == expected
                continue
            # a change: the owner reads its worker in full and sets the row
            expected = dataclasses.replace(
                snapshot, taken_at_s=clock.monotonic(), utilization_pct=metrics.utilization() * 100.0
            )
            table.set(0, expected, metrics.busy_state())


@needs_table
def test_bad_rows_are_refused() -> None:
    table = SnapshotTable(2)
    with pytest.raises(IndexError):
        table.set(2, random_snapshot(random.Random(0), 0, 0.0))
    with pytest.raises(LookupError):
        table.snapshot(0)
    with pytest.raises(TypeError):
        table.set(0, random_snapshot(random.Random(0), 0, 0.0), busy=(1.0,))  # type: ignore[arg-type]
    assert table.reread(math.inf, 0.0) == []  # rows never set are skipped
