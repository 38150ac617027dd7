"""Memory admission for QoS contexts: a pure state machine over one device's byte budget.

Three classes share a device of ``capacity_bytes``:

- **Guaranteed** contexts reserve ``max_bytes`` when they are created; their admissions always fit
  in that reservation and are never shed for a lower class.
- **Burstable** contexts reserve ``base_bytes``; above it they burst into capacity that no
  reservation protects, up to ``max_bytes``.
- **BestEffort** contexts reserve nothing. Their sheddable grants may borrow any free byte,
  including a Guaranteed or Burstable reservation that is idle; when the owner needs it back, the
  newest best-effort grants are shed first (``AdmissionOutcome.shed``), so the holder cancels them.

Every grant ends with exactly one ``release`` (complete, fail, cancel) or one shed; both return its
bytes at once. Waiting admissions are tickets, served by class, then in arrival order. Every refusal
is an ``AdmissionRejected`` whose message names the sizes and whose ``retry_after_s`` says when to
try again. No I/O and no clock reads: time arrives as ``now_s`` arguments::

    ctrl = AdmissionController(capacity_bytes=16 * GB)
    ctrl.add_context(ContextSpec("chat", QoSPolicy.GUARANTEED, max_bytes=8 * GB))
    outcome = ctrl.admit("chat", 2 * GB, now_s=0.0)
    ctrl.release(outcome.grant, "completed")
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from xpuflow.errors import AdmissionRejected, ConfigError

__all__ = [
    "GB",
    "MB",
    "AdmissionController",
    "AdmissionOutcome",
    "ContextSpec",
    "Grant",
    "QoSPolicy",
    "ReleaseReason",
    "Ticket",
]

MB = 1024**2
GB = 1024**3

ReleaseReason = str  # "completed" | "failed" | "cancelled" | "evicted"


def _fmt(nbytes: int) -> str:
    return f"{nbytes / GB:.2f} GiB" if abs(nbytes) >= GB else f"{nbytes / MB:.1f} MiB"


class QoSPolicy(str, Enum):
    """A context's class. ``rank`` orders service: lower is served first."""

    GUARANTEED = "guaranteed"
    BURSTABLE = "burstable"
    BEST_EFFORT = "best_effort"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    @classmethod
    def parse(cls, value: str | QoSPolicy) -> QoSPolicy:
        if isinstance(value, QoSPolicy):
            return value
        key = str(value).strip().lower().replace("-", "_")
        aliases = {"besteffort": "best_effort", "be": "best_effort"}
        try:
            return cls(aliases.get(key, key))
        except ValueError:
            raise ConfigError(
                f"unknown QoS class '{value}'; valid: guaranteed, burstable, best_effort", field="qos"
            ) from None


_RANKS = {QoSPolicy.GUARANTEED: 0, QoSPolicy.BURSTABLE: 1, QoSPolicy.BEST_EFFORT: 2}


@dataclass(frozen=True, slots=True)
class ContextSpec:
    """A context's budget. ``base_bytes`` is what is reserved up front: all of ``max_bytes`` for
    Guaranteed, ``base_bytes`` for Burstable, nothing for BestEffort."""

    name: str
    qos: QoSPolicy
    max_bytes: int
    base_bytes: int = 0

    @property
    def reserved_bytes(self) -> int:
        if self.qos is QoSPolicy.GUARANTEED:
            return self.max_bytes
        if self.qos is QoSPolicy.BURSTABLE:
            return self.base_bytes
        return 0


@dataclass(eq=False, slots=True)
class Grant:
    """Bytes held by one admission. ``sheddable`` grants of BestEffort contexts may be taken back."""

    grant_id: int
    context: str
    qos: QoSPolicy
    nbytes: int
    sheddable: bool
    granted_at_s: float
    released: bool = False
    release_reason: str | None = None


@dataclass(eq=False, slots=True)
class Ticket:
    """A waiting admission. ``deadline_s`` is the monotonic time after which it is rejected."""

    ticket_id: int
    context: str
    qos: QoSPolicy
    nbytes: int
    sheddable: bool
    enqueued_at_s: float
    deadline_s: float | None


@dataclass(slots=True)
class AdmissionOutcome:
    """What one input did: the grant it made (if any), grants shed to make room, tickets served
    from the queue, and tickets rejected (expired)."""

    grant: Grant | None = None
    shed: list[Grant] = field(default_factory=list)
    served: list[tuple[Ticket, Grant]] = field(default_factory=list)
    rejected: list[tuple[Ticket, AdmissionRejected]] = field(default_factory=list)


class _CapacityShort(Exception):
    """Internal: the device cannot fit the request now (as opposed to the context's own limit)."""


