"""xpuflow on a real three-raylet Ray cluster on loopback (run inside a network namespace by
tests/cluster/test_live.py; skipped when run directly outside one).

One cluster for the module: head (no CPUs: the gateway's node), nodes a and b (one CPU each, labelled).
The orchestrator places a two-replica deployment of the sleep-based fake backend, one replica per node.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("XPUFLOW_IN_NETNS") != "1":
    pytest.skip(
        "runs inside a network namespace (tests/cluster/test_cluster_live.py)", allow_module_level=True
    )

ray = pytest.importorskip("ray")

from xpuflow.backends.base import GenerationParams  # noqa: E402
from xpuflow.cluster.connection import FAST_FAILURE_ENV  # noqa: E402
from xpuflow.cluster.inventory import ClusterInventory  # noqa: E402
from xpuflow.config import parse_config  # noqa: E402
from xpuflow.engine import InferenceCall  # noqa: E402
from xpuflow.errors import CapabilityError, ConfigError  # noqa: E402
from xpuflow.orchestrator import Orchestrator  # noqa: E402
from xpuflow.scheduling.request import Priority, RequestKind  # noqa: E402
from xpuflow.testing.ray_cluster import LocalRayCluster  # noqa: E402
from xpuflow.testing.serve_process import serve_process  # noqa: E402

BASE_PORT = 24000


def _config(
    deployments: list[dict[str, Any]], models: list[dict[str, Any]] | None = None, **cluster: Any
) -> Any:
    return parse_config(
        {
            "cluster": {"address": f"127.0.0.1:{BASE_PORT}", "refresh_interval_s": 1.0, **cluster},
            "deployments": deployments,
            "models": models or [],
        }
    )


def _fake(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "fake",
        "device": "cpu",
        "max_batch_size": 4,
        "batching": {"max_wait_ms": 2},
        "options": {"service_time_s": 0.05},
        **extra,
    }


class Live:
    def __init__(self, cluster: LocalRayCluster, loop: asyncio.AbstractEventLoop, orch: Orchestrator) -> None:
        self.cluster, self.loop, self.orch = cluster, loop, orch

    def run(self, coro: Any, timeout_s: float = 60.0) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout_s))


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    temp = Path(f"/tmp/xfr{os.getpid()}")
    cluster = LocalRayCluster(temp, base_port=BASE_PORT)
    loop = asyncio.new_event_loop()
    try:
        cluster.start_head(num_cpus=0)
        cluster.add_node("a", num_cpus=1, labels={"xpuflow-node": "a", "zone": "one"})
        cluster.add_node("b", num_cpus=1, labels={"xpuflow-node": "b", "zone": "two"})
        os.environ.setdefault(FAST_FAILURE_ENV, "0")  # as cluster.connection.connect does
        ray.init(address=cluster.address, namespace="xpuflow-test", log_to_driver=False)
        orch = Orchestrator(_config([_fake("chat", replicas=2)]))
        loop.run_until_complete(orch.start())
        yield Live(cluster, loop, orch)
        loop.run_until_complete(asyncio.wait_for(orch.stop(), 90.0))
    finally:
        ray.shutdown()
        cluster.stop()
        loop.close()
        shutil.rmtree(temp, ignore_errors=True)  # Ray's session logs and sockets


def _call(model: str = "chat", text: str = "one two three", **kw: Any) -> InferenceCall:
    return InferenceCall(
        model,
        RequestKind.CHAT,
        [{"role": "user", "content": text}],
        GenerationParams(max_tokens=16),
        timeout_s=30.0,
        **kw,
    )


def test_inventory_has_every_node_with_its_devices(live: Live) -> None:
    inventory = ClusterInventory.detect()
    names = sorted(n.name for n in inventory.alive)
    assert names == ["127.0.0.1", "a", "b"] or names == sorted(["a", "b", inventory.nodes[0].name])
    for node in inventory.alive:
        cpu = next(r for r in node.resources if r.attributes.get("local_id") == "cpu")
        assert cpu.id == f"cpu@{node.name}"
        assert cpu.attributes["node_id"] == node.node_id
        assert cpu.attributes["node_ip"] == "127.0.0.1"
        assert node.inventory is not None
        assert node.inventory.reports  # each probe's reason is there


def test_replicas_spread_across_nodes_and_status_names_them(live: Live) -> None:
    status = live.orch.status()
    nodes = sorted(w["node"] for w in status["workers"])
    assert nodes == ["a", "b"]
    assert sorted(w["device"] for w in status["workers"]) == ["cpu@a", "cpu@b"]
    assert "replicas on a, b" in status["placements"]["chat"]["reason"]


def test_requests_and_streams_run_on_remote_workers(live: Live) -> None:
    async def go() -> None:
        results = await asyncio.gather(*(live.orch.complete(_call(text=f"w{i} x")) for i in range(12)))
        assert all(r.completion is not None and r.completion.text == f"x w{i}" for i, r in enumerate(results))
        assert {r.decision.worker for r in results} == {"chat/0", "chat/1"}
        # 12 requests on two workers of batch 4 at 50 ms: some waited a batch in a remote queue
        assert max(r.queue_ms for r in results) >= 20.0, [r.queue_ms for r in results]
        events = [e async for e in live.orch.stream(_call(text="a b c d"))]
        assert events[0].decision is not None
        assert (events[0].decision.device or "").startswith("cpu@")
        text = "".join(e.chunk.text for e in events if e.chunk is not None)
        assert text == "d c b a"
        assert not any(e.error for e in events)

    live.run(go())
    counts = [
        w["metrics"].get("requests_total", w["metrics"].get("completed", 0))
        for w in live.orch.status()["workers"]
    ]
    assert counts  # metrics come back from the remote workers


def test_admin_drain_takes_a_remote_worker_out_of_routing(live: Live) -> None:
    async def go() -> None:
        await live.orch.drain("chat/0")
        await asyncio.sleep(0.6)  # the actor's snapshot says draining at the next read
        drained = await asyncio.gather(*(live.orch.complete(_call()) for _ in range(8)))
        assert {r.decision.worker for r in drained} == {"chat/1"}
        await live.orch.undrain("chat/0")
        await asyncio.sleep(0.6)
        assert not live.orch.workers["chat/0"].snapshot().draining

    live.run(go())


@pytest.mark.parametrize("transport", ["direct", "ray"])
def test_a_client_that_goes_away_withdraws_the_remote_request(live: Live, transport: str) -> None:
    """Both transports: requests over the worker's channel (default) or as Ray actor calls."""

    async def go() -> None:
        orch = Orchestrator(
            _config(
                [_fake("slow", node="a", max_batch_size=1, options={"service_time_s": 1.5})],
                worker_num_cpus=0,
                transport=transport,
            )
        )
        await orch.start()
        try:
            worker = orch.workers["slow/0"]
            assert getattr(worker, "node", None) == "a"
            assert (getattr(worker, "channel", None) is not None) == (transport == "direct")
            first = asyncio.ensure_future(orch.complete(_call("slow")))
            await asyncio.sleep(0.3)
            second = asyncio.ensure_future(orch.complete(_call("slow")))
            for _ in range(40):
                await asyncio.sleep(0.05)
                if worker.metrics.to_dict().get("queue_depth", 0) or worker.snapshot().queue_depth:
                    break
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
            started = time.monotonic()
            while time.monotonic() - started < 1.0:
                state = await worker.actor.state.remote()  # type: ignore[attr-defined]
                if state["snapshot"].queue_depth == 0:
                    break
                await asyncio.sleep(0.05)
            assert state["snapshot"].queue_depth == 0, "the cancelled request still waits on the worker"
            assert not first.done()  # withdrawn before the running one finished
            assert (await first).completion is not None
            events = [e async for e in orch.stream(_call("slow", "p q"))]
            assert "".join(e.chunk.text for e in events if e.chunk is not None) == "q p"
        finally:
            await orch.stop()

    live.run(go())


