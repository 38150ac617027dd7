"""The ``x-xpuflow-*`` headers of a decision: made once for a decision that comes back (a sole worker's,
which the dispatcher makes once), and never taken from another decision."""

from __future__ import annotations

import dataclasses

from xpuflow.serving import inference
from xpuflow.serving.inference import decision_headers
from xpuflow.types import RoutingDecision


def decision(worker: str = "chat/0", **details: object) -> RoutingDecision:
    return RoutingDecision(
        "remote:chat",
        f"tier t: one tier; worker {worker} is the only worker that can take it",
        1.0,
        tier="t",
        worker=worker,
        details=details,
    )


def test_a_decision_that_comes_back_finds_its_headers_made() -> None:
    one = decision()
    first = decision_headers(one)
    assert decision_headers(one) is first
    assert dict(first) == {
        b"x-xpuflow-tier": b"t",
        b"x-xpuflow-worker": b"chat/0",
        b"x-xpuflow-device": b"remote:chat",
        b"x-xpuflow-route-reason": b"tier t: one tier; worker chat/0 is the only worker that can take it",
    }


def test_an_equal_or_changed_decision_gets_its_own() -> None:
    one = decision()
    cold = dataclasses.replace(one, details={**one.details, "cold_start": True})
    assert (b"x-xpuflow-cold-start", b"true") in decision_headers(cold)
    assert (b"x-xpuflow-cold-start", b"true") not in decision_headers(one)
    other = decision("chat/1")
    assert (b"x-xpuflow-worker", b"chat/1") in decision_headers(other)
    assert decision_headers(None) == ()


def test_the_cache_stays_small_under_decisions_made_per_request() -> None:
    for i in range(500):
        headers = decision_headers(decision(f"w{i}"))
        assert (b"x-xpuflow-worker", f"w{i}".encode()) in headers
    assert len(inference._DECISION_HEADERS) <= 64
