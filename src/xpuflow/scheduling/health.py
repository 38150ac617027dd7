"""A worker's health as a small state machine: healthy -> unhealthy -> probing -> healthy.

Two kinds of evidence move it. Requests: ``failure_threshold`` consecutive failures make a worker
unhealthy; after a cooldown one request is let through as a probe (half-open); its success makes the
worker healthy again, its failure opens it again with the cooldown doubled. The cooldowns grow
``cooldown_s``, ``2 * cooldown_s``, ... up to ``max_cooldown_s`` (0.25 s, 0.5 s, 1 s, 2 s, 4 s by
default) and start over after a success, so a worker that is back is used again within a fraction of
a second while one that stays down costs one probe every few seconds.

Active checks (``record_check``, from a health poller such as ``routing.remote_state``): a failed
check makes the worker unhealthy at once and holds it there (no request probes while checks fail); a
passing check undoes what checks did (healthy again) and, for a worker that requests took out, makes
its half-open probe due now instead of after the cooldown: a server that answers its health endpoint
may still fail requests, so only a served request closes what requests opened.

A probe whose outcome is never reported (its caller went away) stops blocking after
``probe_timeout_s``, so a worker can never be stuck half-open. Time is injected::

    health = HealthTracker(clock=FakeClock())
    for _ in range(3):
        health.record_failure("timeout")
    health.available()        # False until the cooldown passes, then True once (the probe)
    health.record_check(True) # a passing active check: the probe is due now
"""

from __future__ import annotations

import threading
from enum import Enum

from xpuflow.clock import Clock, SystemClock

__all__ = ["HealthState", "HealthTracker"]


class HealthState(str, Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    PROBING = "probing"  # half-open: one request is testing the worker


class HealthTracker:
    """Consecutive-failure health tracking, half-open probes on a growing schedule, active checks."""

    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown_s: float = 0.25,
        clock: Clock | None = None,
        probe_timeout_s: float = 10.0,
        max_cooldown_s: float = 4.0,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        if not probe_timeout_s > 0:
            raise ValueError(f"probe_timeout_s must be > 0, got {probe_timeout_s}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max(cooldown_s, max_cooldown_s)  # a long first cooldown stays fixed
        self.probe_timeout_s = probe_timeout_s
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._state = HealthState.HEALTHY
        self._consecutive_failures = 0
        self._failed_probes = 0  # since the last success: how far the cooldown has grown
        self._opened_at_s = 0.0
        self._probe_started_s = 0.0
        self._held_by_check = False  # a failing active check holds the worker out
        self._opened_by_check = False
        self.last_error = ""
        self.total_failures = 0
        self.checks_failed = 0
        self.recovered_at_s: float | None = None  # when it last became healthy after being out

    @property
    def state(self) -> HealthState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def healthy(self) -> bool:
        return self._state is HealthState.HEALTHY

    @property
    def cooldown_now_s(self) -> float:
        """The cooldown before the next probe: ``cooldown_s * 2 ** failed_probes``, capped."""
        return min(self.max_cooldown_s, self.cooldown_s * 2.0 ** min(self._failed_probes, 60))

    def available(self) -> bool:
        """May a request go to this worker now? Unhealthy workers admit one probe after the cooldown,
        unless an active check is failing."""
        with self._lock:
            if self._state is HealthState.HEALTHY:
                return True
            if self._held_by_check:
                return False
            now = self._clock.monotonic()
            due = (
                self._state is HealthState.UNHEALTHY and now - self._opened_at_s >= self.cooldown_now_s
            ) or (self._state is HealthState.PROBING and now - self._probe_started_s >= self.probe_timeout_s)
            if due:
                self._state = HealthState.PROBING
                self._probe_started_s = now
                return True
            return False

    def _recover(self) -> None:
        if self._state is not HealthState.HEALTHY:
            self.recovered_at_s = self._clock.monotonic()
        self._consecutive_failures = 0
        self._failed_probes = 0
        self._held_by_check = False
        self._opened_by_check = False
        self._state = HealthState.HEALTHY

    def _open(self, *, by_check: bool) -> None:
        if self._state is HealthState.HEALTHY:
            self._opened_by_check = by_check
        elif not by_check:
            self._opened_by_check = False  # requests fail too: a passing check is not enough now
        if self._state is HealthState.PROBING and not by_check:
            self._failed_probes += 1
        self._state = HealthState.UNHEALTHY
        self._opened_at_s = self._clock.monotonic()

    def record_success(self) -> None:
        if (  # healthy with nothing to forget (every request of a healthy worker): nothing to change
            self._state is HealthState.HEALTHY
            and not self._consecutive_failures
            and not self._failed_probes
            and not self._held_by_check
            and not self._opened_by_check
        ):
            return
        with self._lock:
            self._recover()

    def record_failure(self, reason: str = "") -> None:
        with self._lock:
            self._consecutive_failures += 1
            self.total_failures += 1
            self.last_error = reason
            if self._state is HealthState.PROBING or (
                self._state is HealthState.HEALTHY and self._consecutive_failures >= self.failure_threshold
            ):
                self._open(by_check=False)
            elif self._state is HealthState.UNHEALTHY:
                self._opened_by_check = False

    def record_check(self, ok: bool, reason: str = "") -> None:
        """The outcome of an active health check (see the module docstring)."""
        with self._lock:
            if not ok:
                self.checks_failed += 1
                self.last_error = reason or "health check failed"
                self._held_by_check = True
                self._open(by_check=True)
                return
            self._held_by_check = False
            if self._state is HealthState.HEALTHY:
                return
            if self._opened_by_check:
                self._recover()
            elif self._state is HealthState.UNHEALTHY:
                self._opened_at_s = float("-inf")  # its half-open probe is due now

    def to_dict(self) -> dict[str, object]:
        """The state, why, and when the next probe is due (for status pages)."""
        return {
            "state": self._state.value,
            "consecutive_failures": self._consecutive_failures,
            "cooldown_s": self.cooldown_now_s,
            "held_by_check": self._held_by_check,
            "checks_failed": self.checks_failed,
            "last_error": self.last_error,
        }
