"""Reliability of the gateway as users run it: faults in front of real processes, measured from outside.

Every scenario starts ``xpuflow serve CONFIG --port P`` in its own process (the project's venv), in
front of mock OpenAI upstreams (``mock_upstream.py``, one process each, so each can be killed, stopped
with SIGSTOP or told to fail) on 127.0.0.1. The config is one logical model ``chat`` with one tier of
``remote_openai`` deployments, one per upstream, with the product's defaults unless a scenario says
otherwise. A fresh gateway and fresh upstreams serve each scenario, and every process is stopped (by its
PID, in ``finally``) when the scenario ends.

Load is open loop (asyncio + aiohttp, keep-alive): requests leave at a fixed rate whether or not the
earlier ones have finished, a bounded number of them, and each records its start, end, HTTP status and
``x-xpuflow-worker`` header. A request counts as successful when it ends with 200 and, for a stream, with
``data: [DONE]`` and no error event. Times are ``time.monotonic()``, which the mock upstreams share.

Scenarios (``--only`` picks some; targets in brackets):

- ``keepalive``: sequential keep-alive POSTs, the gateway and direct to its upstream in alternating
  blocks of the same run: ``keepalive_added_p50_ms`` [<= 1].
- ``parallel``: one single-replica deployment, upstream streams of 2 s: 8 streams one after another, then
  8 at once: ``remote_parallel_speedup`` = sequential time / parallel time [>= 6].
- ``failover``: three upstreams, 150 req/s (every second request streamed): a baseline window, then a
  window in which one upstream is killed with SIGKILL: ``failover_lost`` (requests of the kill window
  that did not succeed) [= 0], ``failover_added_p99_ms`` (kill window p99 - baseline p99) [<= 500].
  The upstreams answer after 10 ms and then send a stream's tokens at once: a stream that has already
  delivered tokens when its upstream dies cannot be replayed elsewhere (docs/worker_choice.md), so this
  measures the requests a gateway can save.
- ``hung``: three upstreams under load, one SIGSTOPped for 12 s, then SIGCONT: ``hung_upstream_p99_s``
  (p99 latency of the requests started while it was stopped; default settings) [<= 5], and
  ``hang_recovery_s``: the start, counted from SIGCONT, of the first 5 s window (sliding by 0.5 s) of
  requests in which the resumed upstream serves at least a quarter of its fair share (1/12) [<= 5].
- ``least_used``: three equal upstreams from a cold gateway start, 50 req/s for 6 s: ``least_used_share``,
  the least-used upstream's share of the requests (``x-xpuflow-worker``; the upstreams' own counts are
  kept), the worst of three cold starts [>= 0.2].
- ``overload``: one upstream of known capacity (0.2 s per request; ``max_in_flight`` 4: 20 req/s, and a
  queue of 8) at 10x that rate: ``overload_429_p99_ms`` (p99 latency of the 429s) [<= 100],
  ``overload_rss_growth_mb`` (peak gateway RSS during the load - RSS before it) [<= 50] and
  ``overload_accepted_completed`` (successes / requests not answered 429) [= 1.0].
- ``sigterm``: 20 requests of 10 s (half streamed) in flight, then SIGTERM to the gateway:
  ``sigterm_lost`` (those that did not end with a success) [= 0]. One more request 1 s after the signal
  shows how a draining gateway answers new work (recorded, no target).
- ``restart``: one of three upstreams killed for 12 s under 40 req/s, then restarted on its port:
  ``restart_recovery_s``, seconds from its restart (when it answers again) until a request it served
  completes [<= 3].
- ``storm``: all three upstreams answer 500 to everything for 5 s, at 40 req/s: xpuflow, then the LiteLLM
  proxy (its defaults plus ``num_retries: 2`` and 10 s timeouts, the same three upstreams, installed by
  ``gateway_overhead.py``'s cached venv): ``storm_failed_vs_litellm`` (xpuflow's failed requests over
  LiteLLM's) [<= 1.0] and ``storm_first_success_s`` (from healing to xpuflow's first success) [<= 1].
- ``fuzz``: schemathesis against the OpenAPI document the gateway serves at ``/openapi.json``, through
  the product's helper ``xpuflow.serving.fuzz.run_fuzz`` (seed 0; the inference key): ``fuzz_cases``
  [>= 5000], ``fuzz_5xx`` [= 0]. Skipped, saying so, when the product has no such helper.

    .venv/bin/python benchmarks/reliability.py [--only failover,storm] [--skip-litellm] [--at-commit HEAD]

``--at-commit REV`` runs the gateway from ``git archive REV src`` (with the working tree's built C
extensions) instead of the working tree, which others may be editing mid-run. About 6.5 minutes in all
on a 2-vCPU machine, half of it the 5000 fuzz cases.

Writes benchmarks/results/reliability.json: the figures, ``targets`` and ``passed``, then per scenario
its figures, notes and raw samples (columns: start_s, latency_ms, status, worker, stream; status 0 is a
connection error, -1 a client timeout), and ``method``. A run of a subset keeps the other scenarios'
earlier results (each scenario carries its own ``measured_at`` and the product it measured).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.util
import inspect
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    export_source,
    free_port,
    http_ok,
    machine,
    print_table,
    remote_deployment,
    rss_mb,
    start_process,
    start_xpuflow,
    stop_process,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "reliability.json"
SCENARIOS = (
    "keepalive",
    "parallel",
    "failover",
    "hung",
    "least_used",
    "overload",
    "sigterm",
    "restart",
    "storm",
    "fuzz",
)
# figure -> (comparison, target, scenario)
TARGETS: dict[str, tuple[str, float, str]] = {
    "keepalive_added_p50_ms": ("<=", 1.0, "keepalive"),
    "remote_parallel_speedup": (">=", 6.0, "parallel"),
    "failover_lost": ("==", 0, "failover"),
    "failover_added_p99_ms": ("<=", 500.0, "failover"),
    "hung_upstream_p99_s": ("<=", 5.0, "hung"),
    "least_used_share": (">=", 0.2, "least_used"),
    "overload_429_p99_ms": ("<=", 100.0, "overload"),
    "overload_rss_growth_mb": ("<=", 50.0, "overload"),
    "overload_accepted_completed": ("==", 1.0, "overload"),
    "sigterm_lost": ("==", 0, "sigterm"),
    "hang_recovery_s": ("<=", 5.0, "hung"),
    "restart_recovery_s": ("<=", 3.0, "restart"),
    "storm_failed_vs_litellm": ("<=", 1.0, "storm"),
    "storm_first_success_s": ("<=", 1.0, "storm"),
    "fuzz_cases": (">=", 5000, "fuzz"),
    "fuzz_5xx": ("==", 0, "fuzz"),
}
LITELLM_STORM_CONFIG = """\
model_list:
{deployments}
general_settings:
  master_key: {master_key}
