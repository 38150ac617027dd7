"""Remote deployment state: polling, Prometheus load parsing, overlay and staleness in the score."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from aiohttp import web

from xpuflow.backends.base import ModelConfig
from xpuflow.backends.remote.openai import RemoteMetrics, RemoteOpenAIPlugin
from xpuflow.clock import FakeClock
from xpuflow.policy.worker_scorer import WorkerScorer
from xpuflow.routing.remote_state import (
    PrometheusLoadProbe,
    RemoteStatePoller,
    ServerLoad,
    overlay_remote,
    parse_server_load,
)
from xpuflow.scheduling.health import HealthState, HealthTracker
from xpuflow.types import WorkerSnapshot

T = TypeVar("T")

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5-7B"} 5.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen2.5-7B"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen2.5-7B"} 12.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen2.5-7B"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen2.5-7B"} 0.42
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen2.5-7B"} 0.61
vllm:iteration_tokens_total_bucket{le="1.0",model_name="Qwen/Qwen2.5-7B"} 3.0
"""


def run(factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(factory(), timeout=20))  # type: ignore[arg-type]


class FakeRemote:
    """A remote session's state surface: scripted health and metrics."""

    def __init__(self) -> None:
        self.up = True
        self.latency_ema_s: float | None = 0.08
        self.health_calls = 0
        self.hang = False

    def metrics(self) -> RemoteMetrics:
        return RemoteMetrics(self.latency_ema_s, 10, 0, 0, None)

    async def health(self) -> bool:
        self.health_calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        return self.up


def poller(remote: FakeRemote, clock: FakeClock, **kw: Any) -> RemoteStatePoller:
    return RemoteStatePoller(
        remote, worker_id="remote/0", deployment="chat-big", device="remote:a", clock=clock, **kw
    )


# -- parsing ---------------------------------------------------------------------------------------------


def test_parse_vllm_sums_label_sets_and_takes_the_fullest_cache() -> None:
    assert parse_server_load(VLLM_METRICS) == ServerLoad(waiting=14, running=8, kv_cache_usage=0.61)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vllm:gpu_cache_usage_perc 0.5\nvllm:num_requests_waiting 1\n", ServerLoad(1, None, 0.5)),
        (
            "sglang:num_queue_reqs 4\nsglang:num_running_reqs 16\nsglang:token_usage 0.9\n",
            ServerLoad(4, 16, 0.9),
        ),
        ("tgi_queue_size 7\ntgi_batch_current_size 3\n", ServerLoad(7, 3, None)),
        (
            "llamacpp:requests_deferred 2\nllamacpp:requests_processing 1\n"
            "llamacpp:kv_cache_usage_ratio 0.25\n",
            ServerLoad(2, 1, 0.25),
        ),
        ("# only comments\nprocess_cpu_seconds_total 12.5\n", None),
        ('vllm:num_requests_waiting NaN\nvllm:num_requests_waiting{a="b"}\ngarbage{\n', None),
        ("", None),
    ],
)
def test_parse_other_servers_and_garbage(text: str, expected: ServerLoad | None) -> None:
    assert parse_server_load(text) == expected


# -- polling ---------------------------------------------------------------------------------------------


def test_a_fresh_poller_reports_nothing_known() -> None:
    snapshot = poller(FakeRemote(), FakeClock(start_s=5.0), max_batch_size=16).snapshot()
    assert snapshot.healthy
    assert snapshot.ema_latency_ms is None
    assert snapshot.utilization_pct is None
    assert (snapshot.queue_depth, snapshot.in_flight, snapshot.max_batch_size) == (0, 0, 16)
    assert snapshot.taken_at_s == 5.0


def test_poll_reads_health_latency_and_server_load() -> None:
    clock = FakeClock(start_s=10.0)
    remote = FakeRemote()

    async def load() -> ServerLoad:
        return ServerLoad(waiting=6, running=4, kv_cache_usage=0.3)

    p = poller(remote, clock, load_probe=load)
    snapshot = run(p.poll_once)
    assert snapshot.healthy
    assert snapshot.ema_latency_ms == pytest.approx(80.0)
    assert (snapshot.queue_depth, snapshot.in_flight) == (6, 4)
    assert snapshot.utilization_pct == pytest.approx(30.0)
    assert snapshot.taken_at_s == 10.0
    assert p.snapshot() is snapshot
    assert p.polls == 1


