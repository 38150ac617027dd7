"""DeviceRouter: device-router's API over xpuflow's inventory and advisor, and assign() to torch devices."""

from __future__ import annotations

import sys
import types

import pytest

from xpuflow.device_router import DeviceRouter, RoutingStrategy
from xpuflow.discovery.base import ProbeResult
from xpuflow.discovery.inventory import Inventory
from xpuflow.errors import BackendUnavailable, CapabilityError, ConfigError
from xpuflow.types import Resource, ResourceType, RoutingDecision, Strategy

GIB = 1 << 30

CPU = Resource(
    "cpu",
    ResourceType.CPU,
    "test cpu",
    {
        "memory_bytes": 64 * GIB,
        "free_memory_bytes": 48 * GIB,
        "physical_cores": 16,
        "isa_features": ("avx2",),
    },
)
GPU = Resource(
    "cuda:0",
    ResourceType.GPU,
    "NVIDIA L4",
    {
        "vendor": "nvidia",
        "memory_bytes": 24 * GIB,
        "free_memory_bytes": 23 * GIB,
        "compute_capability": "8.9",
    },
)
IGPU = Resource("igpu:0", ResourceType.IGPU, "Intel Arc Graphics", {"vendor": "intel"})
NPU = Resource("npu:0", ResourceType.NPU, "Intel AI Boost", {"vendor": "intel"})


class CountingProbe:
    """A probe that finds fixed resources and counts how often it ran."""

    name = "fake"

    def __init__(self, *resources: Resource) -> None:
        self.resources = resources
        self.calls = 0

    def probe(self) -> ProbeResult:
        self.calls += 1
        return ProbeResult.found(list(self.resources))


@pytest.fixture
def router() -> DeviceRouter:
    return DeviceRouter(Inventory.of([CPU, GPU, IGPU, NPU]))


# ------------------------------------------------------------------------------------ detect, overview


def test_detect_runs_discovery_once_and_returns_the_inventory() -> None:
    probe = CountingProbe(CPU, GPU)
    router = DeviceRouter(probes=[probe])
    assert repr(router) == "DeviceRouter(not detected)"
    inventory = router.detect()
    assert isinstance(inventory, Inventory)
    assert [r.id for r in inventory.resources] == ["cpu", "cuda:0"]
    router.route(1e6)
    router.overview()
    assert probe.calls == 1
    assert repr(router) == "DeviceRouter(cpu, cuda:0)"


def test_route_detects_on_first_use() -> None:
    probe = CountingProbe(CPU)
    decision = DeviceRouter(probes=[probe]).route(1e6)
    assert decision.device == "cpu"
    assert probe.calls == 1


def test_overview_status_and_availability(router: DeviceRouter) -> None:
    overview = router.overview()
    assert [r["id"] for r in overview["cuda"]] == ["cuda:0"]
    assert [r["id"] for r in overview["npu"]] == ["npu:0"]
    assert overview["rocm"] == []
    assert router.status() == overview
    assert router.cuda_available
    assert router.directml_available
    assert router.cpu_info["id"] == "cpu"
    bare = DeviceRouter(Inventory.of([]))
    assert not bare.cuda_available
    assert not bare.directml_available
    assert bare.cpu_info == {}


# -------------------------------------------------------------------------------------------- route


def test_route_mirrors_device_router(router: DeviceRouter) -> None:
    decision = router.route(
        model_size=1_000_000_000, batch_size=32, precision="fp16", strategy=RoutingStrategy.AUTO
    )
    assert isinstance(decision, RoutingDecision)
    assert decision.device == "cuda:0"
    assert decision.reason.startswith("cuda:0")
    assert decision.precision == "fp16"
    assert 0.0 <= decision.confidence <= 1.0
    assert RoutingStrategy is Strategy
    assert [s.name for s in RoutingStrategy] == ["AUTO", "LATENCY", "THROUGHPUT", "POWER"]


def test_route_power_keeps_off_the_gpu(router: DeviceRouter) -> None:
    decision = router.route(1e8, precision="int8", strategy=RoutingStrategy.POWER)
    assert decision.device == "npu:0"