litellm_settings:
  num_retries: 2
  request_timeout: 10
  telemetry: false
router_settings:
  num_retries: 2
  timeout: 10
"""
LITELLM_DEPLOYMENT = """\
  - model_name: chat
    litellm_params:
      model: openai/mock
      api_base: {upstream}/v1
      api_key: sk-mock
      timeout: 10
"""


def now() -> float:
    return time.monotonic()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# -- processes ----------------------------------------------------------------------------------------


class Upstream:
    """One mock OpenAI server in its own process, on a port of its own that survives a restart."""

    def __init__(
        self, name: str, *, delay_s: float = 0.0, stream_tokens: int = 5, token_delay_s: float = 0.0
    ):
        self.name = name
        self.port = free_port()
        self.argv = [sys.executable, str(HERE / "mock_upstream.py"), "--port", str(self.port)]
        self.argv += ["--delay-s", str(delay_s), "--stream-tokens", str(stream_tokens)]
        self.argv += ["--token-delay-s", str(token_delay_s)]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        self.proc = start_process(self.argv, f"{self.url}/v1/models", timeout_s=30)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9, and reap it."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        _unlink_log(self.proc)

    def stats(self) -> dict[str, Any]:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/admin/stats", timeout=5) as response:
                return dict(json.loads(response.read()))
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            _unlink_log(self.proc)


def _unlink_log(proc: subprocess.Popen[bytes]) -> None:
    path = getattr(proc, "log_path", None)
    if path:
        Path(path).unlink(missing_ok=True)


def _log_tail(proc: subprocess.Popen[bytes], chars: int = 3000) -> str:
    path = getattr(proc, "log_path", None)
    try:
        return Path(path).read_text(errors="replace")[-chars:] if path else ""
    except OSError:
        return ""


class Gateway:
    """``xpuflow serve CONFIG`` in its own process."""

    def __init__(self, config: dict[str, Any], src: Path | None = None) -> None:
        self.config = config
        started = time.perf_counter()
        self.proc, self.url = start_xpuflow(config, src=src)
        self.start_s = time.perf_counter() - started

    def close(self) -> str:
        """Stop it; returns the tail of its log (warnings and tracebacks it printed)."""
        stop_process(self.proc)
        tail = _log_tail(self.proc)
        _unlink_log(self.proc)
        shutil.rmtree(getattr(self.proc, "config_dir", ""), ignore_errors=True)
        return tail


def chat_config(upstreams: list[Upstream], api_key: str, **deployment: Any) -> dict[str, Any]:
    """One logical model ``chat``, one tier of one ``remote_openai`` deployment per upstream."""
    deployments = [remote_deployment(u.name, u.url, **copy.deepcopy(deployment)) for u in upstreams]
    return {
        "deployments": deployments,
        "models": [
            {"name": "chat", "tiers": [{"name": "default", "deployments": [u.name for u in upstreams]}]}
        ],
        "api_keys": [{"name": "bench", "key": api_key}],
    }


# -- the load generator --------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    start: float  # time.monotonic()
    end: float
    status: int  # HTTP status; 0 connection error, -1 client timeout
    worker: str  # the x-xpuflow-worker header ("" when absent)
    stream: bool
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def latency_s(self) -> float:
        return self.end - self.start

    @property
    def deployment(self) -> str:
        return self.worker.split("/", 1)[0]


def body(stream: bool, max_tokens: int = 16) -> bytes:
    return json.dumps(
        {
            "model": "chat",
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    ).encode()


class Client:
    """Sends chat requests to one base URL on keep-alive connections and records each as a Sample."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 30.0, limit: int = 0) -> None:
        self.url = f"{base_url}/v1/chat/completions"
        self.headers = {"content-type": "application/json", "authorization": f"Bearer {api_key}"}
        self.timeout_s = timeout_s
        self.limit = limit
        self.http: Any = None
        self.lateness_ms: list[float] = []  # how late open_loop sent each request (a busy client)

    async def __aenter__(self) -> Client:
        import aiohttp

        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.limit),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def request(self, stream: bool = False) -> Sample:
        import aiohttp

        start = now()
        status, worker, error = 0, "", ""
        try:
            async with self.http.post(self.url, data=body(stream), headers=self.headers) as response:
                status = response.status
                worker = response.headers.get("x-xpuflow-worker", "")
                data = await response.read()
                if status == 200 and stream:
                    if b'"error"' in data:
                        error = "error event: " + data[data.rfind(b"data: ") :][:300].decode(errors="replace")
                    elif b"[DONE]" not in data:
                        error = "stream ended without [DONE]"
                elif status == 200 and b'"choices"' not in data:
                    error = "no choices in the body"
                elif status != 200:
                    error = data[:300].decode(errors="replace")
        except TimeoutError:
            status, error = -1, f"client timeout ({self.timeout_s:g} s)"
        except aiohttp.ClientError as exc:
            status, error = 0, f"{type(exc).__name__}: {exc}"[:300]
        return Sample(start, now(), status, worker, stream, error)

    def lateness_p99_ms(self) -> float | None:
        return _round(percentile(self.lateness_ms, 0.99), 2)

    async def open_loop(
        self, rate: float, duration_s: float, *, stream_every: int = 0, begin: float | None = None
    ) -> list[Sample]:
        """``rate * duration_s`` requests at even gaps from ``begin`` (default: now); every
        ``stream_every``-th one streamed (0: none). Returns once every request has ended."""
        begin = now() if begin is None else begin
        tasks = []
        for i in range(round(rate * duration_s)):
            delay = begin + i / rate - now()
            if delay > 0:
                await asyncio.sleep(delay)
            self.lateness_ms.append(max(0.0, (now() - begin - i / rate) * 1000.0))
            stream = bool(stream_every) and i % stream_every == 0
            tasks.append(asyncio.create_task(self.request(stream)))
        return list(await asyncio.gather(*tasks))


