"""Partitions: memory limits via contexts, compute shares via weighted fair tokens, measured."""

from __future__ import annotations

import asyncio

import pytest

from xpuflow.backends.base import GenerationParams
from xpuflow.clock import FakeClock
from xpuflow.errors import AdmissionRejected, ConfigError
from xpuflow.scheduling.qos.admission import GB, QoSPolicy
from xpuflow.scheduling.qos.partitions import ComputeTokens, DevicePartitions
from xpuflow.scheduling.qos.scheduler import QoSScheduler
from xpuflow.testing import FakeSession


def scheduler() -> QoSScheduler:
    return QoSScheduler(0, capacity_bytes=16 * GB, free_bytes=lambda: None, clock=FakeClock(), use_cuda=False)


async def saturate(parts: DevicePartitions, name: str, session: FakeSession, stop: asyncio.Event) -> int:
    done = 0
    while not stop.is_set():
        async with parts.run(name, GB):
            await session.generate("x", GenerationParams(max_tokens=4))
            done += 1
    return done


def test_compute_shares_are_enforced_and_measured_on_a_saturated_device() -> None:
    async def scenario() -> tuple[dict[str, float], dict[str, int]]:
        parts = DevicePartitions(scheduler(), num_tokens=2)
        parts.add("chat", memory_bytes=8 * GB, compute_share=0.75, qos=QoSPolicy.GUARANTEED)
        parts.add("batch", memory_bytes=8 * GB, compute_share=0.25, qos=QoSPolicy.BEST_EFFORT)
        session = FakeSession("fake", service_time_s=0.002)
        stop = asyncio.Event()
        # each partition offers far more work than its share: 4 clients each
        tasks = {
            name: [asyncio.create_task(saturate(parts, name, session, stop)) for _ in range(4)]
            for name in ("chat", "batch")
        }
        await asyncio.sleep(0.6)
        stop.set()
        done = {name: sum(await asyncio.gather(*ts)) for name, ts in tasks.items()}
        return parts.measured_shares(), done

    shares, done = asyncio.run(scenario())
    assert shares["chat"] == pytest.approx(0.75, abs=0.05)
    assert done["chat"] / (done["chat"] + done["batch"]) == pytest.approx(0.75, abs=0.05)


def test_idle_partition_share_goes_to_the_busy_one() -> None:
    async def scenario() -> dict[str, int]:
        tokens = ComputeTokens(1, {"a": 0.5, "b": 0.5})
        for _ in range(20):
            async with tokens.hold("a"):
                await asyncio.sleep(0)
        # b comes back after a long idle spell and gets no banked credit: a is not starved
        order: list[str] = []

        async def client(name: str) -> None:
            for _ in range(10):
                async with tokens.hold(name):
                    order.append(name)
                    await asyncio.sleep(0)

        await asyncio.gather(client("a"), client("b"))
        assert order[:4].count("a") >= 1
        return dict(tokens.granted)

    granted = asyncio.run(scenario())
    assert granted == {"a": 30, "b": 10}


def test_cancelled_waiter_does_not_leak_a_token() -> None:
    async def scenario() -> None:
        tokens = ComputeTokens(1, {"a": 1.0})
        await tokens.acquire("a")
        waiter = asyncio.create_task(tokens.acquire("a"))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        tokens.release("a")
        assert tokens.in_use == 0
        await asyncio.wait_for(tokens.acquire("a"), 1)

    asyncio.run(scenario())


def test_partition_memory_limit_and_share_validation() -> None:
    async def scenario() -> None:
        parts = DevicePartitions(scheduler(), num_tokens=1)
        parts.add("a", memory_bytes=4 * GB, compute_share=0.6)
        with pytest.raises(ConfigError, match=r"add up to 1\.10"):
            parts.add("b", memory_bytes=4 * GB, compute_share=0.5)
        with pytest.raises(AdmissionRejected, match=r"max is 4\.00 GiB"):
            async with parts.run("a", 5 * GB):
                pass
        assert parts.tokens.in_use == 0

    asyncio.run(scenario())
