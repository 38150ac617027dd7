"""QoS under a best-effort flood: Guaranteed latency SLO and how much spare capacity best-effort gets.

A fake device of ``SLOTS`` GiB runs requests that each hold 1 GiB for ``SERVICE_S`` seconds on a
``FakeSession`` (so the device serves at most ``SLOTS / SERVICE_S`` requests per second). Guaranteed
traffic arrives (Poisson) at ``GUARANTEED_LOAD`` of that capacity with a latency SLO of ``SLO_S``;
best-effort traffic floods at 3x capacity, each request waiting at most ``BE_TIMEOUT_S`` for admission.
The same seeded arrivals run twice in one process:

- ``qos``: a ``QoSScheduler`` with a Guaranteed context reserving ``RESERVED_SLOTS`` GiB and a
  best-effort context that may borrow any free byte and is shed when Guaranteed needs it back;
- ``fifo``: one FIFO queue (a semaphore of ``SLOTS``) for everything.

    python benchmarks/qos.py [--seconds 8] [--quick]

Figures: ``guaranteed_slo_attainment`` (Guaranteed requests finished within the SLO / Guaranteed
requests offered, goal >= 0.99), ``fifo_guaranteed_slo_attainment`` (the same through the FIFO queue),
``besteffort_share_of_spare`` (device-seconds of best-effort work completed during the run / the
device-seconds Guaranteed work left unused, goal >= 0.8; work lost to shedding does not count).
Writes benchmarks/results/qos.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

from xpuflow.backends.base import GenerationParams
from xpuflow.clock import SystemClock
from xpuflow.errors import AdmissionRejected
from xpuflow.scheduling.qos.scheduler import GB, QoSPolicy, QoSScheduler
from xpuflow.testing import FakeSession

SLOTS = 8
SERVICE_S = 0.05
RESERVED_SLOTS = 4
GUARANTEED_LOAD = 0.2
BE_FLOOD = 3.0
SLO_S = 0.15
BE_TIMEOUT_S = 1.0
PARAMS = GenerationParams(max_tokens=4)


@dataclass
class Tally:
    g_offered: int = 0
    g_latencies: list[float] = field(default_factory=list)
    g_errors: int = 0
    be_offered: int = 0
    be_busy_in_window_s: float = 0.0
    g_busy_in_window_s: float = 0.0
    be_done: int = 0
    be_rejected: int = 0
    be_shed: int = 0


def arrivals(seconds: float, seed: int) -> list[tuple[float, str]]:
    capacity = SLOTS / SERVICE_S
    rng = random.Random(seed)
    out: list[tuple[float, str]] = []
    for cls, rate in (("g", GUARANTEED_LOAD * capacity), ("be", BE_FLOOD * capacity)):
        t = 0.0
        while True:
            t += rng.expovariate(rate)
            if t >= seconds:
                break
            out.append((t, cls))
    return sorted(out)


async def drive(schedule: list[tuple[float, str]], seconds: float, admit: Any) -> Tally:
    """Offer each request at its arrival time (open loop); ``admit(cls)`` is the admission guard."""
    session = FakeSession("fake", service_time_s=SERVICE_S)
    tally = Tally()
    t0 = time.perf_counter()

    async def one(cls: str) -> None:
        started = time.perf_counter()
        served_at = started
        try:
            async with admit(cls):
                served_at = time.perf_counter()
                await session.generate("x", PARAMS)
        except AdmissionRejected as exc:
            if cls == "g":
                tally.g_errors += 1
            elif "shed" in str(exc):
                tally.be_shed += 1
            else:
                tally.be_rejected += 1
            return
        finished = time.perf_counter()
        # device-seconds of this request inside the measured window
        busy = max(0.0, min(finished - t0, seconds) - (served_at - t0))
        if cls == "g":
            tally.g_latencies.append(finished - started)
            tally.g_busy_in_window_s += busy
        else:
            tally.be_done += 1
            tally.be_busy_in_window_s += busy

    tasks = []
    for at, cls in schedule:
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if cls == "g":
            tally.g_offered += 1
        else:
            tally.be_offered += 1
        tasks.append(asyncio.create_task(one(cls)))
    await asyncio.gather(*tasks)
    return tally


async def run_qos(schedule: list[tuple[float, str]], seconds: float) -> Tally:
    sched = QoSScheduler(
        0, capacity_bytes=SLOTS * GB, free_bytes=lambda: None, clock=SystemClock(), use_cuda=False
    )
    sched.controller.max_queue = 100_000
    sched.create_context("gold", RESERVED_SLOTS * GB, qos=QoSPolicy.GUARANTEED)
    sched.create_context("bronze", SLOTS * GB, qos=QoSPolicy.BEST_EFFORT)

    def admit(cls: str) -> Any:
        if cls == "g":
            return sched.admit("gold", GB, timeout_s=SLO_S)
        return sched.admit("bronze", GB, timeout_s=BE_TIMEOUT_S)

    return await drive(schedule, seconds, admit)


class FifoGuard:
    """Everything through one FIFO queue of ``SLOTS`` places, waiting at most ``timeout_s``."""

    def __init__(self, sem: asyncio.Semaphore, timeout_s: float) -> None:
        self.sem, self.timeout_s = sem, timeout_s

    async def __aenter__(self) -> None:
        try:
            await asyncio.wait_for(self.sem.acquire(), self.timeout_s)
        except TimeoutError:
            raise AdmissionRejected("fifo queue wait timed out") from None

    async def __aexit__(self, *exc: object) -> None:
        self.sem.release()


async def run_fifo(schedule: list[tuple[float, str]], seconds: float) -> Tally:
    sem = asyncio.Semaphore(SLOTS)
    return await drive(schedule, seconds, lambda cls: FifoGuard(sem, BE_TIMEOUT_S))


def figures(t: Tally, seconds: float) -> dict[str, Any]:
    within = sum(1 for x in t.g_latencies if x <= SLO_S)
    lat = sorted(t.g_latencies) or [float("nan")]
    spare = SLOTS * seconds - t.g_busy_in_window_s
    return {
        "guaranteed_offered": t.g_offered,
        "guaranteed_slo_attainment": within / max(1, t.g_offered),
        "guaranteed_p50_s": lat[len(lat) // 2],
        "guaranteed_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "guaranteed_errors": t.g_errors,
        "besteffort_offered": t.be_offered,
        "besteffort_completed": t.be_done,
        "besteffort_rejected": t.be_rejected,
        "besteffort_shed": t.be_shed,
        "besteffort_share_of_spare": t.be_busy_in_window_s / spare,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="2-second runs")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    schedule = arrivals(seconds, seed=7)
    qos = figures(asyncio.run(run_qos(schedule, seconds)), seconds)
    fifo = figures(asyncio.run(run_fifo(schedule, seconds)), seconds)
    result = {
        "guaranteed_slo_attainment": qos["guaranteed_slo_attainment"],
        "fifo_guaranteed_slo_attainment": fifo["guaranteed_slo_attainment"],
        "besteffort_share_of_spare": qos["besteffort_share_of_spare"],
        "fifo_besteffort_share_of_spare": fifo["besteffort_share_of_spare"],
        "qos": qos,
        "fifo": fifo,
        "setup": {
            "slots_gib": SLOTS,
            "service_s": SERVICE_S,
            "reserved_slots_gib": RESERVED_SLOTS,
            "guaranteed_load": GUARANTEED_LOAD,
            "besteffort_flood": BE_FLOOD,
            "slo_s": SLO_S,
            "besteffort_timeout_s": BE_TIMEOUT_S,
            "seconds": seconds,
        },
    }
    rows = [
        (
            name,
            f"{d['guaranteed_slo_attainment']:.3f}",
            f"{d['guaranteed_p99_s'] * 1000:.0f}",
            f"{d['besteffort_share_of_spare']:.3f}",
            str(d["besteffort_shed"]),
        )
        for name, d in (("qos", qos), ("fifo", fifo))
    ]
    print_table(
        "QoS under a 3x best-effort flood", rows, ("policy", "g_slo", "g_p99_ms", "be_share_spare", "be_shed")
    )
    print(write_results("qos", result))


if __name__ == "__main__":
    main()
