"""The workload advisor on hand-built inventories: memory model, each strategy's choice, the reasons."""

from __future__ import annotations

import enum
import gc
import json
import math
import re
import timeit
import weakref

import pytest

from xpuflow.discovery.inventory import Inventory
from xpuflow.errors import CapabilityError, ConfigError
from xpuflow.policy import advise_workload, estimate_memory, profile_inventory
from xpuflow.policy.advisor import DEFAULT_CONTEXT_TOKENS
from xpuflow.types import Precision, Resource, ResourceType, Strategy, Task

GIB = 1 << 30
MIB = 1 << 20
SIZE = re.compile(r"needs \d+\.\d (GiB|MiB) but (\S+) has \d+\.\d (GiB|MiB) ")


def by_id(decision, candidate):
    return next(a for a in decision.alternatives if a.candidate == candidate)


# ------------------------------------------------------------------------------------------ memory model


def transformer_shape(params: float) -> tuple[float, float]:
    d_model = (params * 128 / 12) ** (1 / 3)
    return d_model, max(1.0, d_model / 128)


def test_inference_memory_is_weights_plus_kv_plus_activations_plus_overhead() -> None:
    estimate = estimate_memory(7e9, batch_size=2, precision="fp16", device_type="gpu")
    d_model, layers = transformer_shape(7e9)
    tokens = 2 * DEFAULT_CONTEXT_TOKENS
    assert estimate.weights_bytes == 14_000_000_000
    assert estimate.kv_cache_bytes == pytest.approx(tokens * 2 * layers * d_model * 2, abs=1)
    assert estimate.activations_bytes == pytest.approx(tokens * 8 * d_model * 2, abs=1)
    assert estimate.gradients_bytes == estimate.optimizer_bytes == 0
    tensors = estimate.weights_bytes + estimate.kv_cache_bytes + estimate.activations_bytes
    # 10% allocator slack plus a 512 MiB CUDA context on a GPU.
    assert estimate.total_bytes == pytest.approx(tensors * 1.10 + 512 * MIB, abs=8)
    assert estimate.total_bytes == sum(v for k, v in estimate.to_dict().items() if k != "total_bytes")


def test_kv_cache_and_activations_grow_linearly_with_batch_weights_do_not() -> None:
    one = estimate_memory(1e9, batch_size=1, precision="bf16")
    eight = estimate_memory(1e9, batch_size=8, precision="bf16")
    assert eight.weights_bytes == one.weights_bytes
    assert eight.kv_cache_bytes == pytest.approx(8 * one.kv_cache_bytes, abs=8)
    assert eight.activations_bytes == pytest.approx(8 * one.activations_bytes, abs=8)


def test_kv_cache_of_a_7b_model_matches_llama_2_7b() -> None:
    # Llama-2-7B keeps 2 * 32 layers * 4096 * 2 bytes = 512 KiB of fp16 KV cache per token.
    per_token = estimate_memory(7e9, precision="fp16", context_tokens=1).kv_cache_bytes
    assert per_token == pytest.approx(512 * 1024, rel=0.1)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_training_state_is_16_bytes_per_parameter_with_adam(precision: str) -> None:
    estimate = estimate_memory(1e9, precision=precision, task="training")
    state = estimate.weights_bytes + estimate.gradients_bytes + estimate.optimizer_bytes
    assert state == pytest.approx(16e9, rel=1e-9)
    assert estimate.activations_bytes > 0
    assert estimate.kv_cache_bytes == 0


def test_training_on_quantised_weights_trains_adapters_only() -> None:
    full = estimate_memory(1e9, precision="bf16", task="training")
    qlora = estimate_memory(1e9, precision="int4", task="training")
    assert qlora.gradients_bytes + qlora.optimizer_bytes == pytest.approx(0.01 * 1e9 * 14, rel=1e-9)
    assert qlora.total_bytes < full.total_bytes / 2


