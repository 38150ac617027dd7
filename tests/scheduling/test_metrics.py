"""``WorkerMetrics`` readings that every snapshot takes, held to the formulas they were first written as."""

from __future__ import annotations

import copy
import random

from xpuflow.clock import FakeClock
from xpuflow.scheduling.metrics import WorkerMetrics


def _utilization_as_written_first(metrics: WorkerMetrics) -> float:
    now = metrics._clock.monotonic()
    metrics._prune(now)
    span = max(1e-9, min(metrics.window_s, now - metrics.started_at_s))
    start = now - span
    busy = metrics._busy_sum_s
    if metrics._busy:
        begin, end = metrics._busy[0]
        busy -= max(0.0, min(end, start) - begin)
    busy = max(0.0, busy)
    if metrics._busy_since_s is not None:
        busy += now - max(metrics._busy_since_s, start)
    return min(1.0, busy / span)


def test_utilization_and_mean_batch_size_equal_their_first_formulas() -> None:
    rng = random.Random(2)
    for _ in range(200):
        clock = FakeClock(rng.uniform(0, 3))
        metrics = WorkerMetrics(clock, window_s=rng.choice([0.5, 2.0, 10.0]))
        for _ in range(60):
            clock.advance(rng.choice([0.0, 0.001, 0.05, 0.4, 3.0]))
            event = rng.random()
            if event < 0.35:
                metrics.record_batch_start(rng.randint(1, 4), shares_with=rng.choice([0, 0, 2]))
            elif event < 0.7 and metrics.running_batches:
                metrics.record_batch_end(1, 0.1, True)
            reference = copy.deepcopy(metrics)  # its own clock at the same time; it prunes its own window
            assert metrics.utilization() == _utilization_as_written_first(reference)
            batches = sum(metrics.batch_sizes.values())
            expected = sum(s * c for s, c in metrics.batch_sizes.items()) / batches if batches else None
            assert metrics.mean_batch_size() == expected


def test_record_alone_records_what_record_request_and_record_batch_end_record() -> None:
    rng = random.Random(5)
    for _ in range(200):
        clock = FakeClock(rng.uniform(0, 3))
        one = WorkerMetrics(clock, window_s=rng.choice([0.5, 2.0, 10.0]))
        two = copy.deepcopy(one)
        two._clock = clock  # one clock for both: the same readings
        running: list[float] = []  # when each request alone started
        for _ in range(60):
            clock.advance(rng.choice([0.0, 0.001, 0.05, 0.4, 3.0]))
            event = rng.random()
            if event < 0.4:
                shares = len(running)
                for metrics in (one, two):
                    metrics.record_batch_start(1, shares_with=shares)
                running.append(clock.monotonic())
            elif event < 0.8 and running:
                started = running.pop(rng.randrange(len(running)))
                ended = clock.monotonic()
                tokens = rng.choice([0, 0, 7])
                one.record_alone(started, ended, tokens)
                two.record_request(ended - started, 0.0, tokens, started_at_s=started)
                two.record_batch_end(1, ended - started, True, started_at_s=started)
            elif event < 0.85:
                for metrics in (one, two):
                    metrics.forget_latency()
            state_one, state_two = dict(vars(one)), dict(vars(two))
            state_one.pop("_clock"), state_two.pop("_clock")
            assert state_one == state_two
