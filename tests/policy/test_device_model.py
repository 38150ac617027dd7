"""Per-device estimates: compute per precision, usable memory, refusals, stated attributes win."""

from __future__ import annotations

import pytest

from xpuflow.policy.device_model import NPU_DEFAULT_MEMORY_BYTES, profile_resource
from xpuflow.types import Precision, Resource, ResourceType

GIB = 1 << 30


def cpu(features: tuple[str, ...] = (), **attributes: object) -> Resource:
    base = {
        "memory_bytes": 64 * GIB,
        "free_memory_bytes": 40 * GIB,
        "physical_cores": 16,
        "frequency_mhz": 3000.0,
        "isa_features": features,
    }
    base.update(attributes)
    return Resource("cpu", ResourceType.CPU, "test cpu", base)


def rate(resource: Resource, precision: Precision, host: Resource | None = None) -> float:
    return profile_resource(resource, host).precisions[precision].inference_ops_per_s


@pytest.mark.parametrize(
    ("features", "int8_speedup"),
    [
        (("avx2",), 2.0),
        (("avx2", "avx_vnni"), 4.0),
        (("avx2", "avx512f", "avx512_vnni"), 4.0),
        (("avx2", "avx512f", "avx512_vnni", "amx_int8"), 16.0),
        (("neon", "dotprod"), 4.0),
        (("neon", "dotprod", "i8mm"), 8.0),
    ],
)
def test_cpu_int8_is_boosted_by_dot_product_instructions(
    features: tuple[str, ...], int8_speedup: float
) -> None:
    part = cpu(features)
    assert rate(part, Precision.INT8) == pytest.approx(int8_speedup * rate(part, Precision.FP32))


def test_cpu_bf16_is_boosted_by_amx_and_avx512_bf16_only() -> None:
    plain = cpu(("avx2", "avx512f"))
    assert rate(plain, Precision.BF16) == rate(plain, Precision.FP32)
    assert "no native bf16" in profile_resource(plain).precisions[Precision.BF16].note
    assert rate(cpu(("avx512f", "avx512_bf16")), Precision.BF16) == pytest.approx(
        2 * rate(cpu(("avx512f", "avx512_bf16")), Precision.FP32)
    )
    amx = cpu(("avx512f", "avx512_bf16", "amx_bf16"))
    assert rate(amx, Precision.BF16) == pytest.approx(8 * rate(amx, Precision.FP32))


def test_cpu_vector_width_and_cores_scale_fp32() -> None:
    assert rate(cpu(("avx2", "avx512f")), Precision.FP32) == pytest.approx(
        2 * rate(cpu(("avx2",)), Precision.FP32)
    )
    assert rate(cpu(("avx2",), physical_cores=32), Precision.FP32) == pytest.approx(
        2 * rate(cpu(("avx2",)), Precision.FP32)
    )


def test_cpu_keeps_a_safety_margin_of_ram() -> None:
    assert profile_resource(cpu()).usable_memory_bytes == 40 * GIB - int(6.4 * GIB)
    small = cpu(memory_bytes=8 * GIB, free_memory_bytes=4 * GIB)
    assert profile_resource(small).usable_memory_bytes == 3 * GIB  # the 1 GiB floor


def gpu(cc: str | None, total_gib: float = 24, **attributes: object) -> Resource:
    base: dict[str, object] = {
        "vendor": "nvidia",
        "memory_bytes": int(total_gib * GIB),
        "free_memory_bytes": int(total_gib * GIB) - GIB,
    }
    if cc is not None:
        base["compute_capability"] = cc
    base.update(attributes)
    return Resource("cuda:0", ResourceType.GPU, "test gpu", base)


def test_gpu_generations_rank_by_compute_capability() -> None:
    rates = [rate(gpu(cc, 80), Precision.FP16) for cc in ("6.1", "7.0", "8.0", "9.0", "10.0")]
    assert rates == sorted(rates)
    assert profile_resource(gpu("9.0", 80)).label == "Hopper class, compute capability 9.0"


def test_gpu_precision_features_follow_the_compute_capability() -> None:
    turing = profile_resource(gpu("7.5", 16)).precisions
    assert turing[Precision.BF16].inference_ops_per_s == turing[Precision.FP32].inference_ops_per_s
    assert "before compute capability 8.0 (this GPU has 7.5)" in turing[Precision.BF16].note
    assert "fp8 training needs native fp8" in turing[Precision.FP8].training_refused
    ada = profile_resource(gpu("8.9", 24)).precisions
    assert ada[Precision.FP8].inference_ops_per_s > ada[Precision.FP16].inference_ops_per_s
    assert ada[Precision.FP8].training_refused == ""
    assert profile_resource(gpu(None, 24)).precisions[Precision.FP32].use_amp is False


