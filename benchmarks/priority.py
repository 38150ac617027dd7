"""Priority queues under overload: high-priority latency and that low priority is never starved or lost.

One worker over a fake device whose batch of ``b`` takes ``base + per_item * b`` seconds (the shape of
LLM decoding: a batch costs little more than one request). Its capacity is measured first; then
Poisson arrivals at twice that capacity (20% high, 40% normal, 40% low priority, the same seeded
sequence for every run) for ``--seconds``, after which the queue drains. The same load runs on a
priority queue with aging and on a FIFO queue; the high-priority arrivals alone give the unloaded
baseline.

    python benchmarks/priority.py [--seconds 20] [--quick]

Figures, per queue policy: ``high_p99_ratio`` (high p99 under overload / high p99 unloaded; goal <= 2),
``low_completed_share`` (low requests answered with a result / low requests admitted; goal 1.0),
per-class latency percentiles, admissions and rejections (``QueueFull``, the 429 a gateway returns),
and ``lost`` (requests that got neither a result nor an error; must be 0). Writes
benchmarks/results/priority.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

from xpuflow.backends.base import GenerationParams
from xpuflow.errors import QueueFull
from xpuflow.scheduling.queue import QueuePolicy
from xpuflow.scheduling.request import Priority, WorkRequest
from xpuflow.scheduling.worker import Worker
from xpuflow.testing import FakeSession

BASE_S = 0.04
PER_ITEM_S = 0.004
MAX_BATCH = 8
QUEUE_CAPACITY = 64
AGING_S = 1.0
MIX = ((Priority.HIGH, 0.2), (Priority.NORMAL, 0.4), (Priority.LOW, 0.4))


@dataclass
class Outcome:
    priority: Priority
    status: str  # "ok" | "rejected" | "error"
    latency_s: float


def _session() -> FakeSession:
    return FakeSession("fake-llm", service_time_s=BASE_S, per_item_s=PER_ITEM_S, max_batch_size=MAX_BATCH)


def _worker(policy: QueuePolicy) -> Worker:
    return Worker(
        _session(),
        worker_id=f"bench-{policy.value}",
        max_batch_size=MAX_BATCH,
        queue_policy=policy,
        queue_capacity=QUEUE_CAPACITY,
        aging_s=AGING_S,
    )


def _request(priority: Priority, i: int) -> WorkRequest:
    return WorkRequest.completion(f"request {i}", GenerationParams(max_tokens=16), priority=priority)


async def measure_capacity(n: int = 400, clients: int = 32) -> float:
    """Requests per second the worker serves when it always has a full batch waiting."""
    worker = _worker(QueuePolicy.FIFO)
    counter = iter(range(n))

    async def client() -> None:
        for i in counter:
            await worker.submit(_request(Priority.NORMAL, i))

    async with worker:
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return n / (time.perf_counter() - started)


def arrivals(rate_per_s: float, seconds: float, seed: int) -> list[tuple[float, Priority]]:
    rng = random.Random(seed)
    out, t = [], 0.0
    classes, weights = zip(*MIX, strict=True)
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= seconds:
            return out
        out.append((t, rng.choices(classes, weights)[0]))


async def offer(worker: Worker, schedule: list[tuple[float, Priority]]) -> list[Outcome]:
    """Send each request at its arrival time, without waiting for earlier answers (open loop)."""
    outcomes: list[Outcome] = []

    async def one(i: int, priority: Priority) -> None:
        started = time.perf_counter()
        try:
            await worker.submit(_request(priority, i))
            status = "ok"
        except QueueFull:
            status = "rejected"
        except Exception:
            status = "error"
        outcomes.append(Outcome(priority, status, time.perf_counter() - started))

    tasks = []
    async with worker:
        t0 = time.perf_counter()
        for i, (at, priority) in enumerate(schedule):
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, priority)))
        await asyncio.gather(*tasks)  # the queue drains before the worker stops
    return outcomes


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(outcomes: list[Outcome], offered: int) -> dict[str, Any]:
    per: dict[str, Any] = {}
    by_class: dict[Priority, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_class[o.priority].append(o)
    for priority in Priority:
        items = by_class[priority]
        ok = [o.latency_s for o in items if o.status == "ok"]
        rejected = sum(o.status == "rejected" for o in items)
        errors = sum(o.status == "error" for o in items)
        admitted = len(items) - rejected
        per[priority.name.lower()] = {
            "offered": len(items),
            "admitted": admitted,
            "rejected": rejected,
            "errors": errors,
            "completed": len(ok),
            "completed_share_of_admitted": len(ok) / admitted if admitted else None,
            "p50_ms": None if (v := pct(ok, 0.5)) is None else v * 1000,
            "p99_ms": None if (v := pct(ok, 0.99)) is None else v * 1000,
            "max_ms": max(ok) * 1000 if ok else None,
        }
    per["lost"] = offered - len(outcomes)
    return per


async def run(seconds: float, seed: int) -> dict[str, Any]:
    capacity = await measure_capacity()
    rate = 2.0 * capacity
    schedule = arrivals(rate, seconds, seed)
    highs = [(t, p) for t, p in schedule if p is Priority.HIGH]
    unloaded = summarize(await offer(_worker(QueuePolicy.PRIORITY), highs), len(highs))
    unloaded_p99 = unloaded["high"]["p99_ms"]
    results: dict[str, Any] = {}
    for policy in (QueuePolicy.PRIORITY, QueuePolicy.FIFO):
        outcomes = await offer(_worker(policy), schedule)
        summary = summarize(outcomes, len(schedule))
        high_p99 = summary["high"]["p99_ms"]
        low = summary["low"]
        results[policy.value] = {
            "high_p99_ratio": high_p99 / unloaded_p99 if high_p99 and unloaded_p99 else None,
            "low_completed_share": low["completed_share_of_admitted"],
            "classes": summary,
        }
    return {
        "capacity_req_s": capacity,
        "offered_req_s": rate,
        "offered_requests": len(schedule),
        "seconds": seconds,
        "unloaded_high": unloaded["high"],
        "policies": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the overload lasts")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a 5 s overload")
    args = parser.parse_args()
    seconds = 5.0 if args.quick else args.seconds
    data = asyncio.run(run(seconds, args.seed))
    rows = []
    for name, res in data["policies"].items():
        classes = res["classes"]
        rows.append(
            (
                name,
                f"{res['high_p99_ratio']:.2f}",
                f"{res['low_completed_share']:.3f}",
                f"{classes['high']['p99_ms']:.0f}",
                f"{classes['normal']['p99_ms']:.0f}",
                f"{classes['low']['p99_ms']:.0f}",
                str(sum(classes[c]["rejected"] for c in ("high", "normal", "low"))),
                str(classes["lost"]),
            )
        )
    print_table(
        f"priority under 2x overload ({data['offered_req_s']:.0f} req/s offered, capacity "
        f"{data['capacity_req_s']:.0f} req/s; unloaded high p99 {data['unloaded_high']['p99_ms']:.0f} ms)",
        rows,
        (
            "queue",
            "high p99 ratio",
            "low done/admitted",
            "high p99 ms",
            "normal p99",
            "low p99",
            "rejected",
            "lost",
        ),
    )
    path = write_results(
        "priority",
        {
            "device": {"base_s": BASE_S, "per_item_s": PER_ITEM_S, "max_batch_size": MAX_BATCH},
            "queue": {
                "capacity": QUEUE_CAPACITY,
                "aging_s": AGING_S,
                "high_reserve_fraction": 0.2,
                # A low request competes as high after this; its max latency below stays near it.
                "low_aging_bound_s": 2 * AGING_S,
            },
            "mix": {p.name.lower(): share for p, share in MIX},
            "goals": {"high_p99_ratio": "<= 2", "low_completed_share": "1.0"},
            "high_p99_ratio": data["policies"]["priority"]["high_p99_ratio"],
            "low_completed_share": data["policies"]["priority"]["low_completed_share"],
            "fifo_high_p99_ratio": data["policies"]["fifo"]["high_p99_ratio"],
            "fifo_low_completed_share": data["policies"]["fifo"]["low_completed_share"],
            **data,
        },
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