def test_overhead_depends_on_the_device_kind() -> None:
    on_gpu = estimate_memory(1e8, device_type=ResourceType.GPU)
    on_cpu = estimate_memory(1e8, device_type="cpu")
    on_remote = estimate_memory(1e8, device_type="remote")
    assert on_gpu.total_bytes > on_cpu.total_bytes > on_remote.total_bytes
    assert on_remote.overhead_bytes == 0
    with pytest.raises(ConfigError, match="gpu, igpu, npu, pim, cpu, remote"):
        estimate_memory(1e8, device_type="tpu")


# -------------------------------------------------------------------------------- workstation choices


def test_a_model_too_big_for_the_small_gpu_goes_to_the_big_one(workstation: Inventory) -> None:
    decision = advise_workload(workstation, 7e9, precision="fp16")
    assert decision.device == "cuda:1"
    assert decision.precision == "fp16"
    assert decision.estimated_memory_bytes is not None
    assert 14e9 < decision.estimated_memory_bytes < 79 * GIB
    small = by_id(decision, "cuda:0")
    assert small.score is None
    match = SIZE.match(small.reason)
    assert match is not None
    assert match.group(2) == "cuda:0"
    assert small.reason.endswith("7.5 GiB free")
    assert "16.1 GiB" in decision.reason
    assert "79.0 GiB free" in decision.reason


def test_batch_one_of_a_small_model_stays_on_the_cpu(workstation: Inventory) -> None:
    for strategy in ("latency", "auto"):
        decision = advise_workload(workstation, 1e6, strategy=strategy)
        assert decision.device == "cpu", decision.reason
        assert "µs per step" in decision.reason
        for gpu in ("cuda:0", "cuda:1"):
            alternative = by_id(decision, gpu)
            assert alternative.score is not None
            assert alternative.score < 1.0
            assert alternative.reason.startswith("scored ")


def test_big_batches_go_to_the_big_gpu_for_throughput(workstation: Inventory) -> None:
    decision = advise_workload(workstation, 1e9, batch_size=64, precision="fp16", strategy="throughput")
    assert decision.device == "cuda:1"
    assert "samples/s" in decision.reason
    assert decision.details["scores"]["cuda:1"] == 1.0
    assert decision.details["scores"]["cpu"] < 0.5


def test_power_never_takes_a_discrete_gpu_while_the_cpu_fits(workstation: Inventory) -> None:
    decision = advise_workload(workstation, 1e8, strategy="power")
    assert decision.device == "cpu"
    for gpu in ("cuda:0", "cuda:1"):
        assert "power strategy" in by_id(decision, gpu).reason
    assert "mJ per sample" in decision.reason or " J per sample" in decision.reason


def test_power_takes_a_gpu_when_nothing_low_power_fits() -> None:
    inventory = Inventory.of(
        [
            Resource("cpu", ResourceType.CPU, "", {"memory_bytes": 8 * GIB, "free_memory_bytes": 4 * GIB}),
            Resource(
                "cuda:0",
                ResourceType.GPU,
                "",
                {
                    "vendor": "nvidia",
                    "memory_bytes": 24 * GIB,
                    "free_memory_bytes": 23 * GIB,
                    "compute_capability": "8.9",
                },
            ),
        ]
    )
    decision = advise_workload(inventory, 3e9, precision="fp16", strategy="power")
    assert decision.device == "cuda:0"
    assert by_id(decision, "cpu").reason.startswith("needs ")


def test_training_goes_to_the_gpu_with_bf16_amp(workstation: Inventory) -> None:
    decision = advise_workload(workstation, 1e9, precision="fp32", task="training")
    assert decision.device == "cuda:1"
    assert decision.use_amp is True
    assert decision.details["amp_dtype"] == "bf16"
    assert decision.precision == "fp32"
    assert "AMP (bf16 autocast)" in decision.reason
    assert decision.details["memory"]["optimizer_bytes"] == 8_000_000_000


