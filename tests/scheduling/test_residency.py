"""Model residency: load on demand, LRU eviction by bytes, pinned and Guaranteed models stay, memory is
re-measured after unloads, and a model that cannot fit fails naming the sizes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from xpuflow.errors import ConfigError
from xpuflow.scheduling.qos.admission import GB, MB, AdmissionController, ContextSpec, QoSPolicy
from xpuflow.scheduling.qos.residency import ModelDoesNotFit, ModelResidency


class FakeDevice:
    """Loads and unloads by name; the allocator keeps ``keep_on_unload_bytes`` of each unload cached."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.sizes: dict[str, int] = {}
        self.loaded: dict[str, int] = {}
        self.cached = 0
        self.keep_on_unload_bytes = 0
        self.unloads: list[str] = []

    async def load(self, name: str) -> str:
        self.loaded[name] = self.sizes[name]
        return f"session:{name}"

    async def unload(self, name: str, handle: object) -> None:
        assert handle == f"session:{name}"
        self.loaded.pop(name)
        self.unloads.append(name)
        self.cached += self.keep_on_unload_bytes

    def free_bytes(self) -> int:
        return self.capacity - sum(self.loaded.values()) - self.cached


def setup(capacity: int = 10 * GB) -> tuple[AdmissionController, ModelResidency, FakeDevice]:
    ctrl = AdmissionController(capacity)
    ctrl.add_context(ContextSpec("gold", QoSPolicy.GUARANTEED, max_bytes=3 * GB))
    ctrl.add_context(ContextSpec("shared", QoSPolicy.BURSTABLE, max_bytes=7 * GB, base_bytes=0))
    device = FakeDevice(capacity)
    residency = ModelResidency(ctrl, load=device.load, unload=device.unload, free_bytes=device.free_bytes)
    return ctrl, residency, device


def ensure(
    residency: ModelResidency, device: FakeDevice, name: str, size: int, ctx: str = "shared"
) -> object:
    device.sizes[name] = size
    return asyncio.run(residency.ensure(name, size, context=ctx))


def run(work: Callable[[], Awaitable[object]]) -> object:
    return asyncio.run(work())  # type: ignore[arg-type]


def test_loads_on_demand_and_reuses_the_loaded_model() -> None:
    ctrl, residency, device = setup()
    assert ensure(residency, device, "a", 2 * GB) == "session:a"
    assert ensure(residency, device, "a", 2 * GB) == "session:a"
    assert residency.loads == 1
    assert ctrl.used_bytes("shared") == 2 * GB


def test_evicts_least_recently_used_first_and_only_what_is_needed() -> None:
    _, residency, device = setup()
    for name in ("a", "b", "c"):
        ensure(residency, device, name, 2 * GB)
    ensure(residency, device, "a", 2 * GB)  # touch: b is now the least recently used
    ensure(residency, device, "d", 3 * GB)  # 7 GiB budget with 6 used: one 2 GiB model must go
    assert device.unloads == ["b"]
    assert residency.resident == ["c", "a", "d"]
    ensure(residency, device, "e", 4 * GB)  # 4 GiB needs c and a out (LRU), not d
    assert device.unloads == ["b", "c", "a"]
    assert residency.resident == ["d", "e"]


def test_pinned_in_use_and_guaranteed_models_are_never_evicted() -> None:
    _ctrl, residency, device = setup()
    device.sizes["g"] = 3 * GB
    run(lambda: residency.ensure("g", 3 * GB, context="gold"))
    device.sizes["pinned"] = 2 * GB
    run(lambda: residency.ensure("pinned", 2 * GB, context="shared", pinned=True))
    ensure(residency, device, "busy", 2 * GB)
    ensure(residency, device, "idle", 2 * GB)
    device.sizes["new"] = 3 * GB
    residency.register("new", 3 * GB, context="shared")

    async def while_busy() -> None:
        async with residency.hold("busy") as held:
            assert not held.cold
            async with residency.hold("new") as loaded:
                assert loaded.cold
            with pytest.raises(ConfigError, match="in use"):
                await residency.evict("busy")

    run(while_busy)
    assert device.unloads == ["idle"]
    assert {"g", "pinned", "busy", "new"} == set(residency.resident)
    with pytest.raises(ConfigError, match="pinned"):
        run(lambda: residency.evict("pinned"))


def test_model_that_cannot_fit_fails_naming_sizes_and_evicts_nothing() -> None:
    _, residency, device = setup()
    device.sizes["pinned"] = 4 * GB
    run(lambda: residency.ensure("pinned", 4 * GB, context="shared", pinned=True))
    ensure(residency, device, "small", 1 * GB)
    with pytest.raises(ModelDoesNotFit, match=r"model 'huge' needs 4\.00 GiB in context 'shared'") as info:
        ensure(residency, device, "huge", 4 * GB)
    assert "4.00 GiB is held by pinned" in str(info.value)
    assert info.value.reasons
    assert device.unloads == []  # nothing evicted in vain


