"""The admission state machine: unit cases, then random sequences of admit, complete, fail, cancel,
load and evict checked against its invariants (capacity, no leaks, no Guaranteed shed or evicted)."""

from __future__ import annotations

import asyncio
import random
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from xpuflow.clock import FakeClock
from xpuflow.errors import AdmissionRejected, ConfigError
from xpuflow.scheduling.qos.admission import (
    GB,
    MB,
    AdmissionController,
    ContextSpec,
    Grant,
    QoSPolicy,
)
from xpuflow.scheduling.qos.residency import ModelDoesNotFit, ModelResidency

G, B, BE = QoSPolicy.GUARANTEED, QoSPolicy.BURSTABLE, QoSPolicy.BEST_EFFORT


def controller(capacity: int = 10 * GB) -> AdmissionController:
    ctrl = AdmissionController(capacity)
    ctrl.add_context(ContextSpec("gold", G, max_bytes=4 * GB))
    ctrl.add_context(ContextSpec("silver", B, max_bytes=6 * GB, base_bytes=2 * GB))
    ctrl.add_context(ContextSpec("bronze", BE, max_bytes=10 * GB))
    return ctrl


def test_guaranteed_reservation_is_refused_when_it_would_exceed_the_device() -> None:
    ctrl = controller()
    with pytest.raises(ConfigError, match=r"reserves 5\.00 GiB but only 4\.00 GiB"):
        ctrl.add_context(ContextSpec("platinum", G, max_bytes=5 * GB))


def test_best_effort_borrows_idle_reservations_and_is_shed_for_guaranteed() -> None:
    ctrl = controller()
    be = [ctrl.admit("bronze", 2 * GB, now_s=0).grant for _ in range(5)]  # the whole device
    assert ctrl.available_bytes() == 0
    outcome = ctrl.admit("gold", 3 * GB, now_s=1)
    assert outcome.grant is not None
    # the newest borrowers go first, and only as many as needed
    assert [g.grant_id for g in outcome.shed] == [be[4].grant_id, be[3].grant_id]  # type: ignore[union-attr]
    assert all(g.release_reason == "shed" for g in outcome.shed)
    assert ctrl.used_bytes() == 9 * GB


def test_burst_is_limited_to_unreserved_memory() -> None:
    ctrl = controller()
    # reservations: gold 4 + silver base 2 = 6; unreserved 4
    ctrl.admit("silver", 6 * GB, now_s=0)
    with pytest.raises(AdmissionRejected, match=r"context 'silver'.*uses 6\.00 GiB of 6\.00 GiB"):
        ctrl.admit("silver", 1 * MB, now_s=0)
    ctrl2 = AdmissionController(8 * GB)
    ctrl2.add_context(ContextSpec("gold", G, max_bytes=4 * GB))
    ctrl2.add_context(ContextSpec("silver", B, max_bytes=8 * GB, base_bytes=1 * GB))
    ctrl2.admit("silver", 4 * GB, now_s=0)  # base 1 + burst 3: all unreserved memory
    with pytest.raises(AdmissionRejected, match="cannot burst") as info:
        ctrl2.admit("silver", 1 * GB, now_s=0)
    assert info.value.retry_after_s > 0


def test_every_rejection_names_the_sizes() -> None:
    ctrl = controller()
    with pytest.raises(AdmissionRejected, match=r"cannot fit 5\.00 GiB: its max is 4\.00 GiB"):
        ctrl.admit("gold", 5 * GB, now_s=0)
    ctrl.admit("bronze", 9 * GB, now_s=0)
    ctrl.admit("silver", 1 * GB, now_s=0)
    with pytest.raises(AdmissionRejected, match=r"needs 1\.0 MiB but only 0\.0 MiB of free device memory"):
        ctrl.admit("bronze", 1 * MB, now_s=0)


