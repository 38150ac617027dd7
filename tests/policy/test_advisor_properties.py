"""Properties of the advisor over random inventories and workloads (hypothesis)."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xpuflow.discovery.inventory import Inventory
from xpuflow.errors import CapabilityError, ConfigError
from xpuflow.policy import VALID_PRECISIONS, VALID_STRATEGIES, VALID_TASKS, advise_workload
from xpuflow.policy.device_model import NPU_DEFAULT_MEMORY_BYTES
from xpuflow.types import Resource, ResourceType, RoutingDecision

GIB = 1 << 30
LOW_POWER = {ResourceType.CPU, ResourceType.IGPU, ResourceType.NPU, ResourceType.PIM}
ISA = [
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
    "neon",
    "dotprod",
    "i8mm",
]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def resources(draw: st.DrawFn, index: int) -> Resource:
    kind = draw(st.sampled_from(list(ResourceType)))
    attributes: dict[str, object] = {}
    total = draw(st.one_of(st.none(), st.integers(64 << 20, 1024 * GIB)))
    if total is not None:
        attributes["memory_bytes"] = total
        attributes["free_memory_bytes"] = draw(st.integers(0, total))
    if kind is ResourceType.CPU:
        attributes["physical_cores"] = draw(st.integers(1, 128))
        attributes["frequency_mhz"] = draw(st.floats(800, 5500))
        attributes["isa_features"] = tuple(draw(st.lists(st.sampled_from(ISA), unique=True, max_size=6)))
    elif kind is ResourceType.GPU:
        attributes["vendor"] = draw(st.sampled_from(["nvidia", "amd", "intel"]))
        attributes["compute_capability"] = draw(
            st.sampled_from([None, "6.1", "7.0", "7.5", "8.0", "8.6", "8.9", "9.0"])
        )
        attributes["utilization_pct"] = draw(st.integers(0, 100))
    elif kind in (ResourceType.NPU, ResourceType.IGPU):
        attributes["vendor"] = draw(
            st.sampled_from(["intel", "amd", "rebellions", "furiosa", "huawei", "unknown"])
        )
    elif kind is ResourceType.REMOTE:
        attributes["rtt_ms"] = draw(st.floats(0.1, 200))
    return Resource(f"{kind.value}:{index}", kind, "", attributes)


@st.composite
def inventories(draw: st.DrawFn) -> Inventory:
    count = draw(st.integers(1, 5))
    return Inventory.of([draw(resources(i)) for i in range(count)])


workloads = st.fixed_dictionaries(
    {
        "model_size": st.floats(1e3, 2e11),
        "batch_size": st.integers(1, 256),
        "precision": st.sampled_from(VALID_PRECISIONS),
        "strategy": st.sampled_from(VALID_STRATEGIES),
        "task": st.sampled_from(VALID_TASKS),
        "model_format": st.sampled_from([None, "onnx", "gguf", "safetensors"]),
    }
)


def memory_limit(inventory: Inventory, resource: Resource) -> int:
    """The most memory the resource can offer, from the raw attributes, independent of the advisor."""
    free = resource.attributes.get("free_memory_bytes", resource.attributes.get("memory_bytes"))
    if free is not None:
        return int(free)
    cpu = inventory.cpu
    host = cpu.free_memory_bytes if cpu is not None else None
    if resource.type is ResourceType.NPU:
        return min(NPU_DEFAULT_MEMORY_BYTES, host) if host is not None else NPU_DEFAULT_MEMORY_BYTES
    assert resource.type is ResourceType.IGPU
    assert host is not None
    return host


def advise_or_error(inventory: Inventory, workload: dict) -> RoutingDecision | CapabilityError:
    try:
        return advise_workload(inventory, **workload)
    except CapabilityError as error:
        return error


@SETTINGS
@given(inventory=inventories(), workload=workloads)
def test_the_choice_fits_and_every_candidate_has_a_reason(inventory: Inventory, workload: dict) -> None:
    ids = [r.id for r in inventory.resources]
    decision = advise_or_error(inventory, workload)
    if isinstance(decision, CapabilityError):
        assert len(decision.reasons) == len(ids)
        assert all(reason.strip() for reason in decision.reasons)
        assert str(decision).strip()
        return
    chosen = inventory.get(decision.device)
    assert chosen is not None
    assert decision.estimated_memory_bytes is not None
    assert 0 < decision.estimated_memory_bytes <= memory_limit(inventory, chosen)
    assert decision.estimated_memory_bytes <= decision.details["usable_memory_bytes"][decision.device]
    assert decision.reason.strip()
    assert decision.reason.startswith(decision.device)
    assert sorted(a.candidate for a in decision.alternatives) == sorted(
        i for i in ids if i != decision.device
    )
    assert all(a.reason.strip() for a in decision.alternatives)
    assert 0.0 <= decision.confidence <= 1.0
    assert decision.precision == workload["precision"]
    assert decision.strategy == workload["strategy"]
    if workload["task"] == "training":
        assert chosen.type not in (ResourceType.NPU, ResourceType.PIM, ResourceType.REMOTE)
    else:
        assert decision.use_amp is False


@SETTINGS
@given(inventory=inventories(), workload=workloads)
def test_power_never_picks_a_discrete_gpu_when_a_low_power_device_fits(
    inventory: Inventory, workload: dict
) -> None:
    try:
        decision = advise_workload(inventory, **{**workload, "strategy": "power"})
    except CapabilityError:
        return
    chosen = inventory.get(decision.device)
    assert chosen is not None
    if chosen.type not in LOW_POWER:
        for alternative in decision.alternatives:
            resource = inventory.get(alternative.candidate)
            assert resource is not None
            if resource.type in LOW_POWER:
                assert alternative.score is None, alternative  # refused, not merely outscored


@SETTINGS
@given(
    inventory=inventories(),
    model_size=st.floats(1e3, 1e9),
    batch_size=st.integers(1, 8),
    precision=st.sampled_from(VALID_PRECISIONS),
    task=st.sampled_from(VALID_TASKS),
)
def test_power_stays_off_gpus_next_to_a_roomy_cpu(
    inventory: Inventory, model_size: float, batch_size: int, precision: str, task: str
) -> None:
    cpu = Resource("cpu", ResourceType.CPU, "", {"memory_bytes": 2048 * GIB, "free_memory_bytes": 2000 * GIB})
    roomy = Inventory.of([*inventory.resources, cpu])
    decision = advise_workload(roomy, model_size, batch_size, precision, "power", task)
    chosen = roomy.get(decision.device)
    assert chosen is not None
    assert chosen.type in LOW_POWER


@SETTINGS
@given(inventory=inventories(), workload=workloads)
def test_the_same_inventory_and_inputs_give_the_same_decision(inventory: Inventory, workload: dict) -> None:
    def outcome(inv: Inventory) -> object:
        try:
            return advise_workload(inv, **workload).to_dict()
        except CapabilityError as error:
            return str(error), error.reasons

    first = outcome(inventory)
    assert outcome(inventory) == first
    assert outcome(Inventory.of(inventory.resources)) == first


def _is_valid(text: str, valid: tuple[str, ...]) -> bool:
    return text.strip().lower() in valid


@settings(max_examples=40, deadline=None)
@given(
    field=st.sampled_from(["precision", "strategy", "task"]),
    value=st.one_of(st.text(max_size=12), st.integers(), st.none(), st.floats(allow_nan=False)),
)
def test_unknown_names_raise_config_errors_naming_the_valid_values(field: str, value: object) -> None:
    valid = {"precision": VALID_PRECISIONS, "strategy": VALID_STRATEGIES, "task": VALID_TASKS}[field]
    if isinstance(value, str) and _is_valid(value, valid):
        return
    inventory = Inventory.of([Resource("cpu", ResourceType.CPU, "", {"memory_bytes": 64 * GIB})])
    with pytest.raises(ConfigError, match=re.escape(", ".join(valid))) as caught:
        advise_workload(inventory, 1e6, **{field: value})
    assert caught.value.field == field


@settings(max_examples=40, deadline=None)
@given(
    model_size=st.one_of(st.floats(max_value=0), st.just(math.nan), st.just(math.inf), st.just(-math.inf)),
    batch_size=st.integers(max_value=0),
)
def test_bad_sizes_raise_config_errors(model_size: float, batch_size: int) -> None:
    inventory = Inventory.of([Resource("cpu", ResourceType.CPU, "", {"memory_bytes": 64 * GIB})])
    with pytest.raises(ConfigError, match="positive, finite") as caught:
        advise_workload(inventory, model_size)
    assert caught.value.field == "model_size"
    with pytest.raises(ConfigError, match="integer from 1") as caught:
        advise_workload(inventory, 1e6, batch_size)
    assert caught.value.field == "batch_size"
