"""remote_openai deployments through the orchestrator, in front of mock upstream processes on 127.0.0.1:
concurrency, hung and dead upstreams, recovery, outages of a whole tier, and reload."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from remote_helpers import INVENTORY, chat_call, remote_config, upstreams

from xpuflow.orchestrator import Orchestrator

pytestmark = pytest.mark.e2e


async def _stream_text(orch: Orchestrator) -> str:
    parts = []
    async for event in orch.stream(chat_call()):
        assert event.error is None
        if event.chunk is not None:
            parts.append(event.chunk.text)
    return "".join(parts)


def test_concurrent_streams_run_side_by_side_on_one_remote_worker() -> None:
    stream_s, count = 1.0, 8

    async def run() -> tuple[float, list[str], dict[str, object]]:
        with upstreams(1, "--stream-s", str(stream_s)) as (upstream,):
            async with Orchestrator(remote_config([upstream.url]), inventory=INVENTORY) as orch:
                started = time.monotonic()
                texts = await asyncio.wait_for(
                    asyncio.gather(*(_stream_text(orch) for _ in range(count))), timeout=30
                )
                elapsed = time.monotonic() - started
                (worker,) = orch.status()["workers"]
                return elapsed, texts, worker

    elapsed, texts, worker = asyncio.run(run())
    assert texts == ["u0 a b c d"] * count
    # one after another would take count * stream_s; side by side about stream_s
    assert count * stream_s / elapsed >= 6, f"{count} streams took {elapsed:.2f} s"
    assert worker["max_in_flight"] == 64


async def _load(
    orch: Orchestrator, seconds: float, clients: int, events: dict[float, object] | None = None
) -> list[tuple[float, float, str | None]]:
    """``clients`` closed loops of chat calls for ``seconds``; (start offset, latency, worker or None)."""
    results: list[tuple[float, float, str | None]] = []
    begin = time.monotonic()

    async def client() -> None:
        while (started := time.monotonic()) - begin < seconds:
            try:
                done = await orch.complete(chat_call())
                worker = done.decision.worker
            except Exception:
                worker = None
            results.append((started - begin, time.monotonic() - started, worker))

    async def script() -> None:
        for at, action in sorted((events or {}).items()):
            await asyncio.sleep(max(0.0, at - (time.monotonic() - begin)))
            action()  # type: ignore[operator]

    await asyncio.gather(script(), *(client() for _ in range(clients)))
    return results


def _p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def test_a_hung_upstream_under_load_costs_seconds_not_the_timeout() -> None:
    async def run() -> tuple[list[tuple[float, float, str | None]], dict[str, object]]:
        with upstreams(3, "--delay-ms", "20") as ups:
            async with Orchestrator(remote_config([u.url for u in ups]), inventory=INVENTORY) as orch:
                results = await _load(orch, 7.0, clients=12, events={1.5: ups[0].stop})
                status = {w["worker_id"]: w["health"] for w in orch.status()["workers"]}
                ups[0].cont()
                return results, status

    results, health = asyncio.run(run())
    assert all(worker is not None for _, _, worker in results), "a request failed"
    latencies = [latency for _, latency, _ in results]
    assert _p99(latencies) <= 5.0, f"p99 {_p99(latencies):.2f} s"
    assert max(latencies) < 10.0  # first_byte / health checks, never the 120 s timeout
    assert health["up0/0"] == "unhealthy"
    # after the first seconds nothing more goes to the hung upstream
    late = [worker for at, _, worker in results if at > 4.0]
    assert late
    assert "up0/0" not in late


def _shares(results: list[tuple[float, float, str | None]], start: float, end: float) -> dict[str, float]:
    served = [worker for at, _, worker in results if start <= at < end and worker is not None]
    return {worker: served.count(worker) / len(served) for worker in set(served)}


def test_one_cold_first_request_does_not_starve_an_upstream() -> None:
    async def run() -> list[tuple[float, float, str | None]]:
        # u0's first answer takes 300 ms (a cold start), then it is as fast as the others
        with upstreams(3, "--delay-ms", "20", only={0: ("--first-delay-ms", "300")}) as ups:
            async with Orchestrator(remote_config([u.url for u in ups]), inventory=INVENTORY) as orch:
                return await _load(orch, 6.0, clients=2)  # light load: the EMAs alone decide

    shares = _shares(asyncio.run(run()), 0.0, 10.0)
    assert len(shares) == 3
    assert min(shares.values()) >= 0.2, shares


def test_a_resumed_upstream_gets_its_share_back_within_seconds() -> None:
    async def run() -> list[tuple[float, float, str | None]]:
        with upstreams(3, "--delay-ms", "20") as ups:
            async with Orchestrator(remote_config([u.url for u in ups]), inventory=INVENTORY) as orch:
                return await _load(orch, 9.0, clients=8, events={1.0: ups[0].stop, 4.0: ups[0].cont})

    results = asyncio.run(run())
    assert all(worker is not None for _, _, worker in results), "a request failed"
    during = _shares(results, 2.5, 4.0)
    assert during.get("up0/0", 0.0) == 0.0  # out while hung
    after = _shares(results, 5.0, 9.0)  # from 1 s after SIGCONT
    assert after.get("up0/0", 0.0) >= (1 / 3) / 4, after


def test_a_restarted_upstream_serves_again_within_seconds_of_coming_back() -> None:
    outage_s, restart_at = 5.0, 6.0

    async def run() -> list[tuple[float, float, str | None]]:
        with upstreams(2, "--delay-ms", "10") as ups:
            async with Orchestrator(remote_config([u.url for u in ups]), inventory=INVENTORY) as orch:
                restart = ups[0].restart
                return await _load(
                    orch,
                    restart_at + 4.0,
                    clients=4,
                    events={restart_at - outage_s: ups[0].kill, restart_at: restart},
                )

    results = asyncio.run(run())
    assert all(worker is not None for _, _, worker in results), "a request failed"
    back = [at for at, latency, worker in results if worker == "up0/0" and at + latency > restart_at]
    assert back, "the restarted upstream got no traffic"
    assert min(back) - restart_at <= 3.0, f"first served {min(back) - restart_at:.2f} s after the restart"


async def _open_loop(
    orch: Orchestrator, rate_per_s: float, seconds: float, events: dict[float, object]
) -> list[tuple[float, float, str | None]]:
    """Requests arriving at a fixed rate (open loop, as clients do not wait for each other)."""
    results: list[tuple[float, float, str | None]] = []
    begin = time.monotonic()

    async def one(started: float) -> None:
        try:
            worker = (await orch.complete(chat_call())).decision.worker
        except Exception:
            worker = None
        results.append((started - begin, time.monotonic() - started, worker))

    async def script() -> None:
        for at, action in sorted(events.items()):
            await asyncio.sleep(max(0.0, at - (time.monotonic() - begin)))
            await action()  # type: ignore[operator]

    tasks = [asyncio.ensure_future(script())]
    for index in range(int(rate_per_s * seconds)):
        await asyncio.sleep(max(0.0, index / rate_per_s - (time.monotonic() - begin)))
        tasks.append(asyncio.ensure_future(one(time.monotonic())))
    await asyncio.gather(*tasks)
    return results


def test_every_upstream_failing_at_once_is_waited_out_not_answered_503() -> None:
    outage_s, fail_at = 4.0, 1.0

    async def run() -> tuple[list[tuple[float, float, str | None]], float]:
        with upstreams(3, "--delay-ms", "10") as ups:
            async with (
                Orchestrator(remote_config([u.url for u in ups]), inventory=INVENTORY) as orch,
                aiohttp.ClientSession() as http,
            ):
                healed: list[float] = []

                async def fail(url: str) -> None:
                    async with http.post(f"{url}/admin/fail?seconds={outage_s}") as response:
                        await response.read()

                async def fail_all() -> None:
                    await asyncio.gather(*(fail(u.url) for u in ups))
                    healed.append(time.monotonic() + outage_s)

                begin = time.monotonic()
                results = await _open_loop(orch, 40.0, fail_at + outage_s + 2.0, {fail_at: fail_all})
                return results, healed[0] - begin

    results, healed_at = asyncio.run(run())
    failed = [at for at, _, worker in results if worker is None]
    # LiteLLM with num_retries 2 loses ~40% of what arrives during such an outage; one run here lost 0
    assert len(failed) <= 5, f"{len(failed)} of {len(results)} failed"
    served_after = [at + latency for at, latency, worker in results if worker and at + latency >= healed_at]
    assert min(served_after) - healed_at <= 1.0


def test_after_a_kill_the_survivors_share_the_load() -> None:
    async def run() -> list[tuple[float, float, str | None]]:
        with upstreams(3, "--delay-ms", "20") as ups:
            async with Orchestrator(remote_config([u.url for u in ups]), inventory=INVENTORY) as orch:
                return await _load(orch, 5.0, clients=8, events={1.0: ups[0].kill})

    results = asyncio.run(run())
    assert all(worker is not None for _, _, worker in results), "a request failed"
    after = _shares(results, 2.0, 5.0)
    assert set(after) == {"up1/0", "up2/0"}
    assert min(after.values()) >= 0.3, after
