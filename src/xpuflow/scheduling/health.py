"""A worker's health as a small state machine: healthy -> unhealthy -> probing -> healthy.

``failure_threshold`` consecutive failures make a worker unhealthy; after ``cooldown_s`` one request
is let through as a probe (half-open); its success makes the worker healthy again, its failure
starts a new cooldown. A probe whose outcome is never reported (its caller went away) stops blocking
after ``probe_timeout_s``, so a worker can never be stuck half-open. Time is injected::

    health = HealthTracker(clock=FakeClock())
    for _ in range(3):
        health.record_failure("timeout")
    health.available()        # False until the cooldown passes, then True once (the probe)
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
    """Consecutive-failure health tracking with a half-open probe after a cooldown."""

    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown_s: float = 10.0,
        clock: Clock | None = None,
        probe_timeout_s: float | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.probe_timeout_s = cooldown_s if probe_timeout_s is None else probe_timeout_s
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._state = HealthState.HEALTHY
        self._consecutive_failures = 0
        self._opened_at_s = 0.0
        self._probe_started_s = 0.0
        self.last_error = ""
        self.total_failures = 0

    @property
    def state(self) -> HealthState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def healthy(self) -> bool:
        return self._state is HealthState.HEALTHY

    def available(self) -> bool:
        """May a request go to this worker now? Unhealthy workers admit one probe after the cooldown."""
        with self._lock:
            if self._state is HealthState.HEALTHY:
                return True
            now = self._clock.monotonic()
            due = (self._state is HealthState.UNHEALTHY and now - self._opened_at_s >= self.cooldown_s) or (
                self._state is HealthState.PROBING and now - self._probe_started_s >= self.probe_timeout_s
            )
            if due:
                self._state = HealthState.PROBING
                self._probe_started_s = now
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._consecutive_failures = 0
            self._state = HealthState.HEALTHY

    def record_failure(self, reason: str = "") -> None:
        with self._lock:
            self._consecutive_failures += 1
            self.total_failures += 1
            self.last_error = reason
            if self._state is HealthState.PROBING or self._consecutive_failures >= self.failure_threshold:
                self._state = HealthState.UNHEALTHY
                self._opened_at_s = self._clock.monotonic()
