"""Device partitions through the orchestrator, over the fake backend: two deployments on one device
with compute shares 0.75 / 0.25, both saturated, split the device's work by those shares; the config's
partition section is validated with messages that say what is wrong."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from xpuflow.backends.base import GenerationParams
from xpuflow.config import parse_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.engine import InferenceCall
from xpuflow.errors import ConfigError
from xpuflow.orchestrator import Orchestrator
from xpuflow.scheduling.request import RequestKind
from xpuflow.types import Resource, ResourceType

GIB = 1 << 30
INVENTORY = Inventory.of(
    [Resource("cpu", ResourceType.CPU, "cpu", {"memory_bytes": 16 * GIB, "logical_cores": 4})]
)
SERVICE_TIME_S = 0.015
LOAD_S = 1.2


def partition_config(partitions: list[dict[str, Any]] | None = None, **qos: Any) -> Any:
    fast = {"service_time_s": SERVICE_TIME_S}
    return parse_config(
        {
            "deployments": [
                {"name": "chat", "backend": "fake", "device": "cpu", "max_batch_size": 1, "options": fast},
                {"name": "batch", "backend": "fake", "device": "cpu", "max_batch_size": 1, "options": fast},
            ],
            "qos": {
                "partitions": partitions
                if partitions is not None
                else [
                    {"name": "interactive", "compute_share": 0.75, "memory_gb": 4, "deployments": ["chat"]},
                    {"name": "bulk", "compute_share": 0.25, "memory_gb": 2, "deployments": ["batch"]},
                ],
                **qos,
            },
        }
    )


def chat(model: str) -> InferenceCall:
    return InferenceCall(
        model=model,
        kind=RequestKind.CHAT,
        payload=[{"role": "user", "content": "one two three"}],
        params=GenerationParams(max_tokens=4),
    )


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


async def saturate(orch: Orchestrator, models: list[str], seconds: float, clients: int = 4) -> dict[str, int]:
    """Keep ``clients`` requests outstanding per model for ``seconds``; completed requests per model."""
    done = dict.fromkeys(models, 0)
    stop_at = time.monotonic() + seconds

    async def client(model: str) -> None:
        while time.monotonic() < stop_at:
            await orch.complete(chat(model))
            done[model] += 1

    await asyncio.gather(*(client(m) for m in models for _ in range(clients)))
    return done


def test_saturated_partitions_split_the_device_by_compute_share() -> None:
    async def go() -> None:
        async with Orchestrator(partition_config(), inventory=INVENTORY) as orch:
            done = await saturate(orch, ["chat", "batch"], LOAD_S)
            total = done["chat"] + done["batch"]
            assert total >= 20, done  # enough work to measure a split
            assert done["chat"] / total == pytest.approx(0.75, abs=0.1), done
            rows = {r["name"]: r for r in orch.status()["partitions"]}
            assert rows["interactive"]["compute_share"] == 0.75
            assert rows["interactive"]["busy_share"] == pytest.approx(0.75, abs=0.1), rows
            assert rows["bulk"]["busy_share"] == pytest.approx(0.25, abs=0.1), rows
            assert rows["interactive"]["granted"] + rows["bulk"]["granted"] >= total
            assert rows["interactive"]["tokens_in_use"] == rows["bulk"]["tokens_in_use"] == 0
            assert rows["bulk"]["device_tokens"] == 1
            assert rows["bulk"]["memory_gb"] == 2

    run(go())


def test_an_idle_partition_leaves_its_share_to_the_others() -> None:
    async def go() -> None:
        async with Orchestrator(partition_config(), inventory=INVENTORY) as orch:
            done = await saturate(orch, ["batch"], 0.4)
            # alone, the 0.25 partition is not held to a quarter of the device (about 26 at full speed)
            assert done["batch"] >= 12, done

    run(go())


def test_unpartitioned_deployments_are_not_gated() -> None:
    config = partition_config([{"name": "bulk", "compute_share": 0.25, "deployments": ["batch"]}])

    async def go() -> None:
        async with Orchestrator(config, inventory=INVENTORY) as orch:
            assert [r["name"] for r in orch.status()["partitions"]] == ["bulk"]
            done = await saturate(orch, ["chat"], 0.2, clients=2)
            assert done["chat"] >= 4
            assert orch.status()["partitions"][0]["granted"] == 0

    run(go())


def test_config_validates_partitions() -> None:
    def part(name: str, share: float, *deps: str, **kw: Any) -> dict[str, Any]:
        return {"name": name, "compute_share": share, "deployments": list(deps), **kw}

    with pytest.raises(ConfigError, match="partition name 'a' appears twice"):
        partition_config([part("a", 0.5, "chat"), part("a", 0.2, "batch")])
    with pytest.raises(ConfigError, match=r"partitions on 'cpu' add up to 1\.20"):
        partition_config([part("a", 0.6, "chat"), part("b", 0.6, "batch")])
    with pytest.raises(ConfigError, match="compute_share"):
        partition_config([part("a", 0.0, "chat")])
    with pytest.raises(ConfigError, match="compute_share"):
        partition_config([part("a", 1.5, "chat")])
    with pytest.raises(ConfigError, match="names deployment 'nope', which is not defined"):
        partition_config([part("a", 0.5, "nope")])
    with pytest.raises(ConfigError, match="'chat' is in partitions 'a' and 'b'"):
        partition_config([part("a", 0.5, "chat"), part("b", 0.5, "chat")])
    with pytest.raises(ConfigError, match="compute_tokens"):
        partition_config(compute_tokens=0)
    # shares on different devices are checked per device
    partition_config([part("a", 0.8, "chat"), part("b", 0.8, "batch", device="cuda:0")])


def test_start_checks_partition_devices_and_memory() -> None:
    def part(name: str, *deps: str, **kw: Any) -> dict[str, Any]:
        return {"name": name, "compute_share": 0.5, "deployments": list(deps), **kw}

    cases = [
        ([part("a", "chat", device="cuda:0")], "names device 'cuda:0', which is not here; devices: cpu"),
        ([part("a", "chat", memory_gb=10), part("b", "batch", memory_gb=10)], "add up to 20.00 GiB"),
    ]
    for partitions, message in cases:
        with pytest.raises(ConfigError, match=message):
            run(Orchestrator(partition_config(partitions), inventory=INVENTORY).start())
    inventory = Inventory.of(
        [*INVENTORY.resources, Resource("cuda:0", ResourceType.GPU, "gpu", {"memory_bytes": 8 * GIB})]
    )
    mismatched = partition_config([part("a", "chat", device="cuda:0")])
    with pytest.raises(ConfigError, match="runs on 'cpu' but its partition 'a' is on 'cuda:0'"):
        run(Orchestrator(mismatched, inventory=inventory).start())