class _ConstantScorer:
    """Complexity by keyword, as the one-machine orchestrator tests score it."""

    def score(self, prompt: str) -> float:
        return 0.9 if "prove" in prompt.lower() else 0.1


def test_tier_rules_priority_and_retries_behave_as_on_one_machine(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The orchestrator's own behaviours, unchanged with remote workers: a complexity rule picks the
    tier (and so the node), a high-priority request overtakes queued low ones on the remote worker's
    queue, and a worker's failure is retried on another worker with nothing lost."""
    monkeypatch.setattr("xpuflow.routing.adaptive._default_scorer", _ConstantScorer)
    tiered = {
        "name": "tiered",
        "tiers": [
            {"name": "tier_high", "deployments": ["big"]},
            {"name": "tier_low", "deployments": ["small"]},
        ],
        "routing": {"complexity_threshold": 0.5, "vram_source": "none"},
    }
    config = _config(
        [
            _fake("big", node="a", max_batch_size=1, options={"service_time_s": 0.25}),
            _fake("small", node="b", options={"service_time_s": 0.01}),
            _fake("flaky", replicas=2, options={"service_time_s": 0.01, "fail_next": 1}),
        ],
        [tiered, {"name": "flaky", "tiers": [{"name": "default", "deployments": ["flaky"]}]}],
        worker_num_cpus=0,
    )

    async def go() -> None:
        orch = Orchestrator(config)
        await orch.start()
        try:
            hard = await orch.complete(_call("tiered", "Prove that sqrt(2) is irrational"))
            easy = await orch.complete(_call("tiered", "hi there"))
            assert (hard.decision.tier, hard.decision.device) == ("tier_high", "cpu@a")
            assert (easy.decision.tier, easy.decision.device) == ("tier_low", "cpu@b")

            finished: list[str] = []

            async def timed(name: str, priority: Priority) -> None:
                call = _call("tiered", f"{name} x", priority=priority, tier_override="tier_high")
                await orch.complete(call)
                finished.append(name)

            running = [asyncio.ensure_future(timed("first", Priority.NORMAL))]
            await asyncio.sleep(0.1)  # "first" runs; what follows waits in the remote worker's queue
            running += [asyncio.ensure_future(timed(f"low{i}", Priority.LOW)) for i in range(2)]
            await asyncio.sleep(0.05)
            running.append(asyncio.ensure_future(timed("high", Priority.HIGH)))
            await asyncio.gather(*running)
            assert finished[:2] == ["first", "high"], finished

            results = await asyncio.gather(*(orch.complete(_call("flaky", f"f{i} z")) for i in range(6)))
            assert all(
                r.completion is not None and r.completion.text == f"z f{i}" for i, r in enumerate(results)
            )
            retried = [r for r in results if r.decision.details.get("attempts", 0) > 1]
            assert retried, [r.decision.reason for r in results]
            assert "failed attempt" in retried[0].decision.reason
            failed_on = retried[0].decision.alternatives[0].candidate
            assert failed_on.startswith("flaky/")
            assert failed_on != retried[0].decision.worker
        finally:
            await orch.stop()

    live.run(go(), timeout_s=90)


def test_qos_partitions_split_a_remote_device_by_compute_share(live: Live) -> None:
    """Two deployments on node a's CPU in partitions of 0.75 and 0.25, one compute token: their worker
    actors are separate processes that share the device's tokens through its gate actor on node a."""
    fast = {"service_time_s": 0.03}
    config = parse_config(
        {
            "cluster": {"address": f"127.0.0.1:{BASE_PORT}", "worker_num_cpus": 0},
            "deployments": [
                {"name": "inter", "backend": "fake", "device": "cpu@a", "max_batch_size": 1, "options": fast},
                {"name": "bulk", "backend": "fake", "device": "cpu@a", "max_batch_size": 1, "options": fast},
            ],
            "qos": {
                "partitions": [
                    {"name": "p-inter", "device": "cpu@a", "compute_share": 0.75, "deployments": ["inter"]},
                    {"name": "p-bulk", "device": "cpu@a", "compute_share": 0.25, "deployments": ["bulk"]},
                ]
            },
        }
    )

    async def go() -> None:
        orch = Orchestrator(config)
        await orch.start()
        try:
            done = {"inter": 0, "bulk": 0}
            stop_at = time.monotonic() + 2.5

            async def client(model: str) -> None:
                while time.monotonic() < stop_at:
                    await orch.complete(_call(model))
                    done[model] += 1

            await asyncio.gather(*(client(m) for m in done for _ in range(4)))
            total = sum(done.values())
            assert total >= 40, done  # one token at 30 ms a batch: about 80 in 2.5 s
            assert done["inter"] / total == pytest.approx(0.75, abs=0.12), done
            await asyncio.sleep(1.3)  # the gate's reading reaches the gateway every second
            rows = {r["name"]: r for r in orch.status()["partitions"]}
            assert rows["p-inter"]["busy_share"] == pytest.approx(0.75, abs=0.12), rows
            assert rows["p-inter"]["granted"] + rows["p-bulk"]["granted"] >= total
            assert rows["p-bulk"]["tokens_in_use"] == 0
        finally:
            await orch.stop()

        wrong = parse_config(
            {
                "cluster": {"address": f"127.0.0.1:{BASE_PORT}", "worker_num_cpus": 0},
                "deployments": [_fake("x")],
                "qos": {
                    "partitions": [{"name": "p", "device": "cpu", "compute_share": 0.5, "deployments": ["x"]}]
                },
            }
        )
        with pytest.raises(ConfigError, match=r"no node of the cluster has.*cpu@a"):
            await Orchestrator(wrong).start()

    live.run(go(), timeout_s=90)


def test_a_deployment_that_fits_nowhere_names_what_would(live: Live) -> None:
    orch = Orchestrator(_config([_fake("npu-only", device="npu:0")], worker_num_cpus=0))
    with pytest.raises(CapabilityError, match=r"would fit: .*cpu@a"):
        live.run(orch.start())


def test_node_loss_under_load_loses_nothing_and_a_like_node_takes_over(live: Live) -> None:
    orch = live.orch
    victim = orch.workers["chat/1"]
    victim_node = victim.node  # type: ignore[attr-defined]

    async def load(n: int) -> list[Any]:
        return await asyncio.gather(
            *(orch.complete(_call(text=f"r{i} y")) for i in range(n)), return_exceptions=True
        )

    async def left_routing() -> float:
        while victim.health.healthy:
            await asyncio.sleep(0.01)
        return time.monotonic()

    async def go() -> None:
        running = asyncio.ensure_future(load(40))
        await asyncio.sleep(0.15)
        killed_at = time.monotonic()
        left = asyncio.ensure_future(asyncio.wait_for(left_routing(), 5.0))
        await asyncio.to_thread(live.cluster.kill_node, victim_node)
        results = await running
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} request(s) lost: {errors[:3]}"
        # the in-flight calls fail as soon as the actor's connection resets: no waiting for a timeout
        left_s = await left - killed_at
        assert not victim.health.healthy
        assert left_s <= 0.75, f"left routing after {left_s:.2f} s"
        more = await load(10)
        assert all(not isinstance(r, BaseException) for r in more)
        assert {r.decision.worker for r in more} == {"chat/0"}

        # a like node joins: Ray restarts the lost replica there and it takes traffic again
        await asyncio.to_thread(live.cluster.add_node, "c", num_cpus=1, labels={"xpuflow-node": "c"})
        joined_at = time.monotonic()
        while not victim.health.healthy and time.monotonic() - joined_at < 60:
            await asyncio.sleep(0.1)
        assert victim.health.healthy, "the restarted worker never came back"
        served = await load(16)
        assert "chat/1" in {r.decision.worker for r in served}
        status = orch.status()
        assert sorted(w["node"] for w in status["workers"]) == ["a", "c"]

    live.run(go(), timeout_s=120)


