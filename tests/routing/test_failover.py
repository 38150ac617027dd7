"""Failover under load: 3 workers, one dies mid-load (it fails or it hangs); no client request fails.

Runs on real ``Worker``s (queue, batcher, health) over ``FakeSession``s, and on the minimal test
worker, so the dispatcher's contract holds whatever implements the worker interface.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest
from fake_workers import FakeWorker

from xpuflow.backends.base import Completion, GenerationParams
from xpuflow.policy.worker_scorer import WorkerScorer
from xpuflow.routing.dispatch import Dispatched, Dispatcher, RetryPolicy
from xpuflow.scheduling.health import HealthState, HealthTracker
from xpuflow.scheduling.request import WorkRequest
from xpuflow.scheduling.worker import Worker
from xpuflow.testing import FakeSession

NUM_REQUESTS = 200
NUM_CLIENTS = 16
KILL_AFTER = 30  # completed requests before the victim dies
FAILURE_THRESHOLD = 3
COOLDOWN_S = 0.3
ATTEMPT_TIMEOUT_S = 0.25
PARAMS = GenerationParams(max_tokens=8)


class RecordingHealth(HealthTracker):
    """A health tracker that remembers the consecutive-failure count at each state change."""

    def __init__(self) -> None:
        # a fixed cooldown (no growth after failed probes), so the test knows when the probe is due
        super().__init__(
            failure_threshold=FAILURE_THRESHOLD, cooldown_s=COOLDOWN_S, max_cooldown_s=COOLDOWN_S
        )
        self.transitions: list[tuple[HealthState, int]] = []

    def record_failure(self, reason: str = "") -> None:
        before = self.state
        super().record_failure(reason)
        if self.state is not before:
            self.transitions.append((self.state, self.consecutive_failures))

    def record_success(self) -> None:
        before = self.state
        super().record_success()
        if self.state is not before:
            self.transitions.append((self.state, 0))


def real_worker(name: str) -> tuple[Worker, FakeSession]:
    session = FakeSession(name, service_time_s=0.01, per_item_s=0.0005, max_batch_size=8)
    worker = Worker(
        session,
        worker_id=name,
        deployment="chat",
        device=f"cpu:{name}",
        health=RecordingHealth(),
        stop_timeout_s=0.5,
    )
    return worker, session


def fake_worker(name: str) -> tuple[FakeWorker, FakeSession]:
    session = FakeSession(name, service_time_s=0.01, max_batch_size=8)
    worker = FakeWorker(name, session, device=f"cpu:{name}")
    worker.health = RecordingHealth()
    return worker, session


def kill(worker: Any, session: FakeSession, mode: str) -> None:
    if mode == "fails":
        session.fail_next = 10**9
    else:
        session.service_time_s = 3600.0  # every batch from now on hangs
        if isinstance(worker, FakeWorker):
            worker.hang = True


async def revive(worker: Any, session: FakeSession, mode: str) -> None:
    session.fail_next = 0
    session.service_time_s = 0.01
    if isinstance(worker, FakeWorker):
        worker.hang = False
    elif mode == "hangs":
        # A hung batch holds the worker's batch slot until it is cancelled: restart the worker, as
        # an operator (or a supervisor) would. Its health carries over.
        await worker.stop(drain=False)
        await worker.start()


async def start(workers: list[Any]) -> None:
    for worker in workers:
        if isinstance(worker, Worker):
            await worker.start()


async def stop(workers: list[Any]) -> None:
    for worker in workers:
        if isinstance(worker, Worker):
            await worker.stop(drain=False)


def make_dispatcher(seed: int) -> Dispatcher:
    policy = RetryPolicy(
        max_retries=2, attempt_timeout_s=ATTEMPT_TIMEOUT_S, backoff_base_s=0.005, backoff_max_s=0.05
    )
    return Dispatcher(scorer=WorkerScorer(), policy=policy, rng=random.Random(seed))


@pytest.mark.parametrize("mode", ["fails", "hangs"])
@pytest.mark.parametrize("make", [real_worker, fake_worker], ids=["worker", "fake-worker"])
def test_one_of_three_workers_dies_mid_load_and_no_request_fails(
    make: Callable[[str], tuple[Any, FakeSession]], mode: str
) -> None:
    pairs = [make(name) for name in ("w0", "w1", "w2")]
    workers = [w for w, _ in pairs]
    victim, victim_session = pairs[1]
    dispatcher = make_dispatcher(seed=11)
    tiers = [("tier_main", workers)]

    async def scenario() -> tuple[list[Dispatched], list[BaseException], list[Dispatched]]:
        await start(workers)
        results: list[Dispatched] = []
        errors: list[BaseException] = []
        prompts = iter(range(NUM_REQUESTS))
        killed = False

        async def client() -> None:
            nonlocal killed
            for i in prompts:
                request = WorkRequest.completion(f"request {i} says hello", PARAMS)
                try:
                    done = await dispatcher.dispatch(tiers, request)
                except Exception as exc:  # what the test is about: this must never happen
                    errors.append(exc)
                    continue
                assert isinstance(done.result, Completion)
                assert done.result.text == f"hello says {i} request"
                results.append(done)
                if len(results) >= KILL_AFTER and not killed:
                    killed = True
                    kill(victim, victim_session, mode)

        try:
            await asyncio.gather(*(client() for _ in range(NUM_CLIENTS)))
            # After the cooldown, the dead worker gets one probe (it fails: the request moves on);
            # once it is back, the next probe makes it healthy again.
            probes: list[Dispatched] = []
            await asyncio.sleep(COOLDOWN_S + 0.05)
            probes.append(await dispatcher.dispatch(tiers, WorkRequest.completion("probe one", PARAMS)))
            await revive(victim, victim_session, mode)
            await asyncio.sleep(COOLDOWN_S + 0.05)
            probes.append(await dispatcher.dispatch(tiers, WorkRequest.completion("probe two", PARAMS)))
        finally:
            await stop(workers)
        return results, errors, probes

    results, errors, probes = asyncio.run(asyncio.wait_for(scenario(), timeout=60))

    assert errors == []
    assert len(results) == NUM_REQUESTS
    # The victim really died mid-load and its requests moved to the others.
    retried = [d for d in results if len(d.attempts) > 1]
    assert retried, "no request was retried: the victim did not die mid-load"
    assert all(d.decision.worker != "w1" for d in retried if d.attempts[0].worker == "w1")
    served_by = {d.decision.worker for d in results}
    assert served_by == {"w0", "w1", "w2"}
    # Unhealthy after exactly FAILURE_THRESHOLD consecutive failures, not before.
    health = victim.health
    assert isinstance(health, RecordingHealth)
    assert health.transitions[0] == (HealthState.UNHEALTHY, FAILURE_THRESHOLD)
    # The first probe after the cooldown went to the dead worker, failed, and the request moved on.
    first, second = probes
    assert first.attempts[0].worker == "w1"
    assert first.attempts[0].probe
    assert first.attempts[0].error is not None
    assert first.decision.worker != "w1"
    assert health.transitions[-2][0] is HealthState.UNHEALTHY
    # The second probe found it alive: healthy again.
    assert second.attempts[0].worker == "w1"
    assert second.attempts[0].probe
    assert second.decision.worker == "w1"
    assert health.state is HealthState.HEALTHY
    assert health.transitions[-1] == (HealthState.HEALTHY, 0)
    for worker in workers:
        if worker is not victim:
            assert worker.health.state is HealthState.HEALTHY
