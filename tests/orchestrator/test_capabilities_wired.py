"""Capabilities, needs and affinity reach placement and worker choice in the server: a backend that
cannot serve a deployment's task or precision fails start-up with its reason; a prompt goes only to
workers whose context can hold it (a prompt no worker can hold is a 400); a session sticks to a worker."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest

from xpuflow.backends.base import GenerationParams
from xpuflow.config import DeploymentConfig, parse_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.engine import InferenceCall
from xpuflow.errors import CapabilityError, ConfigError
from xpuflow.orchestrator import Orchestrator
from xpuflow.policy.placement import capability_problems
from xpuflow.scheduling.request import RequestKind
from xpuflow.types import Capability, Resource, ResourceType

INVENTORY = Inventory.of([Resource("cpu", ResourceType.CPU, "cpu", {"memory_bytes": 8 << 30})])


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def call(text: str = "hi", session: str | None = None) -> InferenceCall:
    return InferenceCall(
        "chat",
        RequestKind.CHAT,
        [{"role": "user", "content": text}],
        GenerationParams(max_tokens=2),
        session_key=session,
    )


def test_capability_problems_refuse_the_task_and_precision_and_note_the_clamps() -> None:
    dep = DeploymentConfig(name="d", backend="x", task="chat", precision="fp16", max_seq_len=4096)
    capability = Capability(
        max_batch_size=1,
        max_seq_len=512,
        supports_embeddings=True,
        dtypes=("fp32",),
        unsupported={"chat": "the backend serves encoder embeddings only"},
    )
    problems, notes = capability_problems(dep, capability)
    assert problems == [
        "task chat: the backend serves encoder embeddings only",
        "precision fp16: the backend runs fp32 here; set precision to one of them",
    ]
    assert notes == [
        "context 512 tokens (the backend's limit; max_seq_len asks 4096)",
        "batches of at most 1 (the backend's limit; max_batch_size asks 8)",
    ]


def test_start_fails_naming_what_the_backend_cannot_do() -> None:
    config = parse_config(
        {"deployments": [{"name": "d", "backend": "fake", "device": "cpu", "precision": "int8"}]}
    )

    async def go() -> None:
        async with Orchestrator(config, inventory=INVENTORY):
            pass

    with pytest.raises(CapabilityError, match="precision int8: the backend runs fp32 here"):
        run(go())


def two_contexts() -> Any:
    deployments = [
        {"name": "short", "backend": "fake", "device": "cpu", "max_seq_len": 512},
        {"name": "long", "backend": "fake", "device": "cpu", "max_seq_len": 8192},
    ]
    tier = {"name": "default", "deployments": ["short", "long"]}
    return parse_config({"deployments": deployments, "models": [{"name": "chat", "tiers": [tier]}]})


def test_a_long_prompt_goes_only_to_workers_whose_context_holds_it() -> None:
    async def go() -> None:
        async with Orchestrator(two_contexts(), inventory=INVENTORY) as orch:
            long_prompt = "word " * 1200  # 6,000 characters: at least 1,000 tokens
            for _ in range(10):
                result = await orch.complete(call(long_prompt))
                assert result.decision.worker == "long/0"
            refused = [a.reason for a in result.decision.alternatives if a.candidate == "short/0"]
            assert refused
            assert "max_seq_len is 512" in refused[0]
            served = collections.Counter([(await orch.complete(call())).decision.worker for _ in range(20)])
            assert "short/0" in served  # a short prompt may go to the short-context worker
            with pytest.raises(ConfigError, match="more than the context of every worker") as info:
                await orch.complete(call("word " * 12000))
            assert info.value.field == "messages"

    run(go())


def _favourite(decision: Any) -> str:
    """The worker whose score carries the session's affinity bonus (chosen or not)."""
    lines = [(decision.worker, decision.reason)] + [(a.candidate, a.reason) for a in decision.alternatives]
    marked = {worker for worker, reason in lines if "affinity 1.00" in reason}
    assert len(marked) == 1, lines
    return marked.pop()


def test_a_session_has_one_favourite_worker_that_takes_most_of_its_requests() -> None:
    options = {"service_time_s": 0.005}
    deployment = {"name": "chat", "backend": "fake", "device": "cpu", "replicas": 4, "options": options}
    config = parse_config({"deployments": [deployment]})

    async def go() -> None:
        async with Orchestrator(config, inventory=INVENTORY) as orch:
            favourites = set()
            for session in ("alice", "bob", "carol", "dave"):
                decisions = [(await orch.complete(call(session=session))).decision for _ in range(30)]
                marked = {_favourite(d) for d in decisions}
                assert len(marked) == 1  # rendezvous hashing: the same favourite every time
                favourite = marked.pop()
                favourites.add(favourite)
                # a bonus, not a monopoly: a busy favourite still loses some requests to idle workers
                served = collections.Counter(d.worker for d in decisions)
                assert served.most_common(1)[0][0] == favourite, (session, served)
            assert len(favourites) >= 2  # sessions hash to different workers
            plain = (await orch.complete(call())).decision
            assert "affinity" not in plain.reason

    run(go())


def test_the_gateway_takes_the_session_from_the_header_or_the_openai_user_field() -> None:
    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover
        import httpx  # type: ignore[no-redef]

    from xpuflow.serving.app import create_app

    config = parse_config(
        {"deployments": [{"name": "chat", "backend": "fake", "device": "cpu", "replicas": 2}]}
    )

    async def go() -> None:
        async with Orchestrator(config, inventory=INVENTORY) as orch:
            transport = httpx.ASGITransport(app=create_app(orch))
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                by_user = [
                    await client.post("/v1/chat/completions", json={**body, "user": "alice"})
                    for _ in range(6)
                ]
                by_header = [
                    await client.post(
                        "/v1/chat/completions", json=body, headers={"x-xpuflow-session": "alice"}
                    )
                    for _ in range(6)
                ]
                plain = await client.post("/v1/chat/completions", json=body)
                bad = await client.post("/v1/chat/completions", json={**body, "user": 42})
            for answers in (by_user, by_header):
                assert all(r.status_code == 200 for r in answers)
                # the chosen worker's reason names the bonus whenever the favourite was chosen
                assert any("affinity 1.00" in r.headers["x-xpuflow-route-reason"] for r in answers)
            assert plain.status_code == 200
            assert "affinity" not in plain.headers["x-xpuflow-route-reason"]
            assert bad.status_code == 422
            assert bad.json()["error"]["param"] == "user"

    run(go())
