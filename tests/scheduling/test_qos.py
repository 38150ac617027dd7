"""QoS contexts: sessions release on every exit path, shedding, waiting, pressure, streams, mapping."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from xpuflow.clock import FakeClock
from xpuflow.errors import AdmissionRejected, ConfigError
from xpuflow.scheduling.qos import scheduler as qos
from xpuflow.scheduling.qos.scheduler import (
    GB,
    MB,
    HostStream,
    MemoryPressure,
    QoSPolicy,
    QoSScheduler,
)


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), timeout=10)

    asyncio.run(bounded())


class FakeMemory:
    """Free bytes a device reports; ``other_bytes`` is memory taken outside the scheduler."""

    def __init__(self, sched_capacity: int) -> None:
        self.capacity = sched_capacity
        self.other_bytes = 0
        self.scheduler: QoSScheduler | None = None

    def __call__(self) -> int:
        assert self.scheduler is not None
        return self.capacity - self.scheduler.controller.used_bytes() - self.other_bytes


def make(capacity: int = 8 * GB) -> tuple[QoSScheduler, FakeMemory]:
    memory = FakeMemory(capacity)
    sched = QoSScheduler(0, capacity_bytes=capacity, free_bytes=memory, clock=FakeClock(), use_cuda=False)
    memory.scheduler = sched
    sched.create_context("gold", 4 * GB, qos=QoSPolicy.GUARANTEED)
    sched.create_context("silver", 4 * GB, base_vram=1 * GB, qos="burstable")
    sched.create_context("bronze", 8 * GB, qos=QoSPolicy.BEST_EFFORT)
    return sched, memory


def test_sync_session_releases_on_success_and_on_exception() -> None:
    sched, _ = make()
    with sched.context_session("gold", 2 * GB) as session:
        assert sched.get_context_usage("gold") == (2 * GB, 4 * GB)
        assert session.grant is not None
    assert sched.get_context_usage("gold") == (0, 4 * GB)
    with pytest.raises(RuntimeError), sched.context_session("gold", 3 * GB):
        raise RuntimeError("model crashed")
    assert sched.get_context_usage("gold")[0] == 0
    counters = sched.snapshot()["contexts"]["gold"]
    assert counters["completed"] == 1
    assert counters["failed"] == 1


def test_default_session_size_is_the_base_or_the_max() -> None:
    sched, _ = make()
    with sched.context_session("silver"):
        assert sched.get_context_usage("silver")[0] == 1 * GB
    with sched.context_session("gold"):
        assert sched.get_context_usage("gold")[0] == 4 * GB


def test_sync_session_rejects_with_reason_when_full() -> None:
    sched, _ = make()
    with (
        sched.context_session("bronze", 8 * GB),
        pytest.raises(AdmissionRejected, match=r"'bronze' \(best_effort\) uses 8\.00 GiB of 8\.00 GiB"),
        sched.context_session("bronze", 1 * MB),
    ):
        pass
    assert sched.get_available_vram() == 8 * GB


def test_async_session_released_on_cancellation() -> None:
    sched, _ = make()

    async def scenario() -> None:
        started = asyncio.Event()

        async def work() -> None:
            async with sched.admit("silver", 2 * GB):
                started.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(work())
        await started.wait()
        assert sched.get_context_usage("silver")[0] == 2 * GB
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sched.get_context_usage("silver")[0] == 0
        assert sched.snapshot()["contexts"]["silver"]["cancelled"] == 1

    run(scenario)


def test_guaranteed_sheds_best_effort_and_the_holder_sees_why() -> None:
    sched, _ = make()

    async def scenario() -> None:
        holding = asyncio.Event()
        seen: list[BaseException] = []

        async def best_effort() -> None:
            try:
                async with sched.admit("bronze", 7 * GB):
                    holding.set()
                    await asyncio.sleep(60)
            except AdmissionRejected as exc:
                seen.append(exc)

        task = asyncio.create_task(best_effort())
        await holding.wait()
        async with sched.admit("gold", 4 * GB):
            assert sched.get_context_usage("gold")[0] == 4 * GB
            assert sched.get_context_usage("bronze")[0] == 0
        await task
        assert len(seen) == 1
        assert "shed to make room" in str(seen[0])
        assert sched.snapshot()["contexts"]["bronze"]["shed"] == 1

    run(scenario)


def test_waiters_are_served_in_arrival_order_and_small_ones_do_not_jump_the_queue() -> None:
    sched, _ = make()

    async def scenario() -> None:
        entered: list[str] = []
        full = asyncio.Event()
        release = asyncio.Event()

        async def hold() -> None:
            async with sched.admit("bronze", 7 * GB):
                full.set()
                await release.wait()

        async def want(nbytes: int, label: str) -> None:
            async with sched.admit("bronze", nbytes, timeout_s=5):
                entered.append(label)
                await asyncio.sleep(0)

        holder = asyncio.create_task(hold())
        await full.wait()
        waiters = []
        for nbytes, label in ((6 * GB, "first"), (1 * GB, "second"), (2 * GB, "third")):
            waiters.append(asyncio.create_task(want(nbytes, label)))
            await asyncio.sleep(0)
        # 1 GiB is free, but "second" waits behind "first"
        assert entered == []
        assert len(sched.controller.queued) == 3
        release.set()
        await holder
        await asyncio.gather(*waiters)
        assert entered == ["first", "second", "third"]
        assert sched.get_available_vram() == 8 * GB

    run(scenario)


def test_async_wait_times_out_with_a_reason() -> None:
    sched, _ = make()

    async def scenario() -> None:
        async with sched.admit("bronze", 8 * GB):
            with pytest.raises(AdmissionRejected, match="waited"):
                async with sched.admit("bronze", 1 * GB, timeout_s=0.01):
                    pass
        assert sched.controller.queued == []
        assert sched.get_available_vram() == 8 * GB

    run(scenario)


def test_memory_pressure_sheds_best_effort_and_tells_handlers() -> None:
    sched, memory = make()
    events: list[MemoryPressure] = []
    sched.on_memory_pressure(events.append)
    assert sched.check_memory_pressure() is None
    with sched.context_session("bronze", 6 * GB) as session:
        memory.other_bytes = 3 * GB  # another process took memory
        event = sched.check_memory_pressure()
        assert session.shed
    assert event is not None
    assert events == [event]
    assert event.shed_contexts == ("bronze",)
    assert event.external_bytes == 3 * GB
    assert event.deficit_bytes == 0
    assert sched.get_available_vram() == 5 * GB


def test_host_streams_without_cuda() -> None:
    sched, _ = make()
    stream = sched.get_stream("gold")
    assert isinstance(stream, HostStream)
    assert sched.get_stream("gold") is stream
    event = sched.record_event("gold")
    sched.wait_event("silver", event)
    assert event.query()


@pytest.mark.gpu
def test_cuda_streams_per_context() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    sched = QoSScheduler(0)
    sched.create_context("a", 64 * MB, qos=QoSPolicy.GUARANTEED)
    sched.create_context("b", 64 * MB, qos=QoSPolicy.BEST_EFFORT)
    a, b = sched.get_stream("a"), sched.get_stream("b")
    assert isinstance(a, torch.cuda.Stream)
    assert a is not b
    with torch.cuda.stream(a):
        x = torch.ones(1024, device="cuda") * 2
    event = sched.record_event("a")
    sched.wait_event("b", event)
    with torch.cuda.stream(b):
        y = x + 1
    torch.cuda.synchronize()
    assert float(y[0]) == 3.0


def test_resolve_maps_key_class_over_header() -> None:
    sched, _ = make()
    assert sched.resolve(None, None) is None
    assert sched.resolve(None, "best-effort").name == "bronze"  # type: ignore[union-attr]
    assert sched.resolve("gold", "best_effort").name == "gold"  # type: ignore[union-attr]
    assert sched.resolve("burstable").name == "silver"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="unknown QoS class 'platinum'"):
        sched.resolve(None, "platinum")


def test_context_budgets_are_validated() -> None:
    sched, _ = make()
    with pytest.raises(ConfigError, match=r"only 3\.00 GiB"):
        sched.create_context("big", 4 * GB, qos=QoSPolicy.GUARANTEED)
    with pytest.raises(ConfigError, match="cannot reserve"):
        sched.create_context("be", 4 * GB, base_vram=GB, qos=QoSPolicy.BEST_EFFORT)


def test_module_level_api() -> None:
    memory = FakeMemory(4 * GB)
    sched = qos.initialize(3, capacity_bytes=4 * GB, free_bytes=memory, clock=FakeClock(), use_cuda=False)
    memory.scheduler = sched
    ctx = qos.create_context("main", max_vram=2 * GB, qos=QoSPolicy.BURSTABLE, base_vram=512 * MB)
    seen: list[MemoryPressure] = []
    qos.on_memory_pressure(seen.append)
    with qos.context_session(ctx):
        assert qos.get_context_usage(ctx) == (512 * MB, 2 * GB)
        assert qos.get_available_vram() == 4 * GB - 512 * MB
    assert isinstance(qos.get_stream(ctx), HostStream)
    qos.wait_event(ctx, qos.record_event(ctx))
    assert ctx.device_id == 3
    assert seen == []