def test_smaller_parts_of_a_generation_and_busy_gpus_are_slower() -> None:
    assert rate(gpu("8.9", 8), Precision.FP16) < rate(gpu("8.9", 24), Precision.FP16)
    busy = profile_resource(gpu("8.9", 24, utilization_pct=90))
    assert busy.precisions[Precision.FP16].inference_ops_per_s < rate(gpu("8.9", 24), Precision.FP16)
    assert busy.notes == ("90% utilised by other work",)


def test_stated_attributes_win_over_class_estimates() -> None:
    profile = profile_resource(gpu("8.0", 80, bandwidth_gbps=1000, power_limit_w=250))
    assert profile.bandwidth_bytes_per_s == pytest.approx(1000e9 * 0.8)
    assert profile.watts == 250
    assert profile_resource(cpu(tdp_w=45)).watts == 45


def test_amd_gpus_are_classed_by_gfx_target() -> None:
    mi300 = Resource("rocm:0", ResourceType.GPU, "MI300X", {"vendor": "amd", "gfx_target": "gfx942"})
    profile = profile_resource(mi300)
    assert profile.label == "CDNA3 class"
    assert profile.precisions[Precision.FP32].use_amp is True
    assert profile.inference_refused == "rocm:0 reports no memory size, so nothing can be fitted to it"


def test_npu_without_memory_gets_the_conservative_limit_and_no_fp32() -> None:
    host = cpu()
    npu = profile_resource(Resource("npu:0", ResourceType.NPU, "", {"vendor": "intel"}), host)
    assert npu.usable_memory_bytes == NPU_DEFAULT_MEMORY_BYTES
    assert "not fp32" in npu.precisions[Precision.FP32].refused
    assert npu.precisions[Precision.INT8].refused == ""
    assert "inference only" in npu.training_refused
    assert npu.low_power


def test_datacenter_npus_use_their_reported_memory() -> None:
    ascend = Resource("npu:0", ResourceType.NPU, "", {"vendor": "huawei", "memory_bytes": 64 * GIB})
    profile = profile_resource(ascend)
    assert profile.usable_memory_bytes == 64 * GIB
    assert profile.precisions[Precision.FP32].refused == ""  # Ascend computes fp32, slowly


def test_igpu_takes_a_share_of_host_ram() -> None:
    host = cpu(memory_bytes=16 * GIB, free_memory_bytes=12 * GIB)
    igpu = profile_resource(Resource("igpu:0", ResourceType.IGPU, "", {"vendor": "intel"}), host)
    assert igpu.usable_memory_bytes == 8 * GIB  # 50% of RAM, less than available minus the margin
    tight = cpu(memory_bytes=16 * GIB, free_memory_bytes=5 * GIB)
    shared = profile_resource(Resource("igpu:0", ResourceType.IGPU, "", {}), tight)
    assert shared.usable_memory_bytes == 5 * GIB - int(1.6 * GIB)  # available minus the 10% margin
    orphan = profile_resource(Resource("igpu:0", ResourceType.IGPU, "", {}))
    assert "host's RAM size is unknown" in orphan.inference_refused


def test_remote_and_pim_need_declared_memory() -> None:
    remote = profile_resource(Resource("remote:a", ResourceType.REMOTE, "", {"rtt_ms": 2}))
    assert "declare memory_bytes" in remote.inference_refused
    assert remote.dispatch_s == pytest.approx(0.002)
    assert not remote.low_power
    pim = profile_resource(Resource("pim:0", ResourceType.PIM, "", {"memory_bytes": 16 * GIB}))
    assert pim.inference_refused == ""
    assert "inference kernels only" in pim.training_refused


@pytest.mark.parametrize(
    "attributes",
    [
        {"memory_bytes": "lots", "compute_capability": "sm_90", "utilization_pct": "n/a"},
        {
            "compute_capability": (9,),
            "isa_features": None,
            "physical_cores": -3,
            "power_limit_w": float("nan"),
        },
        {"compute_capability": [8, "x"], "frequency_mhz": True, "bandwidth_gbps": "fast"},
    ],
)
@pytest.mark.parametrize("kind", list(ResourceType))
def test_odd_attributes_never_raise(kind: ResourceType, attributes: dict[str, object]) -> None:
    profile = profile_resource(Resource(f"{kind.value}:0", kind, "", attributes), cpu())
    assert profile.watts > 0
    assert profile.bandwidth_bytes_per_s > 0
    assert all(s.inference_ops_per_s > 0 for s in profile.precisions.values())
    assert profile.to_dict()["resource_id"] == f"{kind.value}:0"