def test_queue_serves_by_class_then_arrival_and_expires_with_a_reason() -> None:
    ctrl = AdmissionController(4 * GB)
    ctrl.add_context(ContextSpec("silver", B, max_bytes=4 * GB, base_bytes=0))
    ctrl.add_context(ContextSpec("bronze", BE, max_bytes=4 * GB))
    first = ctrl.admit("silver", 4 * GB, now_s=0).grant
    assert first is not None
    t_be1, _ = ctrl.enqueue("bronze", 2 * GB, now_s=1)
    t_b, _ = ctrl.enqueue("silver", 2 * GB, now_s=2)
    t_be2, _ = ctrl.enqueue("bronze", 2 * GB, now_s=3, timeout_s=0.5)
    t_be3, _ = ctrl.enqueue("bronze", 1 * GB, now_s=3)
    assert [t.ticket_id for t in ctrl.queued] == [
        t_b.ticket_id,
        t_be1.ticket_id,
        t_be2.ticket_id,
        t_be3.ticket_id,
    ]  # type: ignore[union-attr]
    outcome = ctrl.release(first, "completed", now_s=4)
    assert [t.ticket_id for t, _ in outcome.served] == [t_b.ticket_id, t_be1.ticket_id]  # type: ignore[union-attr]
    assert [t.ticket_id for t, _ in outcome.rejected] == [t_be2.ticket_id]  # type: ignore[union-attr]
    assert "waited 1.00 s" in str(outcome.rejected[0][1])
    # t_be3 (1 GiB) would fit nowhere: the device is full; it stays queued
    assert [t.ticket_id for t in ctrl.queued] == [t_be3.ticket_id]  # type: ignore[union-attr]


def test_release_is_idempotent() -> None:
    ctrl = controller()
    grant = ctrl.admit("gold", GB, now_s=0).grant
    assert grant is not None
    ctrl.release(grant, "completed")
    ctrl.release(grant, "failed")
    assert ctrl.used_bytes() == 0
    assert ctrl.stats["completed"] == 1
    assert ctrl.stats["failed"] == 0


