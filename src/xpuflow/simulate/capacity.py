"""How much a fleet serves, and the smallest fleet that meets an SLO for a trace.

    capacity_per_s(fleet, requests)                  # requests/s the fleet sustains at 100% busy
    plan = find_min_fleet(fleet, requests, parse_slo("ttft_p99=2s,e2e_p99=30s"))
    plan.counts                                      # {"big": 3, "small": 5}

Capacity is what each device serves when busy, at the batch size it achieves: a continuous device
(``continuous: true``) runs up to its in-flight cap at once, so it is counted at that concurrency; a
static-batching worker batches only requests of the same batch group, and a group includes
``max_tokens``, so requests of a trace (whose output lengths differ) rarely share a batch and it is
counted at batch 1.

The search: a lower bound from capacity (the offered rate over one worker of the fastest type), then
one worker at a time of the type whose addition helps most (the SLO's p99s, weighted by how far each is
over its target), until the SLO is met; then workers are taken away while it stays met. Each step is a
full simulation with the given policy and seed, so the answer is the smallest fleet this search finds,
not a proof of optimality.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xpuflow.simulate.engine import SimResult, Simulation
from xpuflow.simulate.fleet import Fleet, SimDeployment
from xpuflow.simulate.policies import PolicyName
from xpuflow.simulate.report import Slo, meets_slo, percentile
from xpuflow.simulate.trace import SimRequest

__all__ = ["FleetPlan", "capacity_per_s", "find_min_fleet", "mean_request_s"]


def mean_request_s(fleet: Fleet, requests: Sequence[SimRequest]) -> dict[str, float]:
    """Mean seconds one request of the trace takes alone on each deployment's device."""
    out: dict[str, float] = {}
    for name, dep in fleet.deployments.items():
        total = sum(dep.model.request_s(r.input_tokens, r.output_tokens) for r in requests)
        out[name] = total / max(1, len(requests))
    return out


def worker_rate_per_s(dep: SimDeployment, work: Sequence[tuple[int, int]]) -> float:
    """Requests per second one worker of ``dep`` serves when busy, for requests like ``work``."""
    model = dep.model
    if model.continuous:
        return model.throughput_per_s(
            work, dep.max_in_flight or min(dep.max_batch_size, model.max_batch_size)
        )
    return model.throughput_per_s(work, 1)


def capacity_per_s(fleet: Fleet, requests: Sequence[SimRequest]) -> float:
    """Requests per second the fleet serves with every worker busy (see the module docstring)."""
    work = [(r.input_tokens, r.output_tokens) for r in requests]
    return sum(dep.replicas * worker_rate_per_s(dep, work) for dep in fleet.deployments.values())


@dataclass
class FleetPlan:
    """The search's answer: replica counts, whether they meet the SLO, and every fleet tried."""

    counts: dict[str, int]
    met: bool
    summary: dict[str, float | None]
    tried: list[tuple[dict[str, int], bool, dict[str, float | None]]] = field(default_factory=list)


def _badness(result: SimResult, slo: Slo) -> float:
    """0 when the SLO is met; else how far over (sum of p/target ratios over 1, failures weigh 10)."""
    failed = sum(1 for o in result.outcomes if o != "ok") / max(1, len(result.outcomes))
    score = 10.0 * failed
    for target, pct, values in (
        (slo.ttft_s, slo.ttft_pct, result.ttft_s),
        (slo.e2e_s, slo.e2e_pct, result.e2e_s),
    ):
        if target is None:
            continue
        served = [v for v in values if not math.isnan(v)]
        p = percentile(served, pct) if served else math.inf
        score += max(0.0, (p if p is not None else math.inf) / target - 1.0)
    return score


def find_min_fleet(
    fleet: Fleet,
    requests: Sequence[SimRequest],
    slo: Slo,
    *,
    policy: PolicyName | str = PolicyName.XPUFLOW,
    scale: float = 1.0,
    seed: int = 0,
    max_workers: int = 256,
    progress: Callable[[dict[str, int], bool], None] | None = None,
) -> FleetPlan:
    """The smallest replica counts per deployment found to meet ``slo`` (see the module docstring)."""
    names = list(fleet.deployments)
    means = mean_request_s(fleet, requests)
    span = max(requests[-1].arrival_s / scale - requests[0].arrival_s / scale, 1e-9) if requests else 1.0
    work = [(r.input_tokens, r.output_tokens) for r in requests]
    rates = {name: worker_rate_per_s(fleet.deployments[name], work) for name in names}
    fastest = max(names, key=lambda n: rates[n])
    counts = dict.fromkeys(names, 0)
    offered = len(requests) / span
    counts[fastest] = max(1, math.ceil(offered / rates[fastest])) if rates[fastest] > 0 else 1
    tried: list[tuple[dict[str, int], bool, dict[str, float | None]]] = []
    cache: dict[tuple[int, ...], tuple[bool, float, dict[str, float | None]]] = {}

    def run(c: dict[str, int]) -> tuple[bool, float, dict[str, float | None]]:
        key = tuple(c[n] for n in names)
        if key not in cache:
            result = Simulation(fleet.with_replicas(c), requests, policy=policy, seed=seed, scale=scale).run()
            ok = meets_slo(result, slo)
            summary = {
                "ttft_p99_s": percentile([v for v in result.ttft_s if not math.isnan(v)], 99),
                "e2e_p99_s": percentile([v for v in result.e2e_s if not math.isnan(v)], 99),
            }
            cache[key] = (ok, _badness(result, slo), summary)
            tried.append((dict(c), ok, summary))
            if progress is not None:
                progress(dict(c), ok)
        return cache[key]

    met, _, summary = run(counts)
    while not met and sum(counts.values()) < max_workers:
        best: tuple[float, str] | None = None
        for name in names:
            trial = {**counts, name: counts[name] + 1}
            _, trial_bad, _ = run(trial)
            # per worker added, prefer what helps most; ties go to the faster device
            if best is None or trial_bad < best[0]:
                best = (trial_bad, name)
        assert best is not None
        counts[best[1]] += 1
        met, _, summary = run(counts)
    if met:
        shrunk = True
        while shrunk:
            shrunk = False
            for name in sorted(names, key=lambda n: -means[n]):  # drop slow devices first
                if counts[name] == 0 or sum(counts.values()) == 1:
                    continue
                trial = {**counts, name: counts[name] - 1}
                trial_met, _, trial_summary = run(trial)
                if trial_met:
                    counts, summary, shrunk = trial, trial_summary, True
                    break
    return FleetPlan(dict(counts), met, summary, tried)