def test_is_training_and_is_onnx_are_device_router_spellings(router: DeviceRouter) -> None:
    training = router.route(1e8, is_training=True)
    assert training.details["task"] == "training"
    assert training.device == "cuda:0"
    assert training.use_amp
    assert router.route(1e8, is_training=False).details["task"] == "inference"
    onnx = router.route(1e8, precision="fp16", is_onnx=True)
    assert onnx.details["model_format"] == "onnx"
    assert router.route(1e8, is_onnx=True, model_format=".ONNX").details["model_format"] == "onnx"
    assert router.route(1e8, is_onnx=False).details["model_format"] is None


def test_contradicting_spellings_are_config_errors(router: DeviceRouter) -> None:
    with pytest.raises(ConfigError, match="contradicts task"):
        router.route(1e8, task="training", is_training=False)
    with pytest.raises(ConfigError, match="contradicts model_format"):
        router.route(1e8, model_format="gguf", is_onnx=True)


def test_route_errors_name_the_valid_values(router: DeviceRouter) -> None:
    with pytest.raises(ConfigError, match="fp32, fp16, bf16, fp8, int8, int4"):
        router.route(1e6, precision="double")
    with pytest.raises(ConfigError, match="auto, latency, throughput, power"):
        router.route(1e6, strategy="cheapest")
    with pytest.raises(CapabilityError, match="int8/int4"):
        router.route(5e12, precision="fp16")


# ------------------------------------------------------------------------------------------- assign


def test_assign_returns_the_id_without_torch(router: DeviceRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail as if absent
    assert router.assign("cuda:0") == "cuda:0"
    assert router.assign("npu:0") == "npu:0"
    assert router.assign(router.route(1e6)) == "cpu"


def test_assign_maps_ids_to_torch_devices(router: DeviceRouter) -> None:
    torch = pytest.importorskip("torch")
    assert router.assign("cuda:1") == torch.device("cuda", 1)
    assert router.assign("cuda") == torch.device("cuda")
    assert router.assign("cpu") == torch.device("cpu")
    assert router.assign("mps:0") == torch.device("mps")
    assert router.assign("xpu:0") == torch.device("xpu", 0)
    decision = router.route(1e9, batch_size=32, precision="fp16")
    assert router.assign(decision) == torch.device("cuda", 0)


def test_assign_rocm_needs_a_rocm_build_of_torch(router: DeviceRouter) -> None:
    torch = pytest.importorskip("torch")
    if getattr(torch.version, "hip", None) is not None:
        assert router.assign("rocm:0") == torch.device("cuda", 0)
    else:
        with pytest.raises(BackendUnavailable, match="no ROCm support"):
            router.assign("rocm:0")


def test_assign_igpu_through_torch_directml(router: DeviceRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    fake = types.ModuleType("torch_directml")
    fake.device = lambda index=0: f"privateuseone:{index}"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_directml", fake)
    assert router.assign("igpu:0") == "privateuseone:0"
    assert router.assign("dml:1") == "privateuseone:1"
    assert router.assign("directml") == "privateuseone:0"
    monkeypatch.setitem(sys.modules, "torch_directml", None)
    with pytest.raises(BackendUnavailable, match="pip install torch-directml"):
        router.assign("igpu:0")


def test_assign_refuses_what_torch_cannot_address(
    router: DeviceRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(BackendUnavailable, match=r"torch cannot address npu:0 \(intel NPU\).*OpenVINO"):
        router.assign("npu:0")
    with pytest.raises(BackendUnavailable, match="vendor SDK"):
        router.assign("pim:0")
    with pytest.raises(BackendUnavailable, match="remote model server"):
        router.assign("remote:vllm-a")


@pytest.mark.parametrize("bad", ["", "  ", "tpu:0", 3, None])
def test_assign_rejects_unknown_ids(router: DeviceRouter, bad: object) -> None:
    with pytest.raises(ConfigError, match=r"cuda:0|cpu, cuda:N"):
        router.assign(bad)  # type: ignore[arg-type]
