"""VRAMMonitor over the fake NVML and the fake source: readings, snapshots, threads, failures, cost."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from xpuflow.clock import FakeClock
from xpuflow.errors import ConfigError, DiscoveryError
from xpuflow.telemetry import GIB, NvmlSource, TorchCudaSource, VRAMMonitor, VramSnapshot
from xpuflow.testing import FakeGpu, FakeNvml
from xpuflow.testing.fake_vram import FakeVramSource


def two_gpus(**kwargs: Any) -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu("NVIDIA H100 80GB HBM3", 80 * GIB, memory_used_bytes=10 * GIB, utilization_pct=40),
            FakeGpu("NVIDIA L4", 24 * GIB, cc=(8, 9), mig_supported=False),
        ],
        **kwargs,
    )


def wait_for(condition: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


class FakeCuda:
    """Stands in for ``torch.cuda``: ``mem_get_info`` per device."""

    def __init__(self, totals: list[int], available: bool = True) -> None:
        self.totals = totals
        self.free = list(totals)
        self.available = available

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return len(self.totals)

    def mem_get_info(self, index: int) -> tuple[int, int]:
        return self.free[index], self.totals[index]


@pytest.fixture
def nvml() -> FakeNvml:
    return two_gpus()


@pytest.fixture
def live(nvml: FakeNvml) -> Iterator[VRAMMonitor]:
    monitor = VRAMMonitor(NvmlSource(nvml), poll_interval_ms=10)
    yield monitor
    monitor.stop()


def test_nvml_source_reads_every_gpu(nvml: FakeNvml) -> None:
    clock = FakeClock(start_s=5.0)
    snapshot = VRAMMonitor(NvmlSource(nvml), clock=clock).poll_once()
    assert snapshot.source == "nvml"
    assert snapshot.error is None
    assert list(snapshot.readings) == ["cuda:0", "cuda:1"]
    h100 = snapshot.get("cuda:0")
    assert h100 is not None
    assert (h100.total_bytes, h100.used_bytes, h100.free_bytes) == (80 * GIB, 10 * GIB, 70 * GIB)
    assert h100.free_gb == 70.0
    assert h100.utilization_pct == 40.0
    assert h100.taken_at_s == snapshot.taken_at_s == 5.0
    assert "cuda:1" in snapshot
    assert snapshot.get("cuda:7") is None


def test_a_change_shows_on_the_next_poll(nvml: FakeNvml) -> None:
    monitor = VRAMMonitor(NvmlSource(nvml), clock=FakeClock())
    before = monitor.poll_once()
    nvml.set_memory_used(1, 20 * GIB)
    nvml.set_utilization(1, 95)
    after = monitor.poll_once()
    assert before.get("cuda:1").free_bytes == 24 * GIB  # type: ignore[union-attr]
    assert after.get("cuda:1").free_bytes == 4 * GIB  # type: ignore[union-attr]
    assert after.get("cuda:1").utilization_pct == 95.0  # type: ignore[union-attr]
    assert after.polls == before.polls + 1
    monitor.stop()


def test_the_thread_publishes_updates_and_stop_joins_it(nvml: FakeNvml, live: VRAMMonitor) -> None:
    live.start()
    assert live.running
    assert live.snapshot().get("cuda:0") is not None  # start() reads once before returning
    nvml.set_memory_used(0, 79 * GIB)
    assert wait_for(lambda: live.snapshot().get("cuda:0").free_bytes == 1 * GIB)  # type: ignore[union-attr]
    thread = live._thread
    assert thread is not None
    assert thread.daemon
    live.stop()
    assert not thread.is_alive()
    assert not live.running
    assert not nvml.initialized
    assert nvml.init_count == nvml.shutdown_count == 1
    live.stop()  # idempotent
    assert nvml.shutdown_count == 1


def test_readers_always_see_one_whole_poll(nvml: FakeNvml, live: VRAMMonitor) -> None:
    """A writer flips memory while the poller runs; every snapshot a reader takes is self-consistent."""
    live.start()
    stop = threading.Event()

    def writer() -> None:
        used = 0
        while not stop.is_set():
            used = (used + 1) % 20
            nvml.set_memory_used(0, used * GIB)
            nvml.set_memory_used(1, used * GIB)
            time.sleep(0.001)

    thread = threading.Thread(target=writer)
    thread.start()
    seen: set[int] = set()
    last_polls, last_time = 0, -1.0
    deadline = time.monotonic() + 0.4
    try:
        while time.monotonic() < deadline:
            snapshot = live.snapshot()
            assert snapshot.polls >= last_polls
            assert snapshot.taken_at_s is not None
            assert snapshot.taken_at_s >= last_time
            last_polls, last_time = snapshot.polls, snapshot.taken_at_s
            for reading in snapshot.readings.values():
                assert reading.free_bytes + reading.used_bytes == reading.total_bytes
                assert reading.taken_at_s == snapshot.taken_at_s
            seen.add(snapshot.polls)
    finally:
        stop.set()
        thread.join()
    assert len(seen) >= 5  # the snapshot really changed under the reader


def test_start_twice_keeps_one_thread_and_restart_after_stop_works(live: VRAMMonitor, nvml: FakeNvml) -> None:
    live.start()
    first = live._thread
    live.start()
    assert live._thread is first
    live.stop()
    live.start()
    assert live.running
    assert live._thread is not first
    live.stop()
    assert nvml.init_count == nvml.shutdown_count == 2


def test_context_manager_opens_and_closes_the_source() -> None:
    source = FakeVramSource({"cuda:0": 8 * GIB})
    with VRAMMonitor(source, poll_interval_ms=10) as monitor:
        assert monitor.running
        assert source.is_open
        assert monitor.snapshot().get("cuda:0").free_bytes == 8 * GIB  # type: ignore[union-attr]
    assert not monitor.running
    assert not source.is_open
    assert source.opens == source.closes == 1


def test_nvml_init_failure_raises_a_discovery_error_that_says_what_to_do() -> None:
    with pytest.raises(DiscoveryError, match=r"NVML did not start \(Driver Not Loaded\); install the NVIDIA"):
        NvmlSource(FakeNvml([FakeGpu()], fail_init=True)).open()


def test_auto_falls_back_to_torch_when_nvml_fails() -> None:
    cuda = FakeCuda([16 * GIB])
    cuda.free[0] = 6 * GIB
    monitor = VRAMMonitor.auto(nvml=FakeNvml([FakeGpu()], fail_init=True), torch_cuda=cuda)
    assert monitor.available
    assert monitor.source_name == "torch"
    reading = monitor.poll_once().get("cuda:0")
    assert reading is not None
    assert (reading.free_bytes, reading.used_bytes, reading.utilization_pct) == (6 * GIB, 10 * GIB, None)
    monitor.stop()


def test_auto_reports_why_no_source_works_and_never_raises() -> None:
    failing = FakeNvml([FakeGpu()], fail_init=True)
    monitor = VRAMMonitor.auto(nvml=failing, torch_cuda=FakeCuda([GIB], available=False))
    assert not monitor.available
    assert monitor.error is not None
    assert "NVML did not start" in monitor.error
    assert "torch sees no CUDA device" in monitor.error
    assert monitor.start() is monitor  # no source: no thread, no exception
    assert not monitor.running
    assert monitor.snapshot().readings == {}
    monitor.stop()


def test_auto_with_nvml_only_does_not_try_torch() -> None:
    monitor = VRAMMonitor.auto(source="nvml", nvml=FakeNvml([FakeGpu()], fail_init=True))
    assert not monitor.available
    assert "torch" not in (monitor.error or "")


def test_source_none_is_disabled_by_configuration() -> None:
    monitor = VRAMMonitor.auto(source="none")
    assert not monitor.available
    assert monitor.error == "no VRAM source: disabled by configuration"


def test_auto_picks_nvml_when_it_works(nvml: FakeNvml) -> None:
    monitor = VRAMMonitor.auto(nvml=nvml, torch_cuda=FakeCuda([GIB]))
    assert monitor.source_name == "nvml"
    assert nvml.initialized
    monitor.stop()
    assert not nvml.initialized


def test_a_source_that_will_not_open_is_reported_not_raised() -> None:
    source = FakeVramSource({"cuda:0": GIB}, fail_open=True, open_error="vendor library missing")
    monitor = VRAMMonitor(source)
    assert monitor.start() is monitor
    assert not monitor.running
    assert monitor.snapshot().error == "vendor library missing"


def test_a_failing_read_keeps_the_last_readings_and_says_why() -> None:
    clock = FakeClock()
    source = FakeVramSource({"cuda:0": 8 * GIB})
    monitor = VRAMMonitor(source, clock=clock)
    good = monitor.poll_once()
    clock.advance(1.0)
    source.fail_reads(2)
    bad = monitor.poll_once()
    assert bad.error is not None
    assert "read failed" in bad.error
    assert bad.readings == good.readings
    assert bad.taken_at_s == good.taken_at_s == 0.0
    monitor.poll_once()
    source.recover()
    fresh = monitor.poll_once()
    assert fresh.error is None
    assert fresh.taken_at_s == 1.0
    assert monitor.stats().failures == 2


def test_one_gpu_failing_does_not_blank_the_others() -> None:
    nvml = two_gpus(failing_calls=[("nvmlDeviceGetMemoryInfo", 1)])
    snapshot = VRAMMonitor(NvmlSource(nvml)).poll_once()
    assert list(snapshot.readings) == ["cuda:0"]
    assert snapshot.error is None


def test_utilisation_unknown_is_none_not_a_guess() -> None:
    nvml = two_gpus(failing_calls=["nvmlDeviceGetUtilizationRates"])
    reading = VRAMMonitor(NvmlSource(nvml)).poll_once().get("cuda:0")
    assert reading is not None
    assert reading.utilization_pct is None
    assert reading.free_bytes == 70 * GIB


@pytest.mark.parametrize("interval_ms", [0.5, 1500.0])
def test_poll_interval_out_of_range_is_a_config_error(interval_ms: float) -> None:
    with pytest.raises(ConfigError, match="poll_interval_ms"):
        VRAMMonitor(FakeVramSource({"cuda:0": GIB}), poll_interval_ms=interval_ms)


def test_torch_source_without_cuda_says_so() -> None:
    with pytest.raises(DiscoveryError, match="no CUDA device"):
        TorchCudaSource(FakeCuda([GIB], available=False)).open()


def test_poller_cpu_cost_is_measured_and_small() -> None:
    """At 15 ms the poller should sit far below one core; the benchmark reports the exact figure."""
    with VRAMMonitor(FakeVramSource({"cuda:0": GIB, "cuda:1": GIB}), poll_interval_ms=15) as monitor:
        time.sleep(0.45)
    stats = monitor.stats()
    assert 10 <= stats.polls <= 40
    assert stats.cpu_time_s > 0
    assert 0 < stats.cpu_fraction < 0.25
    assert stats.to_dict()["source"] == "fake"


def test_snapshot_to_dict_is_plain_data(nvml: FakeNvml) -> None:
    data = VRAMMonitor(NvmlSource(nvml), clock=FakeClock()).poll_once().to_dict()
    assert data["source"] == "nvml"
    assert data["error"] is None
    assert data["devices"][1] == {
        "device": "cuda:1",
        "free_bytes": 24 * GIB,
        "used_bytes": 0,
        "total_bytes": 24 * GIB,
        "utilization_pct": 0.0,
        "taken_at_s": 0.0,
    }
    assert VramSnapshot().to_dict()["devices"] == []


def test_importing_telemetry_and_routing_loads_no_vendor_library() -> None:
    code = (
        "import sys, xpuflow.telemetry, xpuflow.routing; "
        "bad = [m for m in ('pynvml', 'torch') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
