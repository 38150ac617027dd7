"""The simulator scores its workers through the snapshot table (``policy.snapshot_table``, in C) when the
extension is built: every run must come out exactly as it does scoring snapshot objects (``columnar=False``):
the same worker, times and outcome for every request, under load, faults, tiers, samples and retries."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from xpuflow.policy.snapshot_table import SnapshotTable
from xpuflow.simulate import SimRequest, Simulation, load_fleet, parse_kill, parse_slow
from xpuflow.types import WorkerSnapshot

pytestmark = pytest.mark.skipif(not SnapshotTable.available(), reason="the C extension is not built")


def bursty(n: int, seed: int, rate_per_s: float) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate_per_s) if rng.random() < 0.8 else 0.0
        out.append(SimRequest(t, rng.choice([50, 300, 2000, 6000]), rng.choice([5, 20, 20, 80])))
    return out


def same_run(fleet: object, requests: list[SimRequest], **kw: object) -> None:
    columnar = Simulation(fleet, requests, columnar=True, **kw)  # type: ignore[arg-type]
    assert columnar._table is not None
    fast = columnar.run()
    slow = Simulation(fleet, requests, columnar=False, **kw).run()  # type: ignore[arg-type]
    assert fast.worker == slow.worker
    assert fast.outcomes == slow.outcomes
    assert [repr(v) for v in fast.e2e_s] == [repr(v) for v in slow.e2e_s]
    assert [repr(v) for v in fast.ttft_s] == [repr(v) for v in slow.ttft_s]
    assert fast.events == slow.events


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rate_per_s", [2.0, 12.0])
def test_columnar_runs_equal_snapshot_runs(fleet_file: Path, seed: int, rate_per_s: float) -> None:
    fleet = load_fleet(fleet_file).with_replicas({"big": 3, "small": 6})
    same_run(fleet, bursty(400, seed, rate_per_s), seed=seed)


def test_columnar_with_faults_samples_and_tiers(fleet_file: Path) -> None:
    fleet = load_fleet(fleet_file).with_replicas({"big": 3, "small": 6})
    requests = bursty(400, 5, 8.0)
    faults = [parse_kill("big/0@5"), parse_slow("small/1x6@2"), parse_kill("small/2@12")]
    same_run(fleet, requests, seed=3, faults=faults)
    same_run(fleet, requests, seed=3, sample=3)
    text = fleet_file.read_text().replace(
        "tiers: [{name: main, deployments: [big, small]}]",
        "tiers: [{name: strong, deployments: [big]}, {name: weak, deployments: [small]}]",
    )
    fleet_file.write_text(text)
    same_run(load_fleet(fleet_file), requests, seed=4, faults=faults[:1])


def test_a_full_read_is_the_snapshot_the_constructor_makes(fleet_file: Path) -> None:
    sim = Simulation(load_fleet(fleet_file), bursty(50, 1, 5.0))
    sim.run()
    for worker in sim.workers.values():
        worker._changed()
        snapshot = worker.snapshot(sim.clock.monotonic())
        assert snapshot == WorkerSnapshot(**snapshot.__dict__)
        assert list(snapshot.__dict__) == list(WorkerSnapshot.__dataclass_fields__)
