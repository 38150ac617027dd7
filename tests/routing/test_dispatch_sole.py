"""A sole local worker that can take the request is not scored (``Dispatcher._pick``): nothing to compare
it with. Its decision says so and is made once; anything the scorer would have looked at (health,
draining, needs, a second worker) sends the pick back through the scorer."""

from __future__ import annotations

import random
from typing import Any

import pytest

from xpuflow.backends.base import BatchMode, Completion, GenerationParams
from xpuflow.errors import DispatchError, SessionError
from xpuflow.policy.worker_scorer import WorkerNeeds, WorkerScorer
from xpuflow.routing.dispatch import Dispatcher, DispatchTarget, RetryPolicy
from xpuflow.scheduling.request import WorkRequest
from xpuflow.scheduling.worker import Worker
from xpuflow.testing import FakeSession
from xpuflow.testing.run_async import run_async
from xpuflow.types import RoutingDecision, WorkerSnapshot


class Server(FakeSession):
    """A continuous session (the fast path's kind) that fails its next ``fail`` calls."""

    batch_mode = BatchMode.CONTINUOUS

    def __init__(self, **kw: Any) -> None:
        super().__init__(max_batch_size=4, **kw)
        self.fail = 0

    async def generate(self, prompt: str, params: GenerationParams) -> Completion:
        if self.fail:
            self.fail -= 1
            raise SessionError("the server broke off")
        return await super().generate(prompt, params)


def request() -> WorkRequest:
    return WorkRequest.completion("a b", GenerationParams(max_tokens=4))


class Counting:
    """A dispatcher whose snapshot reads are counted."""

    def __init__(self) -> None:
        self.snapshots = 0
        self.dispatcher = Dispatcher(
            scorer=WorkerScorer(top_k=1),
            policy=RetryPolicy(backoff_base_s=0.0, backoff_max_s=0.0),
            rng=random.Random(0),
            snapshot_of=self._snapshot,
        )

    def _snapshot(self, worker: DispatchTarget) -> WorkerSnapshot:
        self.snapshots += 1
        return worker.snapshot()


@run_async
async def test_a_sole_healthy_worker_is_taken_without_a_snapshot_or_a_score() -> None:
    counting = Counting()
    async with Worker(Server(), worker_id="w") as worker:
        done = await counting.dispatcher.dispatch([("t", [worker])], request())
    assert isinstance(done.result, Completion)
    assert counting.snapshots == 0
    decision = done.decision
    assert (decision.tier, decision.worker) == ("t", "w")
    assert decision.reason == "w is the only worker that can take it"
    assert decision.confidence == 1.0
    assert decision.alternatives == ()
    assert dict(decision.details) == {
        "rule": None,
        "score": None,
        "probability": 1.0,
        "attempts": 1,
        "probe": False,
        "terms": {},
    }
    assert [(a.worker, a.error) for a in done.attempts] == [("w", None)]


@run_async
async def test_its_decision_is_made_once_per_worker_tier_and_tier_decision() -> None:
    counting = Counting()
    one_tier = RoutingDecision(None, "the model has one tier", 1.0, tier="t", details={"rule": "single-tier"})
    async with Worker(Server(), worker_id="w") as worker, Worker(Server(), worker_id="w") as twin:
        first = await counting.dispatcher.dispatch([("t", [worker])], request(), tier_decision=one_tier)
        again = await counting.dispatcher.dispatch([("t", [worker])], request(), tier_decision=one_tier)
        assert again.decision is first.decision
        assert (
            first.decision.reason
            == "tier t: the model has one tier; worker w is the only worker that can take it"
        )
        assert first.decision.details["rule"] == "single-tier"
        other = RoutingDecision(None, "complexity 0.2", 0.9, tier="t")
        routed = await counting.dispatcher.dispatch([("t", [worker])], request(), tier_decision=other)
        assert routed.decision is not first.decision
        assert routed.decision.reason.startswith("tier t: complexity 0.2; worker w")
        # another worker of the same id (a reloaded deployment) gets a decision of its own
        replaced = await counting.dispatcher.dispatch([("t", [twin])], request(), tier_decision=one_tier)
        assert replaced.decision is not first.decision
        assert replaced.decision == first.decision
    assert counting.snapshots == 0