def test_a_failed_check_takes_the_worker_out_at_once_and_a_passing_one_brings_it_back() -> None:
    clock = FakeClock()
    remote = FakeRemote()
    health = HealthTracker(clock=clock)
    given_up: list[str] = []
    p = poller(remote, clock, health=health, on_unhealthy=given_up.append)
    remote.up = False
    assert not run(p.poll_once).healthy
    assert health.state is HealthState.UNHEALTHY
    clock.advance(60.0)
    assert not health.available()  # held out while its checks fail: no client request probes it
    assert len(given_up) == 1  # its stuck requests move elsewhere
    assert "health check" in given_up[0]
    remote.up = True
    assert run(p.poll_once).healthy
    assert health.healthy  # what a check did, a check undoes


def test_a_passing_check_makes_the_probe_of_a_worker_requests_took_out_due_now() -> None:
    clock = FakeClock()
    health = HealthTracker(failure_threshold=3, cooldown_s=5.0, clock=clock)
    p = poller(FakeRemote(), clock, health=health)
    for _ in range(3):
        health.record_failure("500 from the server")
    assert not health.available()
    assert run(p.poll_once).healthy
    assert health.state is HealthState.UNHEALTHY  # answering /health does not prove requests work...
    assert health.available()  # ...so one request probes it now, not after the 5 s cooldown
    assert health.state is HealthState.PROBING


def test_checks_after_a_failure_come_sooner_then_back_off_to_the_interval() -> None:
    clock = FakeClock()
    remote = FakeRemote()
    p = poller(remote, clock, interval_s=2.0)
    assert run(p.poll_once).healthy
    assert p.next_delay_s() == 2.0
    remote.up = False
    delays = []
    for _ in range(5):
        run(p.poll_once)
        delays.append(p.next_delay_s())
    assert delays == [0.25, 0.5, 1.0, 2.0, 2.0]
    remote.up = True
    run(p.poll_once)
    assert p.next_delay_s() == 2.0


def test_a_hanging_health_check_times_out_as_unhealthy() -> None:
    remote = FakeRemote()
    remote.hang = True
    p = RemoteStatePoller(remote, worker_id="r", deployment="d", device="remote:r", poll_timeout_s=0.05)
    assert not run(p.poll_once).healthy


def test_a_failing_load_probe_lets_the_remembered_load_age_out() -> None:
    clock = FakeClock()
    remote = FakeRemote()
    answers: list[ServerLoad | None] = [ServerLoad(waiting=0, running=0), None, None]

    async def load() -> ServerLoad | None:
        answer = answers.pop(0)
        if answer is None:
            raise OSError("connection refused")
        return answer

    p = poller(remote, clock, load_probe=load)
    assert run(p.poll_once).taken_at_s == 0.0
    clock.advance(30.0)
    snapshot = run(p.poll_once)
    assert snapshot.taken_at_s == 0.0  # the load reading is 30 s old, and the snapshot says so
    assert snapshot.healthy  # health is read fresh
    scorer = WorkerScorer(staleness_half_life_s=5.0)
    assert scorer.freshness(snapshot, clock.monotonic()) < 0.02


def test_background_polling_on_the_injected_clock() -> None:
    clock = FakeClock()
    remote = FakeRemote()

    async def scenario() -> int:
        async with poller(remote, clock, interval_s=2.0) as p:
            for _ in range(50):
                await asyncio.sleep(0)
            assert p.snapshot().healthy
        polls = p.polls
        for _ in range(10):
            await asyncio.sleep(0)
        assert p.polls == polls  # stopped
        return polls

    polls = run(scenario)
    assert polls >= 3
    assert clock.monotonic() >= 2.0 * (polls - 1)


def test_bad_intervals_are_refused() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        poller(FakeRemote(), FakeClock(), interval_s=0)
    with pytest.raises(ValueError, match="poll_timeout_s"):
        poller(FakeRemote(), FakeClock(), poll_timeout_s=-1)


# -- overlay and the score -------------------------------------------------------------------------------


