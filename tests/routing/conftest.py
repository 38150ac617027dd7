"""Fixtures for the routing tests: a fake clock, fake GPUs, a monitor over them and a router."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from routing_helpers import GIB, StandInScorer

from xpuflow.clock import FakeClock
from xpuflow.routing import AdaptiveRouter, RoutingConfig
from xpuflow.telemetry import VRAMMonitor
from xpuflow.testing.fake_vram import FakeVramSource


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start_s=100.0)


@pytest.fixture
def vram() -> FakeVramSource:
    return FakeVramSource({"cuda:0": 24 * GIB, "cuda:1": 16 * GIB})


@pytest.fixture
def monitor(vram: FakeVramSource, clock: FakeClock) -> Iterator[VRAMMonitor]:
    monitor = VRAMMonitor(vram, clock=clock)
    monitor.poll_once()
    yield monitor
    monitor.stop()


@pytest.fixture
def router(monitor: VRAMMonitor, clock: FakeClock) -> Iterator[AdaptiveRouter]:
    with AdaptiveRouter(RoutingConfig(), scorer=StandInScorer(), monitor=monitor, clock=clock) as router:
        yield router