async def at(when: float, action: Callable[[], Any]) -> Any:
    """Run ``action`` (a function, or a coroutine function) at ``time.monotonic() == when``."""
    delay = when - now()
    if delay > 0:
        await asyncio.sleep(delay)
    result = action()
    return await result if inspect.isawaitable(result) else result


def columns(samples: list[Sample], origin: float) -> dict[str, list[Any]]:
    """Raw samples as columns, times in seconds from ``origin``."""
    return {
        "start_s": [round(s.start - origin, 4) for s in samples],
        "latency_ms": [round(s.latency_s * 1000.0, 3) for s in samples],
        "status": [s.status for s in samples],
        "worker": [s.worker for s in samples],
        "stream": [int(s.stream) for s in samples],
    }


def failures(samples: list[Sample], limit: int = 5) -> dict[str, Any]:
    """How many samples failed, by status, with a few of their errors."""
    failed = [s for s in samples if not s.ok]
    by_status: dict[str, int] = {}
    for s in failed:
        by_status[str(s.status)] = by_status.get(str(s.status), 0) + 1
    return {"failed": len(failed), "by_status": by_status, "examples": [s.error for s in failed[:limit]]}


def latencies_ms(samples: list[Sample]) -> list[float]:
    return [s.latency_s * 1000.0 for s in samples]


# -- the run ----------------------------------------------------------------------------------------


