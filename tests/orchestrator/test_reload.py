"""/admin/reload applies the difference between the running config and the file: no request fails."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml

from xpuflow.backends.base import GenerationParams
from xpuflow.config import load_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.engine import InferenceCall
from xpuflow.orchestrator import Orchestrator
from xpuflow.scheduling.request import RequestKind
from xpuflow.types import Resource, ResourceType

INVENTORY = Inventory.of([Resource("cpu", ResourceType.CPU, "cpu", {"memory_bytes": 8 << 30})])


def deployment(name: str, service_time_s: float = 0.005, replicas: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "fake",
        "device": "cpu",
        "replicas": replicas,
        "options": {"service_time_s": service_time_s},
    }


def write(path: Path, deployments: list[dict[str, Any]]) -> None:
    names = [d["name"] for d in deployments]
    model = {"name": "chat", "tiers": [{"name": "default", "deployments": names}]}
    path.write_text(yaml.safe_dump({"deployments": deployments, "models": [model]}))


def call() -> InferenceCall:
    return InferenceCall(
        model="chat",
        kind=RequestKind.COMPLETION,
        payload="one two three",
        params=GenerationParams(max_tokens=8),
    )


async def _client(
    orch: Orchestrator, stop: asyncio.Event, errors: list[BaseException], served: list[str]
) -> None:
    while not stop.is_set():
        try:
            if len(served) % 5 == 4:
                async for event in orch.stream(call()):
                    assert event.error is None, event.error
                served.append("stream")
            else:
                done = await orch.complete(call())
                served.append(done.decision.worker or "")
        except Exception as exc:  # what the test is about: never
            errors.append(exc)
            await asyncio.sleep(0.001)


def test_reload_keeps_unchanged_workers_starts_new_ones_first_and_loses_no_request(tmp_path: Path) -> None:
    path = tmp_path / "xpuflow.yaml"
    write(path, [deployment("a", replicas=2), deployment("b")])

    async def scenario() -> tuple[list[dict[str, Any]], list[BaseException], list[str], dict[str, Any]]:
        orch = Orchestrator(load_config(path), config_path=path, inventory=INVENTORY)
        async with orch:
            stop, errors, served = asyncio.Event(), [], []
            clients = [asyncio.ensure_future(_client(orch, stop, errors, served)) for _ in range(8)]
            summaries = []
            await asyncio.sleep(0.2)
            before = dict(orch.workers)

            summaries.append(dict(await orch.reload()))  # the same file: nothing moves
            assert all(orch.workers[w] is before[w] for w in before)
            await asyncio.sleep(0.2)

            write(path, [deployment("a", replicas=2), deployment("b", service_time_s=0.002)])
            summaries.append(dict(await orch.reload()))  # b changed: new b workers, a's stay
            assert orch.workers["a/0"] is before["a/0"]
            assert orch.workers["b/0"] is not before["b/0"]
            assert not before["b/0"].running  # drained and stopped
            await asyncio.sleep(0.2)

            write(path, [deployment("a", replicas=2), deployment("c")])
            summaries.append(dict(await orch.reload()))  # b removed, c added
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*clients)
            status = {"workers": sorted(orch.workers), "models": [m.tiers for m in orch.models()]}
            return summaries, errors, served, status

    summaries, errors, served, status = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert errors == []
    assert len(served) > 100
    assert summaries[0] == {"added": [], "changed": [], "removed": [], "kept": ["a", "b"]}
    assert summaries[1] == {"added": [], "changed": ["b"], "removed": [], "kept": ["a"]}
    assert summaries[2] == {"added": ["c"], "changed": [], "removed": ["b"], "kept": ["a"]}
    assert status["workers"] == ["a/0", "a/1", "c/0"]
    assert {"c/0", "a/0"} <= set(served)


def test_a_reload_whose_new_deployment_fails_to_start_keeps_the_running_ones(tmp_path: Path) -> None:
    path = tmp_path / "xpuflow.yaml"
    write(path, [deployment("a")])

    async def scenario() -> tuple[str, list[str]]:
        async with Orchestrator(load_config(path), config_path=path, inventory=INVENTORY) as orch:
            bad = deployment("b")
            bad["device"] = "npu:7"  # not here: placement fails
            write(path, [deployment("a"), bad])
            try:
                await orch.reload()
            except Exception as exc:
                error = str(exc)
            else:
                error = ""
            done = await orch.complete(call())
            return error, [done.decision.worker or "", *sorted(orch.workers)]

    error, state = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert "npu:7" in error
    assert state == ["a/0", "a/0"]
