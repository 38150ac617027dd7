"""TorchProbe: no import without torch; CUDA, ROCm, MPS and XPU devices through a stand-in torch module."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import textwrap
import types
from types import SimpleNamespace
from typing import Any

import pytest

from xpuflow.discovery.inventory import Inventory
from xpuflow.discovery.nvidia import NvidiaProbe
from xpuflow.discovery.torch_devices import TorchProbe
from xpuflow.testing import FakeGpu, FakeNvml
from xpuflow.types import ResourceType

GIB = 1 << 30


def _fake_torch(
    *,
    cuda: list[SimpleNamespace] = (),  # type: ignore[assignment]
    hip: str | None = None,
    mps_memory: int | None = None,
    xpu: list[SimpleNamespace] = (),  # type: ignore[assignment]
) -> types.ModuleType:
    """A module named torch with the attributes the probe reads, and a __spec__ so find_spec sees it."""
    torch = types.ModuleType("torch")
    torch.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    torch.__version__ = "2.13.0+fake"
    torch.version = SimpleNamespace(cuda=None if hip else "12.4", hip=hip)  # type: ignore[attr-defined]
    torch.cuda = SimpleNamespace(  # type: ignore[attr-defined]
        is_available=lambda: bool(cuda),
        device_count=lambda: len(cuda),
        get_device_properties=lambda i: cuda[i],
        mem_get_info=lambda i: (cuda[i].total_memory - 4 * GIB, cuda[i].total_memory),
    )
    torch.backends = SimpleNamespace(mps=SimpleNamespace(is_available=lambda: mps_memory is not None))  # type: ignore[attr-defined]
    torch.mps = SimpleNamespace(  # type: ignore[attr-defined]
        recommended_max_memory=lambda: mps_memory, driver_allocated_memory=lambda: 1 * GIB
    )
    torch.xpu = SimpleNamespace(  # type: ignore[attr-defined]
        is_available=lambda: bool(xpu), device_count=lambda: len(xpu), get_device_properties=lambda i: xpu[i]
    )
    return torch


def _cuda_props(name: str, total: int, major: int, minor: int, uuid: str = "") -> SimpleNamespace:
    return SimpleNamespace(
        name=name, total_memory=total, major=major, minor=minor, multi_processor_count=132, uuid=uuid
    )


def test_cuda_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = _fake_torch(
        cuda=[_cuda_props("NVIDIA H100 80GB HBM3", 80 * GIB, 9, 0, "58ff6e24-0000-4000-8000-000000000000")]
    )
    monkeypatch.setitem(sys.modules, "torch", torch)

    result = TorchProbe(query_free_memory=True).probe()

    (gpu,) = result.resources
    assert (gpu.id, gpu.type, gpu.vendor) == ("cuda:0", ResourceType.GPU, "nvidia")
    assert gpu.memory_bytes == 80 * GIB
    assert gpu.free_memory_bytes == 76 * GIB
    # by default no CUDA context is created just to read free memory (NVML reports it)
    (plain,) = TorchProbe().probe().resources
    assert "free_memory_bytes" not in plain.attributes
    assert gpu.attributes["compute_capability"] == "9.0"
    assert gpu.attributes["uuid"] == "GPU-58ff6e24-0000-4000-8000-000000000000"
    assert result.details["torch_version"] == "2.13.0+fake"
    assert result.reason == "torch 2.13.0+fake: cuda:0 NVIDIA H100 80GB HBM3"


def test_rocm_build_names_gpus_rocm(monkeypatch: pytest.MonkeyPatch) -> None:
    props = _cuda_props("AMD Instinct MI300X", 192 * GIB, 9, 4)
    props.gcnArchName = "gfx942:sramecc+:xnack-"
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(cuda=[props], hip="6.2.41133"))

    (gpu,) = TorchProbe().probe().resources

    assert (gpu.id, gpu.vendor) == ("rocm:0", "amd")
    assert gpu.attributes["gfx_target"] == "gfx942"
    assert "compute_capability" not in gpu.attributes


def test_mps_and_xpu(monkeypatch: pytest.MonkeyPatch) -> None:
    xpus = [
        SimpleNamespace(name="Intel(R) Arc(TM) Graphics", total_memory=14 * GIB, device_id=0x7D55),
        SimpleNamespace(name="Intel(R) Arc(TM) B580 Graphics", total_memory=12 * GIB, device_id=0xE20B),
    ]
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(mps_memory=21 * GIB, xpu=xpus))

    mps, integrated, discrete = TorchProbe().probe().resources

    assert (mps.id, mps.type, mps.vendor) == ("mps:0", ResourceType.IGPU, "apple")
    assert mps.memory_bytes == 21 * GIB
    assert mps.free_memory_bytes == 20 * GIB
    assert (integrated.id, integrated.type) == ("xpu:0", ResourceType.IGPU)
    assert (discrete.id, discrete.type) == ("xpu:1", ResourceType.GPU)


def test_a_failing_backend_does_not_hide_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = _fake_torch(mps_memory=8 * GIB)

    def broken() -> bool:
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    torch.cuda.is_available = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)

    result = TorchProbe().probe()

    assert [r.id for r in result.resources] == ["mps:0"]
    assert "insufficient" in result.details["errors"][0]["error"]


def test_inventory_merges_nvml_and_torch_views_of_cuda0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(cuda=[_cuda_props("NVIDIA L4", 24 * GIB, 8, 9)]))
    nvml = FakeNvml([FakeGpu("NVIDIA L4", 24 * GIB, 6 * GIB, cc=(8, 9), mig_supported=False)])

    inventory = Inventory.detect([NvidiaProbe(nvml=nvml), TorchProbe()])

    (gpu,) = inventory.resources
    assert gpu.source == "nvml+torch"
    assert gpu.free_memory_bytes == 18 * GIB  # NVML's reading is kept: it came first
    assert gpu.attributes["multiprocessor_count"] == 132  # only torch knew this


def test_without_torch_nothing_is_imported() -> None:
    """In a fresh interpreter where torch cannot be found, the probe answers without importing it."""
    script = textwrap.dedent(
        """
        import importlib.machinery, json, sys

        # Make torch unfindable for the path-based finder, as on a machine without it.
        real = importlib.machinery.PathFinder.find_spec

        def hide(name, path=None, target=None):
            return None if name.split(".")[0] in ("torch", "torch_directml") else real(name, path, target)

        importlib.machinery.PathFinder.find_spec = staticmethod(hide)

        from xpuflow.discovery.torch_devices import TorchProbe

        result = TorchProbe().probe()
        print(json.dumps({"found": len(result.resources), "reason": result.reason,
                          "imported": "torch" in sys.modules}))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    answer: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    assert answer["found"] == 0
    assert answer["imported"] is False
    assert answer["reason"].startswith("torch is not installed")