def test_amp_follows_the_compute_capability() -> None:
    def train_on(cc: str, precision: str):
        gpu = Resource(
            "cuda:0",
            ResourceType.GPU,
            "",
            {
                "vendor": "nvidia",
                "memory_bytes": 16 * GIB,
                "free_memory_bytes": 15 * GIB,
                "compute_capability": cc,
            },
        )
        return advise_workload(Inventory.of([gpu]), 1e8, precision=precision, task="training")

    turing = train_on("7.5", "fp32")
    assert turing.use_amp
    assert turing.details["amp_dtype"] == "fp16"
    bf16_on_turing = train_on("7.5", "bf16")
    assert not bf16_on_turing.use_amp
    assert "no native bf16 before compute capability 8.0" in bf16_on_turing.details["precision_note"]
    pascal = train_on("6.1", "fp32")
    assert not pascal.use_amp
    assert "training in fp32" in pascal.reason
    assert train_on("8.0", "fp16").details["amp_dtype"] == "fp16"
    assert not train_on("9.0", "int8").use_amp  # adapters on frozen int8 weights: no AMP flag


def test_inference_never_sets_amp_or_changes_precision(workstation: Inventory) -> None:
    decision = advise_workload(workstation, 1e6)
    assert decision.precision == "fp32"
    assert decision.use_amp is False
    hints = " ".join(decision.details["hints"])
    assert "int8 computes about 16x faster than fp32 on cpu" in hints
    assert "kept the requested fp32" in hints


# ------------------------------------------------------------------------------------------- laptop


def test_laptop_power_puts_int8_on_the_npu(laptop: Inventory) -> None:
    decision = advise_workload(laptop, 1e8, precision="int8", strategy="power")
    assert decision.device == "npu:0"
    assert "~5 W" in decision.reason
    assert "conservative NPU limit" in decision.reason


def test_laptop_fp32_cannot_use_the_npu_and_says_why(laptop: Inventory) -> None:
    decision = advise_workload(laptop, 1e8, strategy="power")
    assert decision.device == "igpu:0"
    npu = by_id(decision, "npu:0")
    assert npu.score is None
    assert "not fp32" in npu.reason
    assert "fp16 or int8" in npu.reason


def test_laptop_medium_batched_model_goes_to_the_igpu(laptop: Inventory) -> None:
    decision = advise_workload(laptop, 1e8, batch_size=32, precision="fp16")
    assert decision.device == "igpu:0"
    assert "share of host RAM" in decision.reason
    assert by_id(decision, "npu:0").reason.startswith("needs ")  # over the 2 GiB NPU limit


def test_laptop_small_single_requests_stay_on_the_cpu(laptop: Inventory) -> None:
    assert advise_workload(laptop, 1e6, precision="int8", strategy="latency").device == "cpu"


def test_training_never_goes_to_npu_pim_or_remote() -> None:
    inventory = Inventory.of(
        [
            Resource("npu:0", ResourceType.NPU, "", {"vendor": "huawei", "memory_bytes": 64 * GIB}),
            Resource("pim:0", ResourceType.PIM, "", {"memory_bytes": 64 * GIB}),
            Resource("remote:big", ResourceType.REMOTE, "", {"memory_bytes": 640 * GIB}),
        ]
    )
    with pytest.raises(CapabilityError) as caught:
        advise_workload(inventory, 1e6, precision="fp16", task="training")
    reasons = caught.value.reasons
    assert len(reasons) == 3
    assert all("inference only" in r or "inference kernels only" in r for r in reasons)
    assert "add a device that supports them" in str(caught.value)
    # The same parts take inference.
    assert advise_workload(inventory, 1e6, precision="fp16").device in {"npu:0", "pim:0", "remote:big"}


# ---------------------------------------------------------------------------------------- cpu only


def test_cpu_only_is_certain_and_has_no_alternatives(cpu_only: Inventory) -> None:
    decision = advise_workload(cpu_only, 1e9, precision="bf16")
    assert decision.device == "cpu"
    assert decision.confidence == 1.0
    assert decision.alternatives == ()
    assert "safety margin" in decision.reason
    assert decision.details["precision_note"] == "bf16 via amx_bf16"