class Bench:
    """Shared state of a run: the API key, the processes still to stop, the arguments."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.api_key = "sk-bench-" + secrets.token_hex(16)
        self.open: list[Any] = []
        self.logs: dict[str, str] = {}
        self.src: Path | None = None
        self.product = "the installed package (the working tree)"
        if args.at_commit:
            self.src, commit = export_source(args.at_commit)
            self.product = f"commit {commit}"
            sys.path.insert(0, str(self.src))  # the fuzz helper, imported here, comes from it too

    def upstreams(self, count: int, **behaviour: Any) -> list[Upstream]:
        ups = []
        for i in range(count):
            up = Upstream(f"up{i}", **behaviour)
            self.open.append(up)
            ups.append(up.start())
        return ups

    def gateway(self, config: dict[str, Any]) -> Gateway:
        gateway = Gateway(config, self.src)
        self.open.append(gateway)
        return gateway

    def release(self, scenario: str, *things: Any) -> None:
        """Stop these processes (keeping the gateway's log tail for the report)."""
        for thing in things:
            if thing in self.open:
                self.open.remove(thing)
            tail = thing.close()
            if isinstance(thing, Gateway) and tail:
                tail = tail.split("Stop: Ctrl+C", 1)[-1].strip()  # what it said after its banner
                if tail:
                    self.logs[scenario] = tail

    def close(self) -> None:
        """Stop what is still running and remove the exported source."""
        self.close_all()
        if self.src is not None:
            shutil.rmtree(self.src.parent, ignore_errors=True)

    def close_all(self) -> None:
        while self.open:
            thing = self.open.pop()
            try:
                thing.close()
            except Exception as exc:  # keep stopping the others
                print(f"  could not stop {thing}: {exc}", flush=True)


async def keepalive(bench: Bench) -> dict[str, Any]:
    requests, warmup, block = bench.args.keepalive_requests, 100, 50
    (up,) = bench.upstreams(1)
    gateway = bench.gateway(chat_config([up], bench.api_key))
    try:
        clients = {
            "direct": Client(up.url, bench.api_key, limit=1),
            "xpuflow": Client(gateway.url, bench.api_key, limit=1),
        }
        samples: dict[str, list[Sample]] = {name: [] for name in clients}
        for client in clients.values():
            await client.__aenter__()
        try:
            for client in clients.values():
                for _ in range(warmup):
                    await client.request()
            for i in range(math.ceil(requests / block)):
                names = list(clients) if i % 2 == 0 else list(clients)[::-1]
                for name in names:
                    for _ in range(min(block, requests - len(samples[name]))):
                        samples[name].append(await clients[name].request())
        finally:
            for client in clients.values():
                await client.__aexit__()
    finally:
        bench.release("keepalive", gateway, up)
    p50 = {name: percentile(latencies_ms(s), 0.5) for name, s in samples.items()}
    p99 = {name: percentile(latencies_ms(s), 0.99) for name, s in samples.items()}
    return {
        "figures": {"keepalive_added_p50_ms": _round(p50["xpuflow"] - p50["direct"], 4)},  # type: ignore[operator]
        "details": {
            "p50_ms": {k: _round(v, 4) for k, v in p50.items()},
            "p99_ms": {k: _round(v, 4) for k, v in p99.items()},
            "added_p99_ms": _round(p99["xpuflow"] - p99["direct"], 4),  # type: ignore[operator]
            "failures": {name: failures(s) for name, s in samples.items()},
            "requests_per_path": requests,
            "warmup_per_path": warmup,
            "block": block,
            "gateway_start_s": round(gateway.start_s, 3),
        },
        "samples": {name: columns(s, s[0].start) for name, s in samples.items()},
    }


async def parallel(bench: Bench) -> dict[str, Any]:
    # 21 token events 0.1 s apart: 2.0 s per stream
    (up,) = bench.upstreams(1, stream_tokens=21, token_delay_s=0.1)
    gateway = bench.gateway(chat_config([up], bench.api_key))
    try:
        async with Client(gateway.url, bench.api_key, timeout_s=60) as client:
            begin = now()
            sequential = [await client.request(stream=True) for _ in range(8)]
            sequential_s = now() - begin
            begin = now()
            concurrent = list(await asyncio.gather(*(client.request(stream=True) for _ in range(8))))
            parallel_s = now() - begin
        stats = up.stats()
    finally:
        bench.release("parallel", gateway, up)
    return {
        "figures": {"remote_parallel_speedup": round(sequential_s / parallel_s, 3)},
        "details": {
            "sequential_s": round(sequential_s, 3),
            "parallel_s": round(parallel_s, 3),
            "stream_s_at_upstream": 2.0,
            "upstream_max_in_flight": stats.get("max_in_flight"),
            "failures": {"sequential": failures(sequential), "parallel": failures(concurrent)},
        },
        "samples": {
            "sequential": columns(sequential, sequential[0].start),
            "parallel": columns(concurrent, concurrent[0].start),
        },
    }


async def failover(bench: Bench) -> dict[str, Any]:
    rate, window_s, kill_at_s = 150.0, 10.0, 3.0
    ups = bench.upstreams(3, delay_s=0.01)
    gateway = bench.gateway(chat_config(ups, bench.api_key))
    try:
        async with Client(gateway.url, bench.api_key) as client:
            await client.open_loop(rate, 2.0, stream_every=2)  # warm-up
            base_begin = now()
            baseline = await client.open_loop(rate, window_s, stream_every=2, begin=base_begin)
            begin = now()
            kill_t = begin + kill_at_s
            killer = asyncio.create_task(at(kill_t, ups[0].kill))
            window = await client.open_loop(rate, window_s, stream_every=2, begin=begin)
            await killer
    finally:
        bench.release("failover", gateway, *ups)
    base_p99 = percentile(latencies_ms(baseline), 0.99)
    kill_p99 = percentile(latencies_ms(window), 0.99)
    after_kill = [s for s in window if kill_t - 0.5 <= s.start < kill_t + 2.0]
    lost = failures(window)
    return {
        "figures": {
            "failover_lost": lost["failed"],
            "failover_added_p99_ms": _round(kill_p99 - base_p99, 2),  # type: ignore[operator]
        },
        "details": {
            "rate_per_s": rate,
            "send_lateness_p99_ms": client.lateness_p99_ms(),
            "window_s": window_s,
            "kill_at_s": kill_at_s,
            "baseline_p50_ms": _round(percentile(latencies_ms(baseline), 0.5), 2),
            "baseline_p99_ms": _round(base_p99, 2),
            "kill_window_p50_ms": _round(percentile(latencies_ms(window), 0.5), 2),
            "kill_window_p99_ms": _round(kill_p99, 2),
            "p99_ms_of_requests_started_0.5s_before_to_2s_after_the_kill": _round(
                percentile(latencies_ms(after_kill), 0.99), 2
            ),
            "max_ms": _round(max(latencies_ms(window)), 2),
            "kill_window_failures": lost,
            "baseline_failures": failures(baseline),
            "served_after_kill_by": _share_by(s for s in window if s.start > kill_t + 1.0),
        },
        "samples": {"baseline": columns(baseline, base_begin), "kill_window": columns(window, begin)},
    }


def _share_by(samples: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in samples:
        if s.ok:
            counts[s.deployment] = counts.get(s.deployment, 0) + 1
    return dict(sorted(counts.items()))


def _recovery(samples: list[Sample], name: str, since: float, fair: float, until: float) -> float | None:
    """Seconds from ``since`` to the start of the first 5 s window (sliding by 0.5 s, requests by their
    start, ending by ``until``) in which ``name`` served at least a quarter of its fair share."""
    offset = 0.0
    while since + offset + 5.0 <= until + 1e-9:
        window = [s for s in samples if since + offset <= s.start < since + offset + 5.0]
        if window and sum(1 for s in window if s.ok and s.deployment == name) / len(window) >= fair / 4:
            return offset
        offset += 0.5
    return None


async def hung(bench: Bench) -> dict[str, Any]:
    rate, stop_at_s, stopped_s, after_s = 60.0, 2.0, 12.0, 15.0
    ups = bench.upstreams(3, delay_s=0.01)
    gateway = bench.gateway(chat_config(ups, bench.api_key))
    try:
        async with Client(gateway.url, bench.api_key, timeout_s=40) as client:
            await client.open_loop(rate, 2.0, stream_every=2)  # warm-up
            begin = now()
            stop_t, cont_t = begin + stop_at_s, begin + stop_at_s + stopped_s
            events = [
                asyncio.create_task(at(stop_t, lambda: ups[1].signal(signal.SIGSTOP))),
                asyncio.create_task(at(cont_t, lambda: ups[1].signal(signal.SIGCONT))),
            ]
            samples = await client.open_loop(
                rate, stop_at_s + stopped_s + after_s, stream_every=2, begin=begin
            )
            await asyncio.gather(*events)
    finally:
        ups[1].signal(signal.SIGCONT)
        bench.release("hung", gateway, *ups)
    during = [s for s in samples if stop_t <= s.start < cont_t]
    after = [s for s in samples if s.start >= cont_t]
    end_t = begin + stop_at_s + stopped_s + after_s
    first = min((s.end for s in after if s.ok and s.deployment == "up1"), default=None)
    return {
        "figures": {
            "hung_upstream_p99_s": _round(percentile([s.latency_s for s in during], 0.99), 3),
            "hang_recovery_s": _recovery(samples, "up1", cont_t, 1 / 3, end_t),
        },
        "details": {
            "rate_per_s": rate,
            "send_lateness_p99_ms": client.lateness_p99_ms(),
            "stopped_for_s": stopped_s,
            "during_stop_p50_s": _round(percentile([s.latency_s for s in during], 0.5), 3),
            "during_stop_max_s": _round(max((s.latency_s for s in during), default=None), 3),
            "during_stop_failures": failures(during),
            "after_cont_failures": failures(after),
            "first_success_of_the_resumed_upstream_s": _round(None if first is None else first - cont_t, 3),
            "served_during_stop_by": _share_by(during),
            "served_after_cont_by": _share_by(after),
            "served_after_cont_by_window_s": {
                f"{k * 2.5:.1f}": _share_by(
                    s for s in after if cont_t + k * 2.5 <= s.start < cont_t + (k + 1) * 2.5
                )
                for k in range(int(after_s / 2.5))
            },
        },
        "samples": {"load": columns(samples, begin), "stop_s": stop_at_s, "cont_s": stop_at_s + stopped_s},
    }


async def least_used(bench: Bench) -> dict[str, Any]:
    """Cold starts are where a scorer without samples herds, and one draw says little: three cold starts,
    the figure is the worst of them."""
    rate, duration_s, trials = 50.0, 6.0, 3
    runs = []
    for _ in range(trials):
        ups = bench.upstreams(3, delay_s=0.02)
        gateway = bench.gateway(chat_config(ups, bench.api_key))
        try:
            async with Client(gateway.url, bench.api_key) as client:
                begin = now()
                samples = await client.open_loop(rate, duration_s, stream_every=2, begin=begin)
            counts = {up.name: up.stats().get("counts", {}) for up in ups}
        finally:
            bench.release("least_used", gateway, *ups)
        by_header = {up.name: sum(1 for s in samples if s.ok and s.deployment == up.name) for up in ups}
        served = {name: c.get("completion", 0) + c.get("stream", 0) for name, c in counts.items()}
        runs.append(
            {
                "least_used_share": round(min(by_header.values()) / len(samples), 4),
                "send_lateness_p99_ms": client.lateness_p99_ms(),
                "requests": len(samples),
                "by_worker_header": by_header,
                "counted_at_the_upstreams": served,
                "first_second_by_worker_header": _share_by(s for s in samples if s.start < begin + 1.0),
                "failures": failures(samples),
                "samples": columns(samples, begin),
            }
        )
    return {
        "figures": {"least_used_share": min(run["least_used_share"] for run in runs)},
        "details": {
            "rate_per_s": rate,
            "duration_s": duration_s,
            "cold_starts": trials,
            "shares": [run["least_used_share"] for run in runs],
            "runs": [{k: v for k, v in run.items() if k != "samples"} for run in runs],
        },
        "samples": {f"cold_start_{i}": run["samples"] for i, run in enumerate(runs)},
    }


async def overload(bench: Bench) -> dict[str, Any]:
    delay_s, batch, queue = 0.2, 4, 8
    capacity = batch / delay_s
    rate, duration_s = 10 * capacity, 8.0
    (up,) = bench.upstreams(1, delay_s=delay_s)
    config = chat_config(
        [up], bench.api_key, max_batch_size=batch, max_in_flight=batch, batching={"queue_capacity": queue}
    )
    gateway = bench.gateway(config)
    rss: list[tuple[float, float]] = []

    async def sample_rss(stop: asyncio.Event) -> None:
        while not stop.is_set():
            rss.append((now(), rss_mb(gateway.proc.pid)))
            await asyncio.sleep(0.25)

    try:
        async with Client(gateway.url, bench.api_key) as client:
            await asyncio.gather(*(client.request() for _ in range(batch)))  # open connections
            await asyncio.sleep(0.5)
            rss_before = rss_mb(gateway.proc.pid)
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(stop))
            begin = now()
            samples = await client.open_loop(rate, duration_s, begin=begin)
            stop.set()
            await sampler
            await asyncio.sleep(1.0)
            rss_after = rss_mb(gateway.proc.pid)
    finally:
        bench.release("overload", gateway, up)
    rejected = [s for s in samples if s.status == 429]
    accepted = [s for s in samples if s.status != 429]
    completed = [s for s in accepted if s.ok]
    peak = max(mb for _, mb in rss)
    return {
        "figures": {
            "overload_429_p99_ms": _round(percentile(latencies_ms(rejected), 0.99), 2),
            "overload_rss_growth_mb": round(peak - rss_before, 2),
            "overload_accepted_completed": round(len(completed) / len(accepted), 4) if accepted else None,
        },
        "details": {
            "capacity_req_per_s": capacity,
            "rate_per_s": rate,
            "send_lateness_p99_ms": client.lateness_p99_ms(),
            "upstream_delay_s": delay_s,
            "max_batch_size_and_max_in_flight": batch,
            "queue_capacity": queue,
            "requests": len(samples),
            "rejected_429": len(rejected),
            "accepted": len(accepted),
            "completed": len(completed),
            "accepted_p99_ms": _round(percentile(latencies_ms(completed), 0.99), 2),
            "429_p50_ms": _round(percentile(latencies_ms(rejected), 0.5), 2),
            "rss_before_mb": round(rss_before, 2),
            "rss_peak_mb": round(peak, 2),
            "rss_after_mb": round(rss_after, 2),
            "accepted_failures": failures(accepted),
        },
        "samples": {
            "load": columns(samples, begin),
            "rss_mb": [[round(t - begin, 2), round(m, 2)] for t, m in rss],
        },
    }


async def sigterm(bench: Bench) -> dict[str, Any]:
    count, term_at_s = 20, 1.5
    # 100 token events 0.1 s apart: 10 s per request, streamed or not
    ups = bench.upstreams(3, stream_tokens=100, token_delay_s=0.1)
    gateway = bench.gateway(chat_config(ups, bench.api_key))
    exit_s: float | None = None
    try:
        async with Client(gateway.url, bench.api_key, timeout_s=45) as client:
            begin = now()
            tasks = []
            for i in range(count):
                await asyncio.sleep(max(0.0, begin + i * 0.025 - now()))
                tasks.append(asyncio.create_task(client.request(stream=i % 2 == 0)))
            await asyncio.sleep(max(0.0, begin + term_at_s - now()))
            in_flight = {up.name: up.stats().get("in_flight") for up in ups}
            term_t = now()
            gateway.proc.send_signal(signal.SIGTERM)
            # a request that arrives while the gateway drains should be turned away at once
            await asyncio.sleep(1.0)
            async with Client(gateway.url, bench.api_key, timeout_s=20) as late_client:
                late = await late_client.request()
            samples = list(await asyncio.gather(*tasks))
            exit_code = await asyncio.to_thread(_wait, gateway.proc, 30.0)
            exit_s = now() - term_t if exit_code is not None else None
    finally:
        bench.release("sigterm", gateway, *ups)
    lost = failures(samples, limit=20)
    return {
        "figures": {"sigterm_lost": lost["failed"]},
        "details": {
            "requests": count,
            "request_s_at_upstream": 10.0,
            "sigterm_at_s": term_at_s,
            "in_flight_at_the_upstreams_at_sigterm": in_flight,
            "gateway_exit_code": exit_code,
            "gateway_exited_after_s": _round(exit_s, 3),
            "lost": lost,
            "request_1s_after_sigterm": {
                "status": late.status,
                "latency_ms": round(late.latency_s * 1000.0, 2),
                "error": late.error[:200],
            },
        },
        "samples": {"load": columns(samples, begin), "sigterm_s": term_at_s},
    }


def _wait(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


async def restart(bench: Bench) -> dict[str, Any]:
    rate, kill_at_s, outage_s, after_s = 40.0, 3.0, 12.0, 10.0
    ups = bench.upstreams(3, delay_s=0.01)
    gateway = bench.gateway(chat_config(ups, bench.api_key))
    restarted: list[float] = []

    async def bring_back() -> None:
        await asyncio.to_thread(ups[2].start)
        restarted.append(now())

    try:
        async with Client(gateway.url, bench.api_key) as client:
            await client.open_loop(rate, 2.0, stream_every=2)  # warm-up
            begin = now()
            kill_t = begin + kill_at_s
            events = [
                asyncio.create_task(at(kill_t, ups[2].kill)),
                asyncio.create_task(at(kill_t + outage_s, bring_back)),
            ]
            samples = await client.open_loop(
                rate, kill_at_s + outage_s + after_s, stream_every=2, begin=begin
            )
            await asyncio.gather(*events)
    finally:
        bench.release("restart", gateway, *ups)
    back_t = restarted[0]
    first = min((s.end for s in samples if s.ok and s.deployment == "up2" and s.end > back_t), default=None)
    return {
        "figures": {"restart_recovery_s": _round(None if first is None else first - back_t, 3)},
        "details": {
            "rate_per_s": rate,
            "send_lateness_p99_ms": client.lateness_p99_ms(),
            "outage_s": outage_s,
            "restart_took_s": round(back_t - (kill_t + outage_s), 3),
            "failures": failures(samples),
            "served_during_outage_by": _share_by(s for s in samples if kill_t + 1.0 <= s.start < back_t),
            "served_after_restart_by": _share_by(s for s in samples if s.start >= back_t),
        },
        "samples": {
            "load": columns(samples, begin),
            "kill_s": kill_at_s,
            "restart_s": round(back_t - begin, 3),
        },
    }


async def _storm_run(base_url: str, ups: list[Upstream], api_key: str) -> dict[str, Any]:
    rate, fail_at_s, fail_s, total_s = 40.0, 3.0, 5.0, 15.0
    import aiohttp

    heal: list[float] = []

    async def fail_all() -> None:
        async with aiohttp.ClientSession() as http:

            async def one(up: Upstream) -> None:
                async with http.post(f"{up.url}/admin/fail", json={"seconds": fail_s}) as response:
                    heal.append(float((await response.json())["until_monotonic"]))

            await asyncio.gather(*(one(up) for up in ups))

    async with Client(base_url, api_key, timeout_s=40) as client:
        await client.open_loop(rate, 2.0)  # warm-up
        begin = now()
        storm = asyncio.create_task(at(begin + fail_at_s, fail_all))
        samples = await client.open_loop(rate, total_s, begin=begin)
        await storm
    heal_t = max(heal)
    first = min((s.end for s in samples if s.ok and s.end > heal_t), default=None)
    failed = failures(samples)
    return {
        "failed": failed["failed"],
        "first_success_after_healing_s": _round(None if first is None else first - heal_t, 3),
        "failures": failed,
        "failed_after_healing": sum(1 for s in samples if not s.ok and s.start >= heal_t),
        "p99_ms": _round(percentile(latencies_ms(samples), 0.99), 2),
        "samples": columns(samples, begin),
        "storm_s": [fail_at_s, fail_at_s + fail_s],
        "rate_per_s": rate,
        "send_lateness_p99_ms": client.lateness_p99_ms(),
    }


async def storm(bench: Bench) -> dict[str, Any]:
    ups = bench.upstreams(3, delay_s=0.01)
    results: dict[str, Any] = {}
    litellm_info: dict[str, Any] = {}
    try:
        gateway = bench.gateway(chat_config(ups, bench.api_key))
        try:
            results["xpuflow"] = await _storm_run(gateway.url, ups, bench.api_key)
        finally:
            bench.release("storm", gateway)
        if bench.args.skip_litellm:
            litellm_info = {"error": "skipped (--skip-litellm)"}
        else:
            try:
                proc, url, litellm_info = _start_litellm(bench, ups)
            except Exception as exc:
                litellm_info = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
                print(f"  LiteLLM could not be measured: {litellm_info['error'][:500]}", flush=True)
            else:
                try:
                    results["litellm"] = await _storm_run(url, ups, bench.api_key)
                finally:
                    stop_process(proc)
                    _unlink_log(proc)
                    shutil.rmtree(proc.config_dir, ignore_errors=True)  # type: ignore[attr-defined]
    finally:
        bench.release("storm", *ups)
    xf, ll = results["xpuflow"], results.get("litellm")
    if ll is None:
        ratio = None
    elif ll["failed"] == 0:
        ratio = 1.0 if xf["failed"] == 0 else None  # x / 0: no finite ratio; the counts are in details
    else:
        ratio = round(xf["failed"] / ll["failed"], 4)
    not_measured = {} if ll is not None else {"storm_failed_vs_litellm": litellm_info.get("error", "")}
    return {
        "not_measured": not_measured,
        "figures": {
            "storm_failed_vs_litellm": ratio,
            "storm_first_success_s": xf["first_success_after_healing_s"],
        },
        "details": {
            "xpuflow_failed": xf["failed"],
            "litellm_failed": None if ll is None else ll["failed"],
            "litellm_first_success_after_healing_s": None
            if ll is None
            else ll["first_success_after_healing_s"],
            "litellm": litellm_info,
            **{
                f"{name}_{key}": value
                for name, run in results.items()
                for key, value in run.items()
                if key in ("failures", "failed_after_healing", "p99_ms")
            },
        },
        "samples": {name: run["samples"] for name, run in results.items()},
    }


def _start_litellm(bench: Bench, ups: list[Upstream]) -> tuple[subprocess.Popen[bytes], str, dict[str, Any]]:
    """The LiteLLM proxy before the same upstreams, from gateway_overhead.py's cached venv."""
    from gateway_overhead import start_litellm

    config = LITELLM_STORM_CONFIG.format(
        deployments="".join(LITELLM_DEPLOYMENT.format(upstream=up.url) for up in ups),
        master_key=bench.api_key,
    )
    print("  starting the LiteLLM proxy ...", flush=True)
    proc, port, info = start_litellm(config, Path(bench.args.litellm_venv).expanduser(), bench.api_key)
    return proc, f"http://127.0.0.1:{port}", info


def _fuzz_runner() -> Callable[..., dict[str, Any]] | None:
    """The product's fuzz helper, ``run_fuzz(base_url, max_cases, api_key, *, seed)``: in
    ``xpuflow.serving.fuzz`` or ``xpuflow.serving.openapi``; None while neither has it."""
    for name in ("xpuflow.serving.fuzz", "xpuflow.serving.openapi"):
        try:
            if importlib.util.find_spec(name) is None:
                continue
            module = importlib.import_module(name)
        except ImportError:
            continue
        runner = getattr(module, "run_fuzz", None)
        if runner is not None:
            return runner  # type: ignore[no-any-return]
    return None


async def fuzz(bench: Bench) -> dict[str, Any]:
    runner = _fuzz_runner()
    if runner is None:
        return {
            "figures": {"fuzz_cases": None, "fuzz_5xx": None},
            "skipped": "not available: the product has no run_fuzz helper (xpuflow.serving.fuzz) yet",
        }
    (up,) = bench.upstreams(1)
    gateway = bench.gateway(chat_config([up], bench.api_key))
    try:
        if not http_ok(f"{gateway.url}/openapi.json"):
            return {
                "figures": {"fuzz_cases": None, "fuzz_5xx": None},
                "skipped": "not available: the gateway does not serve /openapi.json",
            }
        started = time.perf_counter()
        report = await asyncio.to_thread(runner, gateway.url, bench.args.fuzz_cases, bench.api_key, seed=0)
        elapsed = time.perf_counter() - started
    finally:
        bench.release("fuzz", gateway, up)
    return {
        "figures": {"fuzz_cases": report.get("cases"), "fuzz_5xx": report.get("server_errors")},
        "details": {"report": report, "elapsed_s": round(elapsed, 2), "seed": 0},
    }


RUNNERS: dict[str, Callable[[Bench], Awaitable[dict[str, Any]]]] = {
    "keepalive": keepalive,
    "parallel": parallel,
    "failover": failover,
    "hung": hung,
    "least_used": least_used,
    "overload": overload,
    "sigterm": sigterm,
    "restart": restart,
    "storm": storm,
    "fuzz": fuzz,
}


def _passed(figure: str, value: Any, scenario: dict[str, Any] | None) -> bool | None:
    """Whether a figure meets its target; None when its scenario did not run, was skipped or broke.
    A figure a scenario that ran could not give (a recovery that never came) fails."""
    if value is None:
        ran = scenario is not None and not {"skipped", "error"} & set(scenario)
        return False if ran and figure not in scenario.get("not_measured", {}) else None
    op, target, _ = TARGETS[figure]
    return bool({"<=": value <= target, ">=": value >= target, "==": value == target}[op])


def _working_tree() -> str:
    def git(*argv: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(HERE.parent), *argv], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    dirty = bool(git("status", "--porcelain", "--", "src"))
    return f"the working tree at {git('rev-parse', '--short', 'HEAD')}" + (
        " (src/ modified)" if dirty else ""
    )


async def run(bench: Bench, names: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        print(f"{name} ...", flush=True)
        started = time.perf_counter()
        try:
            result = await RUNNERS[name](bench)
        except Exception as exc:  # one broken scenario must not lose the others' results
            import traceback

            traceback.print_exc()
            result = {
                "figures": {f: None for f, (_, _, s) in TARGETS.items() if s == name},
                "error": f"{type(exc).__name__}: {exc}"[:2000],
            }
        finally:
            bench.close_all()
        result["elapsed_s"] = round(time.perf_counter() - started, 2)
        result["measured_at"] = time.time()
        result["product"] = bench.product if bench.src else _working_tree()
        if name in bench.logs:
            result["gateway_log_tail"] = bench.logs.pop(name)
        results[name] = result
        shown = ", ".join(f"{k}={v}" for k, v in result["figures"].items())
        print(f"  {shown}  ({result['elapsed_s']:.0f} s)  {result.get('skipped', '')}", flush=True)
    return results


def _write(results: dict[str, Any], args: argparse.Namespace, load: tuple[Any, Any]) -> None:
    previous: dict[str, Any] = {}
    if RESULTS.exists():
        try:
            previous = json.loads(RESULTS.read_text()).get("scenarios", {})
        except (OSError, ValueError):
            previous = {}
    scenarios = {name: results.get(name) or previous.get(name) for name in SCENARIOS}
    scenarios = {k: v for k, v in scenarios.items() if v is not None}
    figures = {f: scenarios.get(s, {}).get("figures", {}).get(f) for f, (_, _, s) in TARGETS.items()}
    samples = {name: s.pop("samples", None) for name, s in scenarios.items()}
    method = {
        "description": __doc__,
        "command": "python benchmarks/reliability.py " + " ".join(sys.argv[1:]),
        "gateway": "xpuflow serve CONFIG --port P (its own process; the project's venv)",
        "upstreams": "benchmarks/mock_upstream.py, one process per upstream",
        "client": "asyncio + aiohttp open loop in the benchmark process, keep-alive",
        "machine": {
            **machine(),
            "load_average_before": [round(x, 2) for x in load[0]],
            "load_average_after": [round(x, 2) for x in load[1]],
        },
        "measured_at": time.time(),
    }
    document = {
        **figures,
        "targets": {f: f"{op} {t:g}" for f, (op, t, _) in TARGETS.items()},
        "passed": {f: _passed(f, v, scenarios.get(TARGETS[f][2])) for f, v in figures.items()},
        "scenarios": scenarios,
        "samples": "@SAMPLES@",
        "method": method,
    }
    text = json.dumps(document, indent=2)
    # the raw samples on few lines: thousands of numbers, one per line, help nobody
    text = text.replace('"@SAMPLES@"', json.dumps(samples, separators=(",", ":")))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")


def _report(path: Path) -> None:
    document = json.loads(path.read_text())
    rows = []
    for figure, (op, target, scenario) in TARGETS.items():
        value = document.get(figure)
        passed = document["passed"].get(figure)
        info = document["scenarios"].get(scenario, {})
        if passed is None:
            verdict = (
                info.get("not_measured", {}).get(figure)
                or info.get("skipped")
                or info.get("error", "not run")
            )
            verdict = verdict[:70]
        else:
            verdict = "PASS" if passed else "FAIL" if value is not None else "FAIL (never reached)"
        rows.append((figure, "-" if value is None else f"{value:g}", f"{op} {target:g}", verdict))
    print()
    print_table(
        "Reliability (xpuflow serve, mock upstreams on 127.0.0.1)",
        rows,
        ("figure", "value", "target", "result"),
    )
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    parser.add_argument(
        "--skip-litellm", action="store_true", help="storm: do not run the LiteLLM comparison"
    )
    parser.add_argument("--keepalive-requests", type=int, default=500, help="keepalive: requests per path")
    parser.add_argument(
        "--at-commit",
        metavar="REV",
        help="run the gateway from `git archive REV src` (e.g. HEAD) instead of the working tree, "
        "which others may be editing",
    )
    parser.add_argument("--fuzz-cases", type=int, default=5000, help="fuzz: cases to run")
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    parser.add_argument("--litellm-venv", default=str(cache / "xpuflow-bench" / "litellm-venv"))
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    bench = Bench(args)
    load_before = os.getloadavg()
    try:
        from uvloop import run as run_loop
    except ImportError:
        run_loop = asyncio.run
    try:
        results = run_loop(run(bench, names))
    finally:
        bench.close()
    _write(results, args, (load_before, os.getloadavg()))
    _report(RESULTS)


if __name__ == "__main__":
    main()