class AdmissionController:
    """The admission state machine for one device. Not thread-safe; the owner serializes calls."""

    def __init__(self, capacity_bytes: int, *, retry_after_s: float = 0.5, max_queue: int = 1024) -> None:
        if capacity_bytes <= 0:
            raise ConfigError("capacity_bytes must be positive", field="capacity_bytes")
        self.capacity_bytes = capacity_bytes
        self.retry_after_s = retry_after_s
        self.max_queue = max_queue
        self.external_bytes = 0  # measured memory outside our grants (allocator caches, other processes)
        self._specs: dict[str, ContextSpec] = {}
        self._used: Counter[str] = Counter()
        self._grants: dict[int, Grant] = {}
        self._queue: dict[int, Ticket] = {}
        self._ids = itertools.count(1)
        self.stats: Counter[str] = Counter()
        # Told about every shed grant, whichever input caused it, so its holder can cancel the work.
        self.on_shed: Callable[[Grant], None] | None = None
        # Told about every ticket served or expired, whichever input caused it (a release, an eviction,
        # a re-measurement), so no waiter is forgotten.
        self.on_served: Callable[[Ticket, Grant], None] | None = None
        self.on_expired: Callable[[Ticket, AdmissionRejected], None] | None = None

    # ---------------------------------------------------------------- contexts
    def add_context(self, spec: ContextSpec) -> None:
        """Register a context and reserve its ``reserved_bytes``; raises ConfigError naming the sizes
        when the reservations would exceed the device."""
        if spec.name in self._specs:
            raise ConfigError(f"context '{spec.name}' already exists", field="name")
        if spec.max_bytes <= 0 or not 0 <= spec.base_bytes <= spec.max_bytes:
            raise ConfigError(
                f"context '{spec.name}' needs 0 <= base ({spec.base_bytes}) <= max ({spec.max_bytes}) bytes",
                field="max_vram",
            )
        reserved = sum(s.reserved_bytes for s in self._specs.values())
        in_use = self._committed() + self._best_effort_unsheddable(())
        limit = self.capacity_bytes - self.external_bytes
        if reserved + spec.reserved_bytes > self.capacity_bytes or in_use + spec.reserved_bytes > limit:
            raise ConfigError(
                f"context '{spec.name}' reserves {_fmt(spec.reserved_bytes)} but only "
                f"{_fmt(self.capacity_bytes - reserved)} of {_fmt(self.capacity_bytes)} is unreserved; "
                "lower its budget or make it burstable",
                field="max_vram",
            )
        self._specs[spec.name] = spec

    def spec(self, name: str) -> ContextSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise ConfigError(
                f"unknown context '{name}'; known: {', '.join(sorted(self._specs)) or 'none'}",
                field="context",
            ) from None

    @property
    def contexts(self) -> list[ContextSpec]:
        return list(self._specs.values())

    # ---------------------------------------------------------------- views
    def used_bytes(self, context: str | None = None) -> int:
        return self._used[context] if context is not None else sum(self._used.values())

    def available_bytes(self) -> int:
        """Bytes a new BestEffort grant could take now without shedding anything."""
        return max(0, self.capacity_bytes - self.external_bytes - self.used_bytes())

    def unreserved_free_bytes(self) -> int:
        """Free bytes that no idle reservation protects: what a burst may take."""
        return max(0, self.capacity_bytes - self.external_bytes - self._committed())

    @property
    def grants(self) -> list[Grant]:
        return list(self._grants.values())

    @property
    def queued(self) -> list[Ticket]:
        return sorted(self._queue.values(), key=lambda t: (t.qos.rank, t.ticket_id))

    def _committed(self, extra: dict[str, int] | None = None) -> int:
        """Non-BestEffort usage plus every idle reservation: bytes that must stay available to owners."""
        total = 0
        for name, spec in self._specs.items():
            used = self._used[name] + (extra or {}).get(name, 0)
            if spec.qos is not QoSPolicy.BEST_EFFORT:
                total += max(used, spec.reserved_bytes)
        return total

    # ---------------------------------------------------------------- admission
    def _plan(
        self, context: str, nbytes: int, sheddable: bool, releasing: Iterable[Grant] = ()
    ) -> list[Grant]:
        """Grants to shed so the request fits, or raise AdmissionRejected (``_CapacityShort`` as cause
        when waiting may help). ``releasing`` are grants assumed already gone (eviction planning)."""
        spec = self.spec(context)
        if nbytes < 0:
            raise ConfigError("nbytes must be >= 0", field="nbytes")
        releasing = list(releasing)
        gone: dict[str, int] = Counter()
        for g in releasing:
            gone[g.context] -= g.nbytes
        used_ctx = self._used[context] + gone.get(context, 0)
        if nbytes > spec.max_bytes:
            raise AdmissionRejected(
                f"context '{context}' ({spec.qos.value}) cannot fit {_fmt(nbytes)}: its max is "
                f"{_fmt(spec.max_bytes)}; raise max_vram or split the work",
                retry_after_s=self.retry_after_s,
            )
        if used_ctx + nbytes > spec.max_bytes:
            raise AdmissionRejected(
                f"context '{context}' ({spec.qos.value}) uses {_fmt(used_ctx)} of {_fmt(spec.max_bytes)}; "
                f"{_fmt(nbytes)} more does not fit until its work completes",
                retry_after_s=self.retry_after_s,
            )
        limit = self.capacity_bytes - self.external_bytes
        total_after = self.used_bytes() + sum(gone.values()) + nbytes
        if spec.qos is QoSPolicy.BEST_EFFORT:
            if sheddable:
                need = total_after
                what = "free device memory"
            else:  # a grant that cannot be shed must not sit on someone's idle reservation
                extra = dict(gone)
                need = self._committed(extra) + self._best_effort_used(gone) + nbytes
                what = "unreserved device memory"
            if need > limit:
                raise AdmissionRejected(
                    f"best-effort context '{context}' needs {_fmt(nbytes)} but only "
                    f"{_fmt(max(0, limit - need + nbytes))} of {what} is left; retry later",
                    retry_after_s=self.retry_after_s,
                ) from _CapacityShort()
            return []
        extra = dict(gone)
        extra[context] = extra.get(context, 0) + nbytes
        committed = self._committed(extra) + self._best_effort_unsheddable(releasing)
        if committed > limit:
            raise AdmissionRejected(
                f"{spec.qos.value} context '{context}' cannot burst by {_fmt(nbytes)}: only "
                f"{_fmt(max(0, limit - committed + nbytes))} of unreserved device memory is free; "
                "retry later",
                retry_after_s=self.retry_after_s,
            ) from _CapacityShort()
        shed: list[Grant] = []
        overflow = total_after - limit
        if overflow > 0:  # newest best-effort borrowers go first
            victims = sorted(
                (g for g in self._grants.values() if g.sheddable and g.qos is QoSPolicy.BEST_EFFORT),
                key=lambda g: g.grant_id,
                reverse=True,
            )
            for victim in victims:
                if overflow <= 0:
                    break
                shed.append(victim)
                overflow -= victim.nbytes
        return shed

    def _best_effort_used(self, gone: dict[str, int]) -> int:
        return sum(
            self._used[n] + gone.get(n, 0) for n, s in self._specs.items() if s.qos is QoSPolicy.BEST_EFFORT
        )

    def _best_effort_unsheddable(self, releasing: Iterable[Grant]) -> int:
        skip = {g.grant_id for g in releasing}
        return sum(
            g.nbytes
            for g in self._grants.values()
            if g.qos is QoSPolicy.BEST_EFFORT and not g.sheddable and g.grant_id not in skip
        )

    def check(
        self, context: str, nbytes: int, *, sheddable: bool = True, releasing: Iterable[Grant] = ()
    ) -> str | None:
        """The reason the request would be refused now (assuming ``releasing`` were gone), or None."""
        try:
            self._plan(context, nbytes, sheddable, releasing)
        except AdmissionRejected as exc:
            return str(exc)
        return None

    def admit(self, context: str, nbytes: int, *, now_s: float, sheddable: bool = True) -> AdmissionOutcome:
        """Grant ``nbytes`` to ``context`` now, shedding best-effort borrowers if the class allows it;
        raise AdmissionRejected with the reason otherwise."""
        shed = self._plan(context, nbytes, sheddable)
        outcome = AdmissionOutcome(shed=[self._take_back(g, "shed") for g in shed])
        outcome.grant = self._grant(context, nbytes, sheddable, now_s)
        return outcome

    def enqueue(
        self,
        context: str,
        nbytes: int,
        *,
        now_s: float,
        timeout_s: float | None = None,
        sheddable: bool = True,
    ) -> tuple[Ticket | None, AdmissionOutcome]:
        """Admit now if nothing of the same or a better class waits and it fits (ticket None, the grant in
        the outcome); else queue a ticket, which the returned outcome's ``served`` may already hold.
        Requests that can never fit (over the context's max) are rejected at once."""
        spec = self.spec(context)
        if nbytes > spec.max_bytes:
            self._plan(context, nbytes, sheddable)  # raises with the reason
        ahead = any(t.qos.rank <= spec.qos.rank or t.context == context for t in self._queue.values())
        if not ahead:
            try:
                return None, self.admit(context, nbytes, now_s=now_s, sheddable=sheddable)
            except AdmissionRejected:
                pass
        if len(self._queue) >= self.max_queue:
            self.stats["rejected"] += 1
            raise AdmissionRejected(
                f"admission queue is full ({self.max_queue} waiting); retry later",
                retry_after_s=self.retry_after_s,
            )
        deadline = None if timeout_s is None else now_s + timeout_s
        ticket = Ticket(next(self._ids), context, spec.qos, nbytes, sheddable, now_s, deadline)
        self._queue[ticket.ticket_id] = ticket
        return ticket, self.pump(now_s=now_s)

    def withdraw(self, ticket: Ticket) -> bool:
        """Drop a waiting ticket (its waiter was cancelled). True if it was still queued."""
        return self._queue.pop(ticket.ticket_id, None) is not None

    def release(self, grant: Grant, reason: ReleaseReason, *, now_s: float = 0.0) -> AdmissionOutcome:
        """Return a grant's bytes (idempotent) and serve waiting tickets that now fit."""
        if not grant.released:
            self._take_back(grant, reason)
        return self.pump(now_s=now_s)

    def set_external_bytes(self, nbytes: int, *, now_s: float = 0.0) -> AdmissionOutcome:
        """Record memory measured in use outside our grants. Best-effort borrowers are shed until the
        grants fit again; what cannot be shed stays visible as ``overcommit_bytes``."""
        self.external_bytes = max(0, nbytes)
        outcome = AdmissionOutcome()
        limit = self.capacity_bytes - self.external_bytes
        victims = sorted(
            (g for g in self._grants.values() if g.sheddable and g.qos is QoSPolicy.BEST_EFFORT),
            key=lambda g: g.grant_id,
            reverse=True,
        )
        for victim in victims:
            if self.used_bytes() <= limit:
                break
            outcome.shed.append(self._take_back(victim, "shed"))
        served = self.pump(now_s=now_s)
        outcome.served, outcome.rejected = served.served, served.rejected
        outcome.shed.extend(served.shed)
        return outcome

    @property
    def overcommit_bytes(self) -> int:
        return max(0, self.used_bytes() + self.external_bytes - self.capacity_bytes)

    def pump(self, *, now_s: float) -> AdmissionOutcome:
        """Expire tickets past their deadline, then serve the rest by class and arrival order. A ticket
        blocked by device capacity blocks those after it, and one blocked by its context's limit blocks
        its context's later tickets, so big requests are not starved by small ones."""
        outcome = AdmissionOutcome()
        blocked = False  # device capacity is short: later tickets wait their turn
        blocked_contexts: set[str] = set()  # a context's own limit is short: its later tickets wait
        for ticket in self.queued:
            if ticket.deadline_s is not None and now_s >= ticket.deadline_s:
                del self._queue[ticket.ticket_id]
                self.stats["expired"] += 1
                waited = now_s - ticket.enqueued_at_s
                error = AdmissionRejected(
                    f"context '{ticket.context}' waited {waited:.2f} s for {_fmt(ticket.nbytes)} "
                    "of device memory; retry later",
                    retry_after_s=self.retry_after_s,
                )
                outcome.rejected.append((ticket, error))
                if self.on_expired is not None:
                    self.on_expired(ticket, error)
                continue
            if blocked or ticket.context in blocked_contexts:
                continue
            try:
                shed = self._plan(ticket.context, ticket.nbytes, ticket.sheddable)
            except AdmissionRejected as exc:
                blocked = isinstance(exc.__cause__, _CapacityShort)
                blocked_contexts.add(ticket.context)
                continue
            del self._queue[ticket.ticket_id]
            outcome.shed.extend(self._take_back(g, "shed") for g in shed)
            grant = self._grant(ticket.context, ticket.nbytes, ticket.sheddable, now_s)
            outcome.served.append((ticket, grant))
            if self.on_served is not None:
                self.on_served(ticket, grant)
        return outcome

    # ---------------------------------------------------------------- internals
    def _grant(self, context: str, nbytes: int, sheddable: bool, now_s: float) -> Grant:
        spec = self._specs[context]
        grant = Grant(next(self._ids), context, spec.qos, nbytes, sheddable, now_s)
        self._grants[grant.grant_id] = grant
        self._used[context] += nbytes
        self.stats["admitted"] += 1
        return grant

    def _take_back(self, grant: Grant, reason: str) -> Grant:
        if grant.released:
            return grant
        grant.released = True
        grant.release_reason = reason
        del self._grants[grant.grant_id]
        self._used[grant.context] -= grant.nbytes
        self.stats[reason] += 1
        if reason == "shed" and self.on_shed is not None:
            self.on_shed(grant)
        return grant