def test_on_this_machine_never_raises() -> None:
    result = TorchProbe().probe()
    assert result.reason
    if importlib.util.find_spec("torch") is not None:
        assert result.details["torch_version"]


def test_nvml_and_torch_views_merge_by_uuid_when_their_order_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    from xpuflow.discovery.base import ProbeResult
    from xpuflow.types import Resource

    class Listed:
        def __init__(self, name: str, resources: list[Resource]) -> None:
            self.name = name
            self._resources = resources

        def probe(self) -> ProbeResult:
            return ProbeResult.found(self._resources)

    nvml = Listed(
        "nvidia",
        [
            Resource("cuda:0", ResourceType.GPU, "L4", {"uuid": "GPU-a", "free_memory_bytes": 1}),
            Resource("cuda:1", ResourceType.GPU, "H100", {"uuid": "GPU-b", "free_memory_bytes": 2}),
        ],
    )
    # torch sees them in the other order (CUDA_VISIBLE_DEVICES=1,0)
    torch_view = Listed(
        "torch",
        [
            Resource("cuda:0", ResourceType.GPU, "H100", {"uuid": "GPU-b", "multiprocessor_count": 132}),
            Resource("cuda:1", ResourceType.GPU, "L4", {"uuid": "GPU-a", "multiprocessor_count": 58}),
        ],
    )
    inventory = Inventory.detect([nvml, torch_view])
    assert len(inventory.resources) == 2
    h100 = inventory.get("cuda:1")
    assert h100 is not None
    assert h100.name == "H100"
    assert h100.attributes["multiprocessor_count"] == 132


def test_detect_without_the_torch_probe_never_imports_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from xpuflow.discovery.inventory import Inventory; "
        "inv = Inventory.detect(torch=False); "
        "assert 'torch' not in sys.modules; "
        "assert [r.probe for r in inv.reports if r.probe == 'torch'] == []; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.strip() == "ok", out.stderr