# ------------------------------------------------------------------ random sequences
class Harness:
    """Drives the controller and a residency manager and checks every invariant after each step."""

    CONTEXTS = (
        ContextSpec("g1", G, max_bytes=3 * GB),
        ContextSpec("g2", G, max_bytes=2 * GB),
        ContextSpec("b1", B, max_bytes=6 * GB, base_bytes=1 * GB),
        ContextSpec("be1", BE, max_bytes=8 * GB),
        ContextSpec("be2", BE, max_bytes=4 * GB),
    )
    MODELS: ClassVar[dict[str, int]] = {"m-small": GB // 2, "m-mid": GB, "m-big": 3 * GB, "m-huge": 9 * GB}

    def __init__(self, capacity: int = 10 * GB) -> None:
        self.clock = FakeClock()
        self.ctrl = AdmissionController(capacity)
        for spec in self.CONTEXTS:
            self.ctrl.add_context(spec)
        self.live: dict[int, Grant] = {}
        self.tickets: list[object] = []
        self.leak = 0  # bytes the fake allocator keeps after unloads
        self.residency = ModelResidency(
            self.ctrl,
            load=self._load,
            unload=self._unload,
            free_bytes=lambda: capacity - self.ctrl.used_bytes() - self.leak,
            now_s=self.clock.monotonic,
        )
        self.ctrl.on_served = lambda ticket, grant: self._track(grant)
        self.ctrl.on_shed = self._shed
        self.evicted_owners: list[QoSPolicy] = []
        self.ops = 0

    async def _load(self, name: str) -> str:
        return f"handle-{name}"

    async def _unload(self, name: str, handle: object) -> None:
        model = self.residency.get(name)
        assert model is None  # removed before unload is called
        if self.ops % 7 == 0:
            self.leak += 64 * MB

    def _track(self, grant: Grant | None) -> None:
        if grant is not None:
            self.live[grant.grant_id] = grant

    def _shed(self, grant: Grant) -> None:
        # only best-effort borrowers are ever shed: never a Guaranteed or Burstable grant, nor a model
        assert grant.qos is BE
        assert grant.sheddable
        self.live.pop(grant.grant_id, None)

    def admit(self, ctx: str, nbytes: int) -> None:
        try:
            outcome = self.ctrl.admit(ctx, nbytes, now_s=self.clock.monotonic())
        except AdmissionRejected as exc:
            assert str(exc)  # noqa: PT017 - a rejection always says why
            return
        self._track(outcome.grant)
        self._forget_released()

    def enqueue(self, ctx: str, nbytes: int) -> None:
        try:
            ticket, outcome = self.ctrl.enqueue(ctx, nbytes, now_s=self.clock.monotonic(), timeout_s=2.0)
        except AdmissionRejected:
            return
        self._absorb(outcome)
        if ticket is not None and all(t is not ticket for t, _ in outcome.served):
            self.tickets.append(ticket)

    def _absorb(self, outcome: object) -> None:
        self._track(getattr(outcome, "grant", None))
        for _, grant in getattr(outcome, "served", []):
            self._track(grant)
        self._forget_released()

    def _forget_released(self) -> None:
        for gid in [gid for gid, g in self.live.items() if g.released]:
            del self.live[gid]

    def finish(self, index: int, reason: str) -> None:
        if not self.live:
            return
        grant = list(self.live.values())[index % len(self.live)]
        self._absorb(self.ctrl.release(grant, reason, now_s=self.clock.monotonic()))

    def withdraw(self, index: int) -> None:
        if self.tickets:
            self.ctrl.withdraw(self.tickets.pop(index % len(self.tickets)))  # type: ignore[arg-type]

    def load(self, model: str, ctx: str, pinned: bool) -> None:
        before = {n: self.residency.get(n).grant.qos for n in self.residency.resident}  # type: ignore[union-attr]
        try:
            asyncio.run(self.residency.ensure(model, self.MODELS[model], context=ctx, pinned=pinned))
        except (ModelDoesNotFit, AdmissionRejected) as exc:
            assert "needs" in str(exc) or "cannot fit" in str(exc)  # noqa: PT017
        for name, qos in before.items():
            if name not in self.residency.resident:
                self.evicted_owners.append(qos)
        self._forget_released()

    def evict(self, index: int) -> None:
        names = [n for n in self.residency.resident if not self.residency.get(n).pinned]  # type: ignore[union-attr]
        if names:
            asyncio.run(self.residency.evict(names[index % len(names)]))
        self._forget_released()

    def unpin(self, index: int) -> None:
        names = self.residency.resident
        if names:
            self.residency.unpin(names[index % len(names)])

    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self._absorb(self.ctrl.pump(now_s=self.clock.monotonic()))
        self.tickets = [t for t in self.tickets if t in self.ctrl.queued]

    def trim(self) -> None:
        self.leak = 0
        self.residency.remeasure()
        self._forget_released()

    def check(self) -> None:
        self.ops += 1
        ctrl = self.ctrl
        self._forget_released()
        used = ctrl.used_bytes()
        assert used <= ctrl.capacity_bytes
        sheddable_left = any(g.sheddable for g in ctrl.grants)
        assert used + ctrl.external_bytes <= ctrl.capacity_bytes or not sheddable_left
        for spec in ctrl.contexts:
            assert 0 <= ctrl.used_bytes(spec.name) <= spec.max_bytes
        # accounting matches the grants that are really live (request grants plus resident models)
        model_ids = {self.residency.get(n).grant.grant_id for n in self.residency.resident}  # type: ignore[union-attr]
        assert {g.grant_id for g in ctrl.grants} == set(self.live) | model_ids
        assert sum(g.nbytes for g in ctrl.grants) == used
        assert G not in self.evicted_owners

    def drain(self) -> None:
        for ticket in list(self.ctrl.queued):
            self.ctrl.withdraw(ticket)
        for grant in list(self.live.values()):
            self.ctrl.release(grant, "cancelled")
        asyncio.run(self.residency.close())
        self.leak = 0
        self.residency.remeasure()
        assert self.ctrl.used_bytes() == 0
        assert self.ctrl.grants == []
        assert self.ctrl.queued == []
        assert self.ctrl.external_bytes == 0
        assert self.residency.resident == []

    def random_step(self, rng: random.Random) -> None:
        ctx = rng.choice(self.CONTEXTS).name
        op = rng.random()
        size = rng.choice((64 * MB, 256 * MB, GB, 2 * GB))
        if op < 0.25:
            self.admit(ctx, size)
        elif op < 0.4:
            self.enqueue(ctx, size)
        elif op < 0.55:
            self.finish(rng.randrange(1 << 30), "completed")
        elif op < 0.62:
            self.finish(rng.randrange(1 << 30), "failed")
        elif op < 0.7:
            self.finish(rng.randrange(1 << 30), "cancelled")
        elif op < 0.74:
            self.withdraw(rng.randrange(1 << 30))
        elif op < 0.84:
            self.load(rng.choice(list(self.MODELS)), ctx, rng.random() < 0.1)
        elif op < 0.9:
            self.evict(rng.randrange(1 << 30))
        elif op < 0.93:
            self.unpin(rng.randrange(1 << 30))
        elif op < 0.98:
            self.tick(rng.choice((0.1, 0.5, 1.0, 3.0)))
        else:
            self.trim()
        self.check()


def test_hundred_thousand_random_operations_keep_capacity_and_leak_nothing() -> None:
    harness = Harness()
    rng = random.Random(20260523)
    for _ in range(100_000):
        harness.random_step(rng)
    stats = harness.ctrl.stats
    # the run exercised every path
    assert stats["shed"] > 0
    assert stats["expired"] > 0
    assert stats["evicted"] > 0
    assert stats["completed"] > 0
    assert stats["failed"] > 0
    assert stats["cancelled"] > 0
    harness.drain()


contexts = st.sampled_from([s.name for s in Harness.CONTEXTS])
sizes = st.sampled_from([64 * MB, 256 * MB, GB, 2 * GB, 5 * GB])
indices = st.integers(min_value=0, max_value=1000)


class AdmissionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness()

    @rule(ctx=contexts, nbytes=sizes)
    def admit(self, ctx: str, nbytes: int) -> None:
        self.h.admit(ctx, nbytes)

    @rule(ctx=contexts, nbytes=sizes)
    def enqueue(self, ctx: str, nbytes: int) -> None:
        self.h.enqueue(ctx, nbytes)

    @rule(i=indices, reason=st.sampled_from(["completed", "failed", "cancelled"]))
    def finish(self, i: int, reason: str) -> None:
        self.h.finish(i, reason)

    @rule(i=indices)
    def withdraw(self, i: int) -> None:
        self.h.withdraw(i)

    @rule(model=st.sampled_from(list(Harness.MODELS)), ctx=contexts, pinned=st.booleans())
    def load(self, model: str, ctx: str, pinned: bool) -> None:
        self.h.load(model, ctx, pinned)

    @rule(i=indices)
    def evict(self, i: int) -> None:
        self.h.evict(i)

    @rule(i=indices)
    def unpin(self, i: int) -> None:
        self.h.unpin(i)

    @rule(seconds=st.sampled_from([0.1, 1.0, 3.0]))
    def tick(self, seconds: float) -> None:
        self.h.tick(seconds)

    @rule()
    def trim(self) -> None:
        self.h.trim()

    @invariant()
    def holds(self) -> None:
        self.h.check()

    def teardown(self) -> None:
        self.h.drain()


TestAdmissionMachine = AdmissionMachine.TestCase
TestAdmissionMachine.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