def test_nothing_fits_raises_with_every_reason_and_a_suggestion(cpu_only: Inventory) -> None:
    with pytest.raises(CapabilityError) as caught:
        advise_workload(cpu_only, 70e9, precision="fp32", batch_size=4)
    message = str(caught.value)
    assert "70B-parameter fp32 model for inference at batch 4" in message
    assert "use precision fp16/int8/int4 or a smaller batch" in message
    assert len(caught.value.reasons) == 1
    assert SIZE.search(caught.value.reasons[0])
    with pytest.raises(CapabilityError, match="use a smaller batch"):
        advise_workload(cpu_only, 200e9, precision="int4", batch_size=4)


def test_an_empty_inventory_raises() -> None:
    with pytest.raises(CapabilityError, match="inventory is empty"):
        advise_workload(Inventory.of([]), 1e6)


# --------------------------------------------------------------------------------------------- formats


def test_onnx_prefers_devices_with_an_onnx_runtime_path(laptop: Inventory) -> None:
    plain = advise_workload(laptop, 5e8, precision="fp16")
    onnx = advise_workload(laptop, 5e8, precision="fp16", model_format="onnx")
    ratio = onnx.details["scores"]["cpu"] / onnx.details["scores"]["igpu:0"]
    expected = 1.2 * plain.details["scores"]["cpu"] / plain.details["scores"]["igpu:0"]
    assert ratio == pytest.approx(expected, rel=1e-3)  # details round scores to 4 places
    assert onnx.device == "npu:0"
    assert "through OpenVINO's NPU plugin" in onnx.reason


def test_onnx_on_the_cpu_names_the_execution_provider_and_refuses_pim() -> None:
    cpu_attributes = {"memory_bytes": 32 * GIB, "free_memory_bytes": 30 * GIB, "physical_cores": 8}
    pim_attributes = {"memory_bytes": 16 * GIB, "bandwidth_gbps": 1230}
    inventory = Inventory.of(
        [
            Resource("cpu", ResourceType.CPU, "", cpu_attributes),
            Resource("pim:0", ResourceType.PIM, "HBM-PIM", pim_attributes),
        ]
    )
    decision = advise_workload(inventory, 1e8, precision="int8", model_format=".ONNX")
    assert decision.device == "cpu"
    assert "ONNX Runtime's CPU execution provider" in decision.reason
    assert by_id(decision, "pim:0").reason == "pim:0 has no ONNX Runtime execution provider"
    assert decision.details["model_format"] == "onnx"


def test_gguf_refuses_npus(laptop: Inventory) -> None:
    decision = advise_workload(laptop, 5e8, precision="int4", model_format="gguf")
    assert "llama.cpp" in decision.reason
    assert "llama.cpp has no backend for npu:0" in by_id(decision, "npu:0").reason


def test_unknown_formats_change_nothing(workstation: Inventory) -> None:
    plain = advise_workload(workstation, 1e9, precision="fp16")
    other = advise_workload(workstation, 1e9, precision="fp16", model_format="safetensors")
    assert other.device == plain.device
    assert other.details["scores"] == plain.details["scores"]


# ---------------------------------------------------------------------------------------------- remote


def test_remote_needs_declared_capacity() -> None:
    cpu = Resource("cpu", ResourceType.CPU, "", {"memory_bytes": 8 * GIB, "free_memory_bytes": 4 * GIB})
    bare = Resource("remote:a", ResourceType.REMOTE, "", {"endpoint": "http://127.0.0.1:9/v1"})
    sized = Resource("remote:b", ResourceType.REMOTE, "", {"memory_bytes": 80 * GIB, "rtt_ms": 5})
    decision = advise_workload(Inventory.of([cpu, bare, sized]), 13e9, precision="fp16")
    assert decision.device == "remote:b"
    assert "declared capacity" in decision.reason
    assert "declares no capacity (memory_bytes)" in by_id(decision, "remote:a").reason


# -------------------------------------------------------------------------------------- input handling


