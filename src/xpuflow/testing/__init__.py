"""Fakes shipped with the contracts they stand in for, used by xpuflow's tests and its simulator.

Example::

    from xpuflow.testing import FakeGpu, FakeNvml
    probe = NvidiaProbe(nvml=FakeNvml([FakeGpu("NVIDIA L4", 24 << 30, cc=(8, 9))]))

Each fake mimics the real library's names and return shapes, so code under test cannot tell them apart.
"""

from __future__ import annotations

from xpuflow.testing.fake_backend import FakePlugin, FakeSession
from xpuflow.testing.fake_engine import FakeEngine
from xpuflow.testing.fake_nvml import FakeGpu, FakeNvml
from xpuflow.testing.fake_vram import FakeVramSource
from xpuflow.testing.run_async import run_async

__all__ = ["FakeEngine", "FakeGpu", "FakeNvml", "FakePlugin", "FakeSession", "FakeVramSource", "run_async"]