@run_async
async def test_a_retried_request_explains_its_failed_attempt() -> None:
    counting = Counting()
    server = Server()
    async with Worker(server, worker_id="w") as worker:
        server.fail = 1
        # the failure leaves it the only worker of its tier, so the retry falls to the next tier
        done = await counting.dispatcher.dispatch([("a", [worker]), ("b", [worker])], request())
    assert done.decision.tier == "b"
    assert done.decision.details["attempts"] == 2
    assert (
        "after 1 failed attempt(s): a/w on unknown: SessionError: the server broke off"
        in done.decision.reason
    )
    assert [a.candidate for a in done.decision.alternatives] == ["w"]


@pytest.mark.parametrize("why", ["unhealthy", "draining", "needs"])
def test_anything_the_scorer_checks_sends_the_pick_through_it(why: str) -> None:
    @run_async
    async def check() -> None:
        counting = Counting()
        async with Worker(Server(), worker_id="w", max_seq_len=64) as worker:
            if why == "unhealthy":
                for _ in range(5):
                    worker.health.record_failure("down")
                # the scorer refuses it, and the panic rule tries the tier's best anyway
                done = await counting.dispatcher.dispatch([("t", [worker])], request())
                assert done.decision.reason.startswith("panic: every worker of tier t is unhealthy")
            else:
                if why == "draining":
                    worker.draining = True
                needs = WorkerNeeds(tokens=900) if why == "needs" else None
                with pytest.raises(DispatchError) as caught:
                    await counting.dispatcher.dispatch([("t", [worker])], request(), needs=needs)
                assert ("draining" if why == "draining" else "needs 900 tokens") in str(caught.value)
        assert counting.snapshots >= 1

    check()


@run_async
async def test_two_workers_are_scored_as_before() -> None:
    counting = Counting()
    async with Worker(Server(), worker_id="a") as a, Worker(Server(), worker_id="b") as b:
        done = await counting.dispatcher.dispatch([("t", [a, b])], request())
    assert counting.snapshots == 2
    assert set(done.decision.details["terms"]) == {"speed", "memory", "utilization", "temperature"}
    assert done.decision.details["score"] is not None
    assert "speed" in done.decision.reason
    assert [alt.candidate for alt in done.decision.alternatives] == ["b"]


@run_async
async def test_what_a_served_request_returns_equals_what_the_constructors_make() -> None:
    import dataclasses

    from xpuflow.config import LogicalModelConfig
    from xpuflow.engine import InferenceCall, InferenceResult
    from xpuflow.routing.retry import Attempt, Dispatched
    from xpuflow.routing.router import Router
    from xpuflow.types import RequestKind

    def same_as_constructed(value: Any) -> None:
        names = [f.name for f in dataclasses.fields(value)]
        assert sorted(vars(value)) == sorted(names)  # built with every field
        assert value == type(value)(**{name: getattr(value, name) for name in names})
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.__setattr__(names[0], None)

    async with Worker(Server(), worker_id="w") as worker:
        done = await Counting().dispatcher.dispatch([("t", [worker])], request())
        assert isinstance(done, Dispatched)
        assert isinstance(done.attempts[0], Attempt)
        same_as_constructed(done)
        same_as_constructed(done.attempts[0])
        router = Router(
            LogicalModelConfig(name="m", tiers=[{"name": "t", "deployments": ["d"]}]),  # type: ignore[list-item]
            "chat",
            [("t", [worker])],
            dispatcher=Counting().dispatcher,
        )
        call = InferenceCall("m", RequestKind.COMPLETION, "a b", GenerationParams(max_tokens=4))
        result = await router.complete(call)
        assert isinstance(result, InferenceResult)
        assert result.completion is not None
        assert result.completion.text == "b a"
        same_as_constructed(result)