def test_overlay_adds_the_servers_load_to_the_local_view() -> None:
    local = WorkerSnapshot(
        "remote/0", "chat-big", "remote:a", queue_depth=2, in_flight=3, ema_latency_ms=None, taken_at_s=9.0
    )
    remote = WorkerSnapshot(
        "remote/0",
        "chat-big",
        "remote:a",
        queue_depth=10,
        in_flight=8,
        ema_latency_ms=120.0,
        utilization_pct=55.0,
        taken_at_s=7.0,
    )
    merged = overlay_remote(local, remote)
    assert (merged.queue_depth, merged.in_flight) == (12, 8)
    assert merged.ema_latency_ms == 120.0
    assert merged.utilization_pct == 55.0
    assert merged.taken_at_s == 7.0
    assert merged.healthy
    assert not overlay_remote(local, WorkerSnapshot("r", "d", "x", healthy=False)).healthy


def test_a_busy_remote_loses_to_an_idle_local_until_its_state_is_stale() -> None:
    clock = FakeClock()
    remote = FakeRemote()

    async def busy() -> ServerLoad:
        return ServerLoad(waiting=64, running=16)

    p = poller(remote, clock, load_probe=busy)
    run(p.poll_once)
    local_remote = WorkerSnapshot("remote/0", "chat-big", "remote:a", max_batch_size=16, taken_at_s=0.0)
    local_gpu = WorkerSnapshot(
        "gpu/0", "chat-big", "cuda:0", queue_depth=8, max_batch_size=16, ema_latency_ms=80.0, taken_at_s=0.0
    )
    scorer = WorkerScorer(staleness_half_life_s=2.0)
    now_fresh = scorer.score([p.overlay(local_remote), local_gpu], now_s=0.0)
    assert now_fresh[0].worker_id == "gpu/0"
    stale_remote = scorer.score([p.overlay(local_remote), local_gpu], now_s=60.0)
    # 60 s later the remote reading says nothing any more: its terms are neutral.
    remote_scored = next(s for s in stale_remote if s.worker_id == "remote/0")
    assert remote_scored.terms["speed"] == pytest.approx(0.5, abs=1e-6)


# -- against a real HTTP server on loopback --------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(metrics_text: str | None) -> AsyncIterator[str]:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=metrics_text or "", content_type="text/plain")

    app = web.Application()
    app.router.add_get("/health", health)
    if metrics_text is not None:
        app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def test_polls_a_real_remote_session_and_its_prometheus_metrics() -> None:
    async def scenario() -> tuple[WorkerSnapshot, WorkerSnapshot]:
        async with serve(VLLM_METRICS) as url:
            config = ModelConfig("chat-big", options={"base_url": url + "/v1", "model": "m"})
            session = await RemoteOpenAIPlugin().create_session([], config, {})
            probe = PrometheusLoadProbe(url + "/v1", timeout_s=2.0)
            assert probe.url == url + "/metrics"
            p = RemoteStatePoller(
                session, worker_id="remote/0", deployment="chat-big", device="remote:a", load_probe=probe
            )
            async with session:
                first = await p.poll_once()
                await p.stop()
            # Once the server is gone, health fails and the load probe reads nothing.
        session2 = await RemoteOpenAIPlugin().create_session([], config, {})
        gone = RemoteStatePoller(
            session2,
            worker_id="remote/0",
            deployment="chat-big",
            device="remote:a",
            load_probe=PrometheusLoadProbe(url, timeout_s=1.0),
        )
        async with session2:
            second = await gone.poll_once()
            await gone.stop()
        return first, second

    first, second = run(scenario)
    assert first.healthy
    assert (first.queue_depth, first.in_flight) == (14, 8)
    assert first.utilization_pct == pytest.approx(61.0)
    assert not second.healthy
    assert second.queue_depth == 0


def test_a_server_without_metrics_reads_as_load_unknown() -> None:
    async def scenario() -> ServerLoad | None:
        async with serve(None) as url:
            probe = PrometheusLoadProbe(url)
            try:
                return await probe()
            finally:
                await probe.close()

    assert run(scenario) is None


def test_seeded_choice_over_polled_snapshots_is_reproducible() -> None:
    clock = FakeClock()
    pollers = [
        RemoteStatePoller(FakeRemote(), worker_id=f"r{i}", deployment="d", device=f"remote:{i}", clock=clock)
        for i in range(4)
    ]
    snapshots = [run(p.poll_once) for p in pollers]
    scorer = WorkerScorer()
    picks = [scorer.choose(snapshots, rng=random.Random(4), now_s=1.0).chosen.worker_id for _ in range(3)]  # type: ignore[union-attr]
    assert len(set(picks)) == 1
