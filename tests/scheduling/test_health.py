from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpuflow.clock import FakeClock
from xpuflow.scheduling.health import HealthState, HealthTracker


def test_three_failures_then_cooldown_probe_then_recovery() -> None:
    clock = FakeClock()
    health = HealthTracker(failure_threshold=3, cooldown_s=5, clock=clock)
    health.record_failure("a")
    health.record_failure("b")
    assert health.available()
    health.record_failure("c")
    assert health.state is HealthState.UNHEALTHY
    assert not health.available()
    clock.advance(5)
    assert health.available()  # the probe
    assert health.state is HealthState.PROBING
    assert not health.available()  # only one probe at a time
    health.record_success()
    assert health.healthy
    assert health.consecutive_failures == 0


def test_failed_probe_restarts_cooldown() -> None:
    clock = FakeClock()
    health = HealthTracker(failure_threshold=1, cooldown_s=2, clock=clock)
    health.record_failure("x")
    clock.advance(2)
    assert health.available()
    health.record_failure("still down")
    assert not health.available()
    clock.advance(1.9)
    assert not health.available()
    clock.advance(0.1)
    assert health.available()
    assert health.last_error == "still down"


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        HealthTracker(failure_threshold=0)
    with pytest.raises(ValueError, match="cooldown_s"):
        HealthTracker(cooldown_s=-1)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from(["ok", "fail", "wait"]), max_size=60))
def test_never_locked_out_for_good(events: list[str]) -> None:
    clock = FakeClock()
    health = HealthTracker(failure_threshold=3, cooldown_s=1, clock=clock)
    for event in events:
        if event == "wait":
            clock.advance(1)
        elif health.available():
            (health.record_success if event == "ok" else health.record_failure)()
    # whatever happened, after a cooldown a probe is admitted and one success restores health
    clock.advance(1)
    assert health.available()
    health.record_success()
    assert health.healthy


def test_a_probe_never_reported_stops_blocking_after_its_timeout() -> None:
    clock = FakeClock()
    health = HealthTracker(failure_threshold=1, cooldown_s=2, clock=clock, probe_timeout_s=5)
    health.record_failure("down")
    clock.advance(2)
    assert health.available()  # probe handed out; its caller vanishes and never reports
    clock.advance(4.9)
    assert not health.available()
    clock.advance(0.1)
    assert health.available()  # a new probe