def test_free_memory_is_measured_again_after_an_unload() -> None:
    ctrl, residency, device = setup()
    device.keep_on_unload_bytes = 512 * MB  # the allocator keeps part of what it freed
    ensure(residency, device, "a", 3 * GB)
    ensure(residency, device, "b", 3 * GB)
    run(lambda: residency.evict("a"))
    assert ctrl.external_bytes == 512 * MB
    assert ctrl.available_bytes() == 10 * GB - 3 * GB - 512 * MB
    device.cached = 0  # the cache was trimmed
    residency.remeasure()
    assert ctrl.external_bytes == 0


def test_failed_load_gives_the_bytes_back() -> None:
    ctrl, residency, device = setup()

    async def broken(name: str) -> object:
        raise RuntimeError("out of memory")

    residency = ModelResidency(ctrl, load=broken, unload=device.unload)
    with pytest.raises(RuntimeError):
        run(lambda: residency.ensure("a", GB, context="shared"))
    assert ctrl.used_bytes() == 0
    assert residency.resident == []


def test_close_unloads_everything() -> None:
    ctrl, residency, device = setup()
    device.sizes["p"] = GB
    run(lambda: residency.ensure("p", GB, context="shared", pinned=True))
    ensure(residency, device, "q", GB, ctx="gold")
    run(residency.close)
    assert ctrl.used_bytes() == 0
    assert device.loaded == {}


def test_idle_models_unload_after_their_keep_alive_and_pinned_ones_stay() -> None:
    ctrl = AdmissionController(10 * GB)
    ctrl.add_context(ContextSpec("models", QoSPolicy.BURSTABLE, max_bytes=10 * GB))
    device = FakeDevice(10 * GB)
    now = [0.0]
    residency = ModelResidency(ctrl, load=device.load, unload=device.unload, now_s=lambda: now[0])
    for name, keep in (("short", 5.0), ("long", 60.0)):
        device.sizes[name] = GB
        residency.register(name, GB, context="models", keep_alive_s=keep)
    residency.adopt("pinned", GB, "session:pinned", context="models")

    async def scenario() -> None:
        for name in ("short", "long"):
            async with residency.hold(name) as held:
                assert held.cold
                assert held.handle == f"session:{name}"
        now[0] = 6.0
        assert await residency.idle_out() == ["short"]
        async with residency.hold("long") as held:
            assert not held.cold
            now[0] = 100.0
            assert await residency.idle_out() == []  # in use: stays, however long
        now[0] = 161.0
        assert await residency.idle_out() == ["long"]

    run(scenario)
    assert residency.resident == ["pinned"]
    rows = {r["name"]: r for r in residency.status()}
    assert rows["short"]["loads"] == 1
    assert rows["short"]["evictions"] == 1
    assert rows["pinned"]["resident"]
    assert rows["pinned"]["pinned"]
    assert residency.idle_unloads == 2


def test_a_pinned_model_over_the_budget_fails_at_adoption() -> None:
    ctrl = AdmissionController(GB)
    ctrl.add_context(ContextSpec("models", QoSPolicy.BURSTABLE, max_bytes=GB))
    residency = ModelResidency(ctrl, load=FakeDevice(GB).load, unload=FakeDevice(GB).unload)
    with pytest.raises(ModelDoesNotFit, match="raise the budget or load it on demand"):
        residency.adopt("big", 2 * GB, object(), context="models")


def test_a_victim_taken_by_a_request_during_the_evictions_is_waited_for_not_unloaded() -> None:
    """Loading c needs a and b out. While a unloads (slowly), a request starts on b: b is not unloaded
    under it; the load waits for b's request to end, then evicts it and loads."""
    ctrl = AdmissionController(10 * GB)
    ctrl.add_context(ContextSpec("models", QoSPolicy.BURSTABLE, max_bytes=10 * GB))
    device = FakeDevice(10 * GB)
    unloading = asyncio.Event()

    async def slow_unload(name: str, handle: object) -> None:
        unloading.set()
        await asyncio.sleep(0.05)
        await device.unload(name, handle)

    residency = ModelResidency(ctrl, load=device.load, unload=slow_unload, wait_for_room_s=5.0)
    for name, size in (("a", 4 * GB), ("b", 4 * GB), ("c", 8 * GB)):
        device.sizes[name] = size
        residency.register(name, size, context="models")

    async def scenario() -> None:
        for name in ("a", "b"):
            async with residency.hold(name):
                pass

        async def use_b() -> None:
            await unloading.wait()
            async with residency.hold("b") as held:
                assert not held.cold
                await asyncio.sleep(0.2)

        user = asyncio.ensure_future(use_b())
        async with residency.hold("c") as held:
            assert held.cold
            assert user.done()  # c loaded only after b's request had ended
        await user

    run(scenario)
    assert device.unloads == ["a", "b"]
    assert residency.resident == ["c"]
