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


def test_failed_probes_double_the_cooldown_up_to_its_cap_and_a_success_resets_it() -> None:
    clock = FakeClock()
    health = HealthTracker(failure_threshold=1, clock=clock)  # defaults: 0.25 s doubling to 4 s
    health.record_failure("x")
    waits = []
    for _ in range(6):
        waited = 0.0
        while not health.available():
            clock.advance(0.125)
            waited += 0.125
        waits.append(waited)
        health.record_failure("still down")
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert health.last_error == "still down"
    clock.advance(4.0)
    assert health.available()
    health.record_success()
    health.record_failure("down again")
    assert not health.available()
    clock.advance(0.25)
    assert health.available()  # the schedule started over


def test_a_long_first_cooldown_stays_fixed() -> None:
    clock = FakeClock()
    health = HealthTracker(failure_threshold=1, cooldown_s=10.0, clock=clock)
    health.record_failure("x")
    clock.advance(10.0)
    assert health.available()
    health.record_failure("still down")
    clock.advance(10.0)
    assert health.available()


def test_a_failed_check_holds_the_worker_out_until_a_check_passes() -> None:
    clock = FakeClock()
    health = HealthTracker(clock=clock)
    health.record_check(False, "no answer within 1 s")
    assert health.state is HealthState.UNHEALTHY
    assert health.last_error == "no answer within 1 s"
    clock.advance(100.0)
    assert not health.available()  # no request is spent probing a server that does not answer
    health.record_check(True)
    assert health.healthy
    assert health.recovered_at_s == 100.0
    health.record_check(True)  # passing checks on a healthy worker change nothing
    assert health.healthy


def test_a_passing_check_does_not_heal_what_requests_broke_but_makes_the_probe_due() -> None:
    clock = FakeClock()
    health = HealthTracker(failure_threshold=2, cooldown_s=5.0, clock=clock)
    health.record_failure("500")
    health.record_failure("500")
    health.record_check(False, "down")  # then it stopped answering as well
    health.record_check(True)
    assert health.state is HealthState.UNHEALTHY
    assert health.available()  # at once, not after 5 s
    assert health.state is HealthState.PROBING
    health.record_success()
    assert health.healthy


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        HealthTracker(failure_threshold=0)
    with pytest.raises(ValueError, match="cooldown_s"):
        HealthTracker(cooldown_s=-1)
    with pytest.raises(ValueError, match="probe_timeout_s"):
        HealthTracker(probe_timeout_s=0)


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
    # whatever happened, after the longest cooldown a probe is admitted and one success restores health
    clock.advance(health.max_cooldown_s)
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