@pytest.mark.parametrize(
    ("kwargs", "field", "names"),
    [
        ({"model_size": 0}, "model_size", "positive, finite"),
        ({"model_size": -5}, "model_size", "positive, finite"),
        ({"model_size": math.nan}, "model_size", "positive, finite"),
        ({"model_size": math.inf}, "model_size", "positive, finite"),
        ({"model_size": "7b"}, "model_size", "such as 7e9"),
        ({"model_size": True}, "model_size", "such as 7e9"),
        ({"batch_size": 0}, "batch_size", "integer from 1"),
        ({"batch_size": 2.5}, "batch_size", "integer from 1"),
        ({"batch_size": True}, "batch_size", "integer from 1"),
        ({"precision": "fp64"}, "precision", "fp32, fp16, bf16, fp8, int8, int4"),
        ({"precision": ["fp32"]}, "precision", "fp32, fp16, bf16, fp8, int8, int4"),
        ({"strategy": "fastest"}, "strategy", "auto, latency, throughput, power"),
        ({"task": "serving"}, "task", "inference, training"),
        ({"model_format": 3}, "model_format", "'onnx'"),
        ({"context_tokens": 0}, "context_tokens", "integer from 1"),
    ],
)
def test_bad_inputs_raise_config_errors_naming_valid_values(
    workstation: Inventory, kwargs: dict, field: str, names: str
) -> None:
    call = {"model_size": 1e6, **kwargs}
    with pytest.raises(ConfigError, match=re.escape(names)) as caught:
        advise_workload(workstation, **call)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)


def test_accepts_enums_mixed_case_and_foreign_enums(workstation: Inventory) -> None:
    class RoutingStrategy(enum.Enum):  # device-router's enum is a plain Enum of the same values
        THROUGHPUT = "throughput"

    by_enum = advise_workload(workstation, 1e9, 8, Precision.BF16, Strategy.THROUGHPUT, Task.INFERENCE)
    by_text = advise_workload(workstation, 1e9, 8, " BF16", "Throughput", "INFERENCE")
    foreign = advise_workload(workstation, 1e9, 8, "bf16", RoutingStrategy.THROUGHPUT)
    assert by_enum.to_dict() == by_text.to_dict() == foreign.to_dict()
    assert by_enum.strategy == "throughput"
    assert by_enum.precision == "bf16"


def test_decisions_are_deterministic_and_json_ready(workstation: Inventory) -> None:
    first = advise_workload(workstation, 3e9, batch_size=4, precision="fp16", model_format="onnx")
    again = advise_workload(workstation, 3e9, batch_size=4, precision="fp16", model_format="onnx")
    rebuilt = advise_workload(Inventory.of(workstation.resources), 3e9, 4, "fp16", model_format="onnx")
    assert first.to_dict() == again.to_dict() == rebuilt.to_dict()
    payload = json.loads(json.dumps(first.to_dict()))
    assert payload["device"] == first.device
    assert set(payload["details"]) >= {"scores", "memory", "usable_memory_bytes", "estimates", "hints"}
    assert 0.0 <= payload["confidence"] <= 1.0


def test_confidence_grows_with_the_margin(workstation: Inventory) -> None:
    clear = advise_workload(workstation, 7e9, precision="fp16", batch_size=16, strategy="throughput")
    close = advise_workload(workstation, 1e6, batch_size=4, strategy="throughput")
    assert clear.confidence > close.confidence >= 0.5


def test_profiles_are_computed_once_per_inventory(workstation: Inventory) -> None:
    assert profile_inventory(workstation) is profile_inventory(workstation)
    assert profile_inventory(Inventory.of(workstation.resources)) is not profile_inventory(workstation)


def test_the_profile_cache_does_not_keep_inventories_alive() -> None:
    inventory = Inventory.of([Resource("cpu", ResourceType.CPU, "", {"memory_bytes": 8 * GIB})])
    advise_workload(inventory, 1e6)
    ref = weakref.ref(inventory)
    del inventory
    gc.collect()
    assert ref() is None


def test_advising_is_fast(workstation: Inventory) -> None:
    # The budget is 20 µs per call; this guard is loose so that a busy machine cannot fail it.
    advise_workload(workstation, 7e9, precision="fp16")
    best = min(
        timeit.repeat(lambda: advise_workload(workstation, 7e9, precision="fp16"), number=200, repeat=5)
    )
    assert best / 200 < 200e-6