def test_info_cluster_lists_each_node_with_its_devices(live: Live) -> None:
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "xpuflow.cli.main",
            "info",
            "--cluster",
            "--json",
            "--address",
            live.cluster.address,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    nodes = {n["name"]: n for n in json.loads(done.stdout)["nodes"] if n["alive"]}
    assert {"a"} <= set(nodes)
    assert "cpu@a" in [d["id"] for d in nodes["a"]["devices"]]
    assert all(p["reason"] for p in nodes["a"]["probes"])


def test_xpuflow_serve_in_cluster_mode_answers_streams_and_reports_nodes(live: Live, tmp_path: Path) -> None:
    """The path users run: ``xpuflow serve CONFIG`` in its own process with a cluster section."""
    import http.client
    import json
    import socket

    import yaml

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "xpuflow.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"host": "127.0.0.1", "port": port},
                "cluster": {
                    "address": f"127.0.0.1:{BASE_PORT}",
                    "worker_num_cpus": 0,
                    "namespace": "serve-t",
                },
                # node a: the node-loss test before this one kills b
                "deployments": [_fake("served", node="a", options={"service_time_s": 0.01})],
                "api_keys": [
                    {"name": "user", "key": "key-user-1", "rights": ["infer", "metrics"]},
                    {"name": "ops", "key": "key-ops-1", "rights": ["admin"]},
                ],
            }
        )
    )

    def request(
        method: str, path: str, body: dict[str, Any] | None = None, key: str = "key-user-1"
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            headers = {"Authorization": f"Bearer {key}"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            connection.request(
                method, path, body=json.dumps(body) if body is not None else None, headers=headers
            )
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    log_path = tmp_path / "serve.log"
    with serve_process(config, port=port, log_path=log_path) as proc:
        chat = {"model": "served", "messages": [{"role": "user", "content": "one two"}], "max_tokens": 8}
        status, body = request("POST", "/v1/chat/completions", chat)
        assert status == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"] == "two one"
        status, body = request("POST", "/v1/chat/completions", {**chat, "stream": True})
        assert status == 200, body
        assert b"data: [DONE]" in body
        assert b"two" in body
        status, body = request("GET", "/admin/workers", key="key-ops-1")
        assert status == 200, body
        workers = json.loads(body)["workers"]
        assert [(w["worker_id"], w["node"], w["device"]) for w in workers] == [("served/0", "a", "cpu@a")]
        status, body = request("GET", "/metrics")
        assert status == 200
        assert b"xpuflow_requests_total{" in body
    assert proc.returncode == 0, log_path.read_text()[-3000:]
