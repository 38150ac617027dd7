"""Worker choice: xpuflow's scorer against round-robin, random, least-loaded and power-of-two choices.

A tier of fake workers of mixed speed (real ``Worker``s, queue and micro-batcher included, over
``FakeSession``s: fast ones and slow ones) takes an open-loop Poisson stream of requests at a fixed
rate; each policy gets fresh workers and the same arrival times. Reported per policy: p50/p99/mean
latency (arrival to answer, ms), the share of requests sent to slow workers, and completions. The
first ``--warmup`` requests are not counted (every policy starts with cold EMAs).

    python benchmarks/worker_choice.py [--rate 160] [--requests 2500] [--seeds 2]

Writes benchmarks/results/worker_choice.json. Baselines read only queue lengths, as their systems do
(least-loaded: join the shortest queue; power-of-two: Ray Serve's default, two random workers, the
shorter queue wins); xpuflow goes through the ``Dispatcher`` (scorer, health, retries).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

from xpuflow.backends.base import GenerationParams
from xpuflow.policy.worker_scorer import WorkerScorer
from xpuflow.routing.dispatch import Dispatcher, RetryPolicy
from xpuflow.scheduling.request import WorkRequest
from xpuflow.scheduling.worker import Worker
from xpuflow.testing import FakeSession

PARAMS = GenerationParams(max_tokens=16)


@dataclass(frozen=True)
class Kind:
    name: str
    count: int
    service_time_s: float  # fixed cost of one batch
    per_item_s: float  # extra cost per request in the batch


FAST = Kind("fast", 2, 0.025, 0.00375)
SLOW = Kind("slow", 2, 0.100, 0.0150)
MAX_BATCH_SIZE = 8

Picker = Callable[[Sequence[Worker]], Worker]


def _load(worker: Worker) -> int:
    snapshot = worker.snapshot()
    return snapshot.queue_depth + snapshot.in_flight


def round_robin(_: random.Random) -> Picker:
    counter = itertools.count()

    def pick(workers: Sequence[Worker]) -> Worker:
        return workers[next(counter) % len(workers)]

    return pick


def uniform_random(rng: random.Random) -> Picker:
    return lambda workers: rng.choice(list(workers))


def least_loaded(rng: random.Random) -> Picker:
    def pick(workers: Sequence[Worker]) -> Worker:
        loads = [_load(w) for w in workers]
        best = min(loads)
        return rng.choice([w for w, load in zip(workers, loads, strict=True) if load == best])

    return pick


def power_of_two(rng: random.Random) -> Picker:
    def pick(workers: Sequence[Worker]) -> Worker:
        a, b = rng.sample(list(workers), 2)
        load_a, load_b = _load(a), _load(b)
        if load_a == load_b:
            return rng.choice([a, b])
        return a if load_a < load_b else b

    return pick


BASELINES: dict[str, Callable[[random.Random], Picker]] = {
    "round_robin": round_robin,
    "random": uniform_random,
    "least_loaded": least_loaded,
    "power_of_two": power_of_two,
}
POLICIES = ("xpuflow", *BASELINES)


def make_workers() -> list[Worker]:
    workers = []
    for kind in (FAST, SLOW):
        for i in range(kind.count):
            session = FakeSession(
                f"{kind.name}-{i}",
                service_time_s=kind.service_time_s,
                per_item_s=kind.per_item_s,
                max_batch_size=MAX_BATCH_SIZE,
            )
            workers.append(
                Worker(
                    session,
                    worker_id=f"{kind.name}-{i}",
                    deployment="chat",
                    device=f"fake:{kind.name}-{i}",
                    queue_capacity=100_000,
                    stop_timeout_s=5.0,
                )
            )
    return workers


def capacity_per_s() -> float:
    """Requests per second the tier serves at full batches: the ceiling of any policy."""
    return sum(
        kind.count * MAX_BATCH_SIZE / (kind.service_time_s + kind.per_item_s * MAX_BATCH_SIZE)
        for kind in (FAST, SLOW)
    )


def arrivals(rate_per_s: float, count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate_per_s)
        times.append(t)
    return times


async def run_policy(policy: str, times: Sequence[float], seed: int) -> dict[str, Any]:
    workers = make_workers()
    rng = random.Random(seed)
    dispatcher = Dispatcher(scorer=WorkerScorer(), policy=RetryPolicy(attempt_timeout_s=30.0), rng=rng)
    picker = BASELINES[policy](rng) if policy != "xpuflow" else None
    tiers = [("tier", workers)]
    latencies: list[float | None] = [None] * len(times)
    served_by: list[str] = [""] * len(times)
    failures = 0

    async def one(index: int, arrival_s: float, origin: float) -> None:
        nonlocal failures
        request = WorkRequest.completion(f"request number {index} asks something", PARAMS)
        try:
            if picker is None:
                done = await dispatcher.dispatch(tiers, request)
                served_by[index] = done.decision.worker or ""
            else:
                worker = picker(workers)
                await worker.submit(request)
                served_by[index] = worker.worker_id
        except Exception:
            failures += 1
            return
        latencies[index] = time.perf_counter() - origin - arrival_s

    for worker in workers:
        await worker.start()
    try:
        tasks = []
        origin = time.perf_counter()
        for index, arrival_s in enumerate(times):
            delay = origin + arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, arrival_s, origin)))
        await asyncio.gather(*tasks)
    finally:
        for worker in workers:
            await worker.stop()
    batch_means = [w.metrics.mean_batch_size() for w in workers]
    return {
        "latencies_s": latencies,
        "served_by": served_by,
        "failures": failures,
        "mean_batch_size": statistics.fmean(b for b in batch_means if b is not None),
    }


def percentile(ordered: Sequence[float], q: float) -> float:
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=160.0, help="arrivals per second (default 160)")
    parser.add_argument("--requests", type=int, default=2500, help="requests per policy and seed")
    parser.add_argument("--warmup", type=int, default=250, help="first requests left out of the figures")
    parser.add_argument("--seeds", type=int, default=2, help="arrival sequences per policy")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset")
    args = parser.parse_args()
    policies = [p for p in args.policies.split(",") if p]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        parser.error(f"unknown policies {unknown}; valid: {', '.join(POLICIES)}")

    # Seeds outside, policies inside: a slow spell of the machine hits every policy alike.
    counted: dict[str, list[float]] = {p: [] for p in policies}
    slow_share: dict[str, list[float]] = {p: [] for p in policies}
    batch_sizes: dict[str, list[float]] = {p: [] for p in policies}
    failures = dict.fromkeys(policies, 0)
    for seed in range(args.seeds):
        times = arrivals(args.rate, args.requests, seed)
        for policy in policies:
            out = asyncio.run(run_policy(policy, times, seed))
            kept = out["latencies_s"][args.warmup :]
            counted[policy] += [x * 1000.0 for x in kept if x is not None]
            served = out["served_by"][args.warmup :]
            slow_share[policy].append(sum(1 for s in served if s.startswith(SLOW.name)) / max(1, len(served)))
            failures[policy] += out["failures"]
            batch_sizes[policy].append(out["mean_batch_size"])
    results: dict[str, dict[str, Any]] = {}
    for policy in policies:
        ordered = sorted(counted[policy])
        results[policy] = {
            "p50_ms": percentile(ordered, 0.50),
            "p90_ms": percentile(ordered, 0.90),
            "p99_ms": percentile(ordered, 0.99),
            "mean_ms": statistics.fmean(ordered),
            "slow_share": statistics.fmean(slow_share[policy]),
            "mean_batch_size": statistics.fmean(batch_sizes[policy]),
            "completed": len(ordered),
            "failures": failures[policy],
        }

    rows = [
        (
            name,
            f"{r['p50_ms']:.1f}",
            f"{r['p90_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['mean_ms']:.1f}",
            f"{r['slow_share']:.0%}",
            f"{r['mean_batch_size']:.2f}",
            str(r["failures"]),
        )
        for name, r in results.items()
    ]
    capacity = capacity_per_s()
    slow_capacity_share = (
        SLOW.count * MAX_BATCH_SIZE / (SLOW.service_time_s + SLOW.per_item_s * MAX_BATCH_SIZE) / capacity
    )
    print_table(
        f"Worker choice: {FAST.count} fast + {SLOW.count} slow workers, {args.rate:g} req/s Poisson "
        f"({args.rate / capacity:.0%} of the {capacity:.0f} req/s full-batch capacity; slow workers hold "
        f"{slow_capacity_share:.0%} of it), {args.seeds} x {args.requests} requests",
        rows,
        ("policy", "p50 ms", "p90 ms", "p99 ms", "mean ms", "to slow", "batch", "failed"),
    )
    summary: dict[str, Any] = {}
    if "xpuflow" in results:
        baselines = {k: v for k, v in results.items() if k != "xpuflow"}
        if baselines:
            best_p99 = min(baselines, key=lambda k: baselines[k]["p99_ms"])
            best_p50 = min(baselines, key=lambda k: baselines[k]["p50_ms"])
            summary = {
                "best_baseline_p99": best_p99,
                "xpuflow_p99_vs_best_baseline": results["xpuflow"]["p99_ms"] / baselines[best_p99]["p99_ms"],
                "best_baseline_p50": best_p50,
                "xpuflow_p50_vs_best_baseline": results["xpuflow"]["p50_ms"] / baselines[best_p50]["p50_ms"],
            }
            p99_ratio = summary["xpuflow_p99_vs_best_baseline"]
            p50_ratio = summary["xpuflow_p50_vs_best_baseline"]
            print(
                f"\nxpuflow p99 / best baseline p99 ({best_p99}): {p99_ratio:.2f}; "
                f"p50 / best baseline p50 ({best_p50}): {p50_ratio:.2f}"
            )
    path = write_results(
        "worker_choice",
        {
            "config": {
                "rate_per_s": args.rate,
                "requests": args.requests,
                "warmup": args.warmup,
                "seeds": args.seeds,
                "capacity_per_s": capacity,
                "max_batch_size": MAX_BATCH_SIZE,
                "workers": [
                    {
                        "kind": k.name,
                        "count": k.count,
                        "service_time_s": k.service_time_s,
                        "per_item_s": k.per_item_s,
                    }
                    for k in (FAST, SLOW)
                ],
            },
            "policies": results,
            **summary,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
