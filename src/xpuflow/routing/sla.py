"""Per-tier latency against an SLA: an EMA with a warm-up seed and a half-open circuit breaker.

A pure state machine: every call takes the time (``now_s``, monotonic seconds) as an argument, so tests
drive it with numbers and the router passes its injected clock's reading. No threads, no I/O; the caller
serialises access.

    closed ──EMA > SLA──▶ open ──cooldown_s passes──▶ half-open ──probe ≤ SLA──▶ closed
                            ▲                              │
                            └────────probe > SLA───────────┘

- **closed**: traffic flows; every observation moves the EMA. The EMA starts at ``warmup_seed_ms`` rather
  than at the first sample, so the first slow request (a model loading its weights) is averaged with a
  plausible value instead of becoming the EMA outright and tripping the circuit on its own.
- **open**: the router sends the tier's traffic to a weaker tier. Stragglers still move the EMA.
- **half-open**: once ``cooldown_s`` has passed, one request at a time goes through as a probe. Its
  latency re-seeds the EMA (the old value describes the bad period); at or under the SLA the circuit
  closes, over it the circuit opens for another cooldown. A probe whose latency is never reported
  stops blocking after ``probe_timeout_s`` and the next request probes again.

So a breach never locks a tier out: an open circuit always turns half-open after ``cooldown_s``, a
half-open one always admits a probe within ``probe_timeout_s``, and one probe under the SLA closes it.

    circuit = LatencyCircuit(SlaPolicy(latency_sla_ms=2000, warmup_seed_ms=800))
    circuit.observe(5000, now_s=1.0)    # cold start: EMA 1640 ms, still closed thanks to the seed
    circuit.observe(9000, now_s=2.0)    # EMA 3112 ms > 2000 ms: open
    circuit.allows(now_s=5.0)           # False: cooling down
    circuit.allows(now_s=12.5)          # True: half-open, this request is the probe
    circuit.on_dispatch(now_s=12.5); circuit.observe(300, now_s=12.8)    # closed again
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from xpuflow.errors import ConfigError

__all__ = ["CircuitState", "LatencyCircuit", "SlaPolicy", "SlaTracker"]


class CircuitState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class SlaPolicy:
    """The numbers one tier's circuit runs on.

    ``ema_alpha`` is the weight of the newest sample (0.2: about the last ten requests matter).
    ``probe_timeout_s`` defaults to ``cooldown_s``.
    """

    latency_sla_ms: float
    warmup_seed_ms: float
    ema_alpha: float = 0.2
    cooldown_s: float = 10.0
    probe_timeout_s: float | None = None

    def __post_init__(self) -> None:
        checks = (
            ("latency_sla_ms", self.latency_sla_ms > 0, "a positive number of milliseconds"),
            ("sla_warmup_seed_ms", self.warmup_seed_ms >= 0, "zero or more milliseconds"),
            ("sla_ema_alpha", 0 < self.ema_alpha <= 1, "within (0, 1]"),
            ("sla_cooldown_s", self.cooldown_s > 0, "a positive number of seconds"),
        )
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"{name} must be {want}", field=name)
        if self.probe_timeout_s is not None and self.probe_timeout_s <= 0:
            raise ConfigError(
                "sla_probe_timeout_s must be a positive number of seconds", field="sla_probe_timeout_s"
            )

    @property
    def effective_probe_timeout_s(self) -> float:
        return self.cooldown_s if self.probe_timeout_s is None else self.probe_timeout_s


class LatencyCircuit:
    """One tier's latency EMA and half-open breaker. Not thread-safe: the owner holds a lock."""

    __slots__ = ("_ema_ms", "_opened_at_s", "_probe_at_s", "_state", "observations", "policy", "trips")

    def __init__(self, policy: SlaPolicy) -> None:
        self.policy = policy
        self._ema_ms = float(policy.warmup_seed_ms)
        self._state = CircuitState.CLOSED
        self._opened_at_s = 0.0
        self._probe_at_s: float | None = None
        #: Latencies observed and how often the circuit opened (for dashboards and tests).
        self.observations = 0
        self.trips = 0

    @property
    def ema_ms(self) -> float:
        return self._ema_ms

    def state(self, now_s: float) -> CircuitState:
        """The state at ``now_s``: an open circuit whose cooldown has passed reads as half-open."""
        if self._state is CircuitState.OPEN and now_s - self._opened_at_s >= self.policy.cooldown_s:
            return CircuitState.HALF_OPEN
        return self._state

    def allows(self, now_s: float) -> bool:
        """Whether a request may go to this tier now (does not change anything; see ``on_dispatch``)."""
        state = self.state(now_s)
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            return False
        probe = self._probe_at_s
        return probe is None or now_s - probe >= self.policy.effective_probe_timeout_s

    def retry_in_s(self, now_s: float) -> float:
        """Seconds until this tier admits a request again (0 when it does now)."""
        state = self.state(now_s)
        if state is CircuitState.OPEN:
            return self._opened_at_s + self.policy.cooldown_s - now_s
        if state is CircuitState.HALF_OPEN and self._probe_at_s is not None:
            return max(0.0, self._probe_at_s + self.policy.effective_probe_timeout_s - now_s)
        return 0.0

    def on_dispatch(self, now_s: float) -> None:
        """Record that a request was sent here; in half-open that request is the probe."""
        if self._state is CircuitState.CLOSED:
            return
        if self.state(now_s) is CircuitState.HALF_OPEN and self.allows(now_s):
            self._state = CircuitState.HALF_OPEN
            self._probe_at_s = now_s

    def observe(self, latency_ms: float, now_s: float) -> CircuitState:
        """Feed one request's latency; returns the state after it. NaN, inf and negatives are ignored."""
        if not math.isfinite(latency_ms) or latency_ms < 0:
            return self.state(now_s)
        self.observations += 1
        policy = self.policy
        state = self.state(now_s)
        if state is CircuitState.HALF_OPEN:
            # The probe's answer (or a straggler's, equally fresh) replaces the EMA of the bad period.
            self._ema_ms = float(latency_ms)
            self._probe_at_s = None
            if self._ema_ms <= policy.latency_sla_ms:
                self._state = CircuitState.CLOSED
            else:
                self._open(now_s)
            return self._state
        self._ema_ms += policy.ema_alpha * (latency_ms - self._ema_ms)
        if state is CircuitState.CLOSED and self._ema_ms > policy.latency_sla_ms:
            self._open(now_s)
        return self._state

    def _open(self, now_s: float) -> None:
        self._state = CircuitState.OPEN
        self._opened_at_s = now_s
        self._probe_at_s = None
        self.trips += 1

    def explain(self, now_s: float) -> str:
        """One line for people: state, EMA against SLA, and when it re-probes."""
        sla = self.policy.latency_sla_ms
        state = self.state(now_s)
        head = f"EMA {self._ema_ms:.0f} ms vs SLA {sla:.0f} ms"
        if state is CircuitState.CLOSED:
            return f"{head}, circuit closed"
        if state is CircuitState.OPEN:
            return f"{head}, circuit open (re-probe in {self.retry_in_s(now_s):.1f} s)"
        if self.allows(now_s):
            return f"{head}, circuit half-open: this request probes it"
        return f"{head}, circuit half-open, probe in flight (next probe in {self.retry_in_s(now_s):.1f} s)"

    def to_dict(self, now_s: float) -> dict[str, Any]:
        return {
            "state": self.state(now_s).value,
            "ema_ms": round(self._ema_ms, 3),
            "latency_sla_ms": self.policy.latency_sla_ms,
            "observations": self.observations,
            "trips": self.trips,
            "retry_in_s": round(self.retry_in_s(now_s), 3),
        }


class SlaTracker:
    """The circuits of every tier, by tier name. Not thread-safe: the router holds a lock around it."""

    def __init__(self, policies: Mapping[str, SlaPolicy]) -> None:
        self._circuits = {name: LatencyCircuit(policy) for name, policy in policies.items()}

    def get(self, tier: str) -> LatencyCircuit | None:
        return self._circuits.get(tier)

    def __getitem__(self, tier: str) -> LatencyCircuit:
        try:
            return self._circuits[tier]
        except KeyError:
            raise ConfigError(
                f"unknown tier {tier!r}; tiers: {', '.join(self._circuits)}", field="tier"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._circuits)

    def observe(self, tier: str, latency_ms: float, now_s: float) -> CircuitState:
        return self[tier].observe(latency_ms, now_s)

    def on_dispatch(self, tier: str, now_s: float) -> None:
        circuit = self._circuits.get(tier)
        if circuit is not None:
            circuit.on_dispatch(now_s)

    def to_dict(self, now_s: float) -> dict[str, dict[str, Any]]:
        return {name: circuit.to_dict(now_s) for name, circuit in self._circuits.items()}
