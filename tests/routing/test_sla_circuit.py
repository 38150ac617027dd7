"""The latency SLA: EMA with a warm-up seed, the half-open circuit, and that it never locks a tier out."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from routing_helpers import FixedScorer

from xpuflow.clock import FakeClock
from xpuflow.errors import ConfigError
from xpuflow.routing import AdaptiveRouter, CircuitState, LatencyCircuit, RoutingConfig, SlaPolicy, SlaTracker
from xpuflow.telemetry import VRAMMonitor

SLA_MS = 2000.0
COOLDOWN_S = 10.0


def circuit(**overrides: float) -> LatencyCircuit:
    values: dict[str, float] = {"latency_sla_ms": SLA_MS, "warmup_seed_ms": 800.0, "cooldown_s": COOLDOWN_S}
    values.update(overrides)
    return LatencyCircuit(SlaPolicy(**values))  # type: ignore[arg-type]


def tripped(at_s: float = 0.0) -> LatencyCircuit:
    c = circuit()
    for _ in range(10):
        c.observe(9000.0, at_s)
    assert c.state(at_s) is CircuitState.OPEN
    return c


def test_the_seed_absorbs_a_cold_start() -> None:
    c = circuit()
    assert c.ema_ms == 800.0
    assert c.observe(5000.0, 1.0) is CircuitState.CLOSED  # 800 + 0.2 * 4200 = 1640
    assert c.ema_ms == pytest.approx(1640.0)
    assert c.observe(9000.0, 2.0) is CircuitState.OPEN  # 1640 + 0.2 * 7360 = 3112
    assert c.trips == 1


def test_without_a_seed_the_first_slow_sample_would_trip() -> None:
    c = circuit(warmup_seed_ms=5000.0)
    assert c.observe(5000.0, 1.0) is CircuitState.OPEN


def test_open_blocks_until_the_cooldown_then_lets_one_probe_through() -> None:
    c = tripped(at_s=0.0)
    assert not c.allows(5.0)
    assert c.retry_in_s(5.0) == pytest.approx(5.0)
    assert "circuit open (re-probe in 5.0 s)" in c.explain(5.0)
    assert c.state(10.0) is CircuitState.HALF_OPEN
    assert c.allows(10.0)
    assert "this request probes it" in c.explain(10.0)
    c.on_dispatch(10.0)  # the probe goes out
    assert not c.allows(10.5)  # one at a time
    assert "probe in flight" in c.explain(10.5)


def test_a_fast_probe_closes_the_circuit() -> None:
    c = tripped()
    c.on_dispatch(11.0)
    assert c.observe(400.0, 11.4) is CircuitState.CLOSED
    assert c.ema_ms == 400.0  # the probe re-seeds the EMA; the bad period is over
    assert c.allows(11.5)


def test_a_slow_probe_reopens_for_another_cooldown() -> None:
    c = tripped()
    c.on_dispatch(11.0)
    assert c.observe(7000.0, 13.0) is CircuitState.OPEN
    assert not c.allows(22.9)
    assert c.allows(23.0)
    assert c.trips == 2


def test_a_probe_never_reported_stops_blocking_after_the_probe_timeout() -> None:
    c = circuit(probe_timeout_s=3.0)
    for _ in range(10):
        c.observe(9000.0, 0.0)
    c.on_dispatch(10.0)
    assert not c.allows(12.9)
    assert c.allows(13.0)


def test_a_straggler_after_the_cooldown_counts_as_the_probe() -> None:
    c = tripped()
    assert c.observe(300.0, 15.0) is CircuitState.CLOSED


def test_stragglers_during_the_cooldown_move_the_ema_but_not_the_state() -> None:
    c = tripped()
    before = c.ema_ms
    assert c.observe(100.0, 1.0) is CircuitState.OPEN
    assert c.ema_ms < before


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_nonsense_latencies_are_ignored(bad: float) -> None:
    c = circuit()
    c.observe(bad, 1.0)
    assert c.ema_ms == 800.0
    assert c.observations == 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"latency_sla_ms": 0.0}, "latency_sla_ms"),
        ({"warmup_seed_ms": -1.0}, "sla_warmup_seed_ms"),
        ({"ema_alpha": 0.0}, "sla_ema_alpha"),
        ({"cooldown_s": 0.0}, "sla_cooldown_s"),
        ({"probe_timeout_s": -2.0}, "sla_probe_timeout_s"),
    ],
)
def test_policy_validation_names_the_field(overrides: dict[str, float], field: str) -> None:
    values: dict[str, float] = {"latency_sla_ms": SLA_MS, "warmup_seed_ms": 800.0, **overrides}
    with pytest.raises(ConfigError) as info:
        SlaPolicy(**values)  # type: ignore[arg-type]
    assert info.value.field == field


def test_tracker_knows_its_tiers() -> None:
    tracker = SlaTracker({"a": SlaPolicy(100.0, 50.0), "b": SlaPolicy(200.0, 50.0)})
    assert list(tracker) == ["a", "b"]
    with pytest.raises(ConfigError, match="unknown tier 'c'; tiers: a, b"):
        tracker.observe("c", 10.0, 0.0)
    tracker.on_dispatch("c", 0.0)  # dispatching to an unknown tier is a no-op, never a crash
    assert tracker.to_dict(0.0)["a"]["state"] == "closed"


# -- through the router -----------------------------------------------------------------------------


def sla_router(clock: FakeClock, cooldown_s: float = COOLDOWN_S) -> AdaptiveRouter:
    config = RoutingConfig(latency_sla_ms=SLA_MS, sla_cooldown_s=cooldown_s, vram_source="none")
    return AdaptiveRouter(config, scorer=FixedScorer(0.9), monitor=VRAMMonitor(None), clock=clock)


def test_breach_diverts_then_a_probe_then_recovery() -> None:
    clock = FakeClock()
    router = sla_router(clock)
    assert router.route("hard") == "tier_high"
    for _ in range(5):
        router.observe("tier_high", 6000.0)
    decision = router.route_decision("hard")
    assert decision.tier == "tier_low"
    assert decision.reason.startswith("default:")
    assert decision.alternatives[0].candidate == "tier_high"
    assert "latency_sla: tier_high EMA" in decision.alternatives[0].reason
    assert "circuit open" in decision.alternatives[0].reason

    clock.advance(COOLDOWN_S)
    assert router.route("hard") == "tier_high"  # the probe
    assert router.route("hard") == "tier_low"  # while the probe is out, the rest stays diverted
    assert router.observe("tier_high", 700.0) is CircuitState.CLOSED
    assert [router.route("hard") for _ in range(3)] == ["tier_high"] * 3
    assert router.status()["circuits"]["tier_high"]["state"] == "closed"


def test_the_weakest_tier_is_never_diverted_from() -> None:
    clock = FakeClock()
    router = sla_router(clock)
    for _ in range(5):
        router.observe("tier_high", 9000.0)
        router.observe("tier_low", 9000.0)
    decision = router.route_decision("hard")
    assert decision.tier == "tier_low"
    assert any("last tier" in a.reason for a in decision.alternatives)


latency = st.floats(min_value=0.0, max_value=20_000.0, allow_nan=False)
step_s = st.floats(min_value=0.0, max_value=30.0, allow_nan=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=st.lists(st.tuples(latency, step_s, st.booleans()), max_size=60),
    good_ms=st.floats(min_value=0.0, max_value=SLA_MS * 0.99),
    tick_s=st.floats(min_value=0.05, max_value=5.0),
)
def test_a_breach_never_locks_the_strong_tier_out(
    history: list[tuple[float, float, bool]], good_ms: float, tick_s: float
) -> None:
    """Whatever happened before (breaches, lost probes), once tier_high answers under the SLA it is
    used again within one cooldown plus one probe, and stays in use."""
    clock = FakeClock()
    router = sla_router(clock)
    for latency_ms, advance_s, reported in history:
        tier = router.route("hard")
        if tier == "tier_high" and reported:  # unreported: a lost probe or a request still in flight
            router.observe(tier, latency_ms)
        clock.advance(advance_s)

    bound_s = COOLDOWN_S + COOLDOWN_S + 2 * tick_s  # cooldown, plus a lost probe's timeout, plus ticks
    waited_s = 0.0
    while router.route("hard") != "tier_high":
        assert waited_s <= bound_s, f"tier_high still locked out {waited_s:.1f} s after recovering"
        clock.advance(tick_s)
        waited_s += tick_s
    router.observe("tier_high", good_ms)
    for _ in range(20):
        assert router.route("hard") == "tier_high"
        router.observe("tier_high", good_ms)
        clock.advance(tick_s)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(latency, step_s, st.sampled_from(["observe", "dispatch", "wait"])), max_size=80))
def test_a_circuit_always_admits_again_within_cooldown_plus_probe_timeout(
    events: list[tuple[float, float, str]],
) -> None:
    c = circuit(probe_timeout_s=4.0)
    now = 0.0
    for latency_ms, advance_s, kind in events:
        if kind == "observe":
            c.observe(latency_ms, now)
        elif kind == "dispatch" and c.allows(now):
            c.on_dispatch(now)
        now += advance_s
    assert c.allows(now + COOLDOWN_S + 4.0)
