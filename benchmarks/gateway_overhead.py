"""What a gateway adds on top of a model server: xpuflow beside nginx, vllm-router and the LiteLLM proxy.

One mock OpenAI server (``mock_upstream.py``: raw asyncio, answers every request at once) serves every
path, in one run:

- direct: client -> upstream;
- nginx: client -> nginx (Debian's ``nginx-light``, one worker, upstream keep-alive; the reverse-proxy
  floor) -> upstream, see ``anchor_proxies.py``;
- python_floor: client -> ``python_floor_proxy.py`` (one Python process on uvloop: httptools on both
  sides, ``json.loads`` of the body for its model, the answer's bytes relayed as they come; no gateway
  feature at all) -> upstream: what Python itself costs a proxy, the floor under xpuflow's figures;
- vllm_router: client -> vllm-router (the Rust router from PyPI, pinned, ``--policy round_robin``, in
  its own virtual environment under the cache folder) -> upstream;
- xpuflow: client -> ``xpuflow serve CONFIG`` (its own process, as users run it: one ``remote_openai``
  deployment of the upstream behind its worker queue and the logical-model router; ``max_batch_size``
  64, the greedy batch policy, 64 pooled connections; a second deployment alike, ``chat-long``, before
  the long-stream mock below) -> upstream;
- litellm: client -> ``litellm --config ... --num_workers 1`` (its own process; installed by this
  script into its own virtual environment under the cache folder on first use; one model, one upstream,
  retries off, logging at error level) -> upstream.

xpuflow and LiteLLM check the same bearer key (LiteLLM refuses to start without a master key); nginx
and vllm-router check none. A system that cannot run here is reported with what to install, and the
others are still measured; its figures are null, never estimated.

Latency, concurrency 1: one client process sends ``--warmup`` unmeasured requests per path, then
``--requests`` per path in blocks of ``--block`` consecutive requests, the paths taking turns block by
block in a rotating order (each path on its own keep-alive connection). Blocks keep each path's
processes as warm as a run of its own would, while background load on a shared machine falls on all
alike. The added p50 and p99 are a path's percentile minus the direct one, in the same run.

Streaming, concurrency 1: the same, with ``"stream": true`` (the mock answers with SSE events); the
time to first byte (the first body bytes, not the head) added over direct, for every path but LiteLLM.
Then the cost per streamed chunk: ``--streams`` streams of 200 token events (a second mock, 1 ms
between events, as a fast model server sends them), ``--stream-concurrency`` at a time, through
xpuflow; its CPU time over the measured phase divided by the SSE events delivered (so the request's own
cost is spread over its chunks).

Throughput, concurrency ``--concurrency`` (32), ``--rounds`` rounds in turn over the paths; in each, per
path, the aiohttp client (one process, ``--duration`` seconds after a 2 s warm-up) and then wrk
(``-t2 -c32 --latency``, a Lua script for the POST body, ``--wrk-duration`` seconds; LiteLLM gets
``--litellm-wrk-duration``); every other round takes the paths in reverse order, so that a machine that
speeds up or slows down during the run weighs on them alike. RPS are means over rounds (the paired ratio
of each round, xpuflow's wrk RPS over vllm-router's, is kept beside the headline). CPU per request is the
system's own CPU time (user + system, its whole process tree, so nginx's worker counts) over a measured
phase, divided by the requests served in that phase; the headline figure comes from the wrk runs.

Idle RSS: each system's process tree (psutil) 1 s after it answers its readiness check, before any
request.

    python benchmarks/gateway_overhead.py [--requests 500] [--duration 10] [--rounds 2]
                                          [--systems nginx,python_floor,vllm_router,xpuflow,litellm]
                                          [--skip-litellm]
                                          [--at-commit HEAD] [--event-loop uvloop]

Writes benchmarks/results/gateway_overhead.json: the headline figures (``direct_p50_ms``,
``xpuflow_added_p50_ms``, ``xpuflow_added_p50_vs_vllm_router``, ``xpuflow_cpu_ms_per_request``,
``xpuflow_rps_vs_vllm_router``, ``xpuflow_stream_ttfb_added_ms``, ``xpuflow_stream_chunk_cpu_us``,
``xpuflow_idle_rss_mb``, and per system ``<system>_added_p50_ms``, ``<system>_rps`` (aiohttp),
``<system>_rps_wrk``, ``<system>_cpu_ms_per_request``, ``<system>_idle_rss_mb``; LiteLLM's p99 and
xpuflow's too), then ``targets`` (goal and whether it is met), ``samples`` (raw latencies in ms per
path, and the streams' times to first byte) and ``method``. Targets (issue 15): xpuflow adds <= 0.35 ms
at p50 and <= 2x what vllm-router adds, spends <= 0.2 ms of CPU per request, serves >= 0.4x
vllm-router's RPS under wrk, adds <= 0.5 ms to a stream's first byte and idles in <= 80 MB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    cpu_s,
    export_source,
    free_port,
    remote_deployment,
    rss_mb,
    start_process,
    start_xpuflow,
    stop_process,
)
from anchor_proxies import LITELLM_CONFIG, start_litellm
from overhead_clients import BODY, LONG_STREAM_TOKEN_DELAY_S, LONG_STREAM_TOKENS, STREAM_BODY, headers

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gateway_overhead.json"
SYSTEMS = ("nginx", "python_floor", "vllm_router", "xpuflow", "litellm")
TARGETS = (  # key, comparison, goal (None: reported only)
    ("xpuflow_added_p50_ms", "<=", 0.35),
    ("xpuflow_added_p50_vs_vllm_router", "<=", 2.0),
    ("xpuflow_cpu_ms_per_request", "<=", 0.2),
    ("xpuflow_rps_vs_vllm_router", ">=", 0.4),
    ("xpuflow_stream_ttfb_added_ms", "<=", 0.5),
    ("xpuflow_stream_chunk_cpu_us", None, None),
    ("xpuflow_idle_rss_mb", "<=", 80.0),
)


def _client(args: argparse.Namespace, mode: str, *urls: str, cpu_pid: int = 0) -> dict[str, Any]:
    """Run one of ``overhead_clients.py``'s clients in its own process; what it measured."""
    argv = [sys.executable, str(HERE / "overhead_clients.py"), mode, "--api-key", args.api_key]
    argv += [a for url in urls for a in ("--url", url)]
    argv += ["--requests", str(args.requests), "--warmup", str(args.warmup), "--block", str(args.block)]
    argv += ["--concurrency", str(args.concurrency), "--duration", str(args.duration)]
    argv += ["--streams", str(args.streams), "--stream-concurrency", str(args.stream_concurrency)]
    argv += ["--cpu-pid", str(cpu_pid)]
    out = subprocess.run(
        argv, check=True, capture_output=True, timeout=args.requests * 3 + args.duration * 3 + 300
    )
    return dict(json.loads(out.stdout))


# -- processes --------------------------------------------------------------------------------------


def _xpuflow_config(
    upstream: str,
    api_key: str,
    event_loop: str | None = None,
    long_upstream: str | None = None,
    replicas: int = 1,
) -> dict[str, Any]:
    """One deployment, ``chat``, of ``upstream``; with ``long_upstream`` a second one, ``chat-long``, of
    the mock that streams long answers. ``replicas`` > 1: that many workers each, scored per request."""
    extra: dict[str, Any] = {} if replicas == 1 else {"replicas": replicas}
    deployments = [
        remote_deployment(
            name,
            url,
            max_batch_size=64,
            batching={"policy": "greedy", "queue_capacity": 1024},
            options={"max_connections": 64},
            **extra,
        )
        for name, url in (("chat", upstream), ("chat-long", long_upstream))
        if url is not None
    ]
    config: dict[str, Any] = {"deployments": deployments, "api_keys": [{"name": "bench", "key": api_key}]}
    if event_loop is not None:  # gateway.event_loop (left out by default: older commits lack the field)
        config["gateway"] = {"event_loop": event_loop}
    return config


# -- the run ----------------------------------------------------------------------------------------


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=500, help="measured requests per path at concurrency 1"
    )
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests per path first")
    parser.add_argument("--block", type=int, default=50, help="consecutive latency requests per path")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each aiohttp throughput run")
    parser.add_argument("--wrk-duration", type=float, default=10.0, help="seconds of each wrk run")
    parser.add_argument(
        "--litellm-wrk-duration", type=float, default=5.0, help="seconds of each wrk run on LiteLLM"
    )
    parser.add_argument("--rounds", type=int, default=2, help="throughput runs per path, in turn")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--streams", type=int, default=64, help="long streams for the per-chunk CPU")
    parser.add_argument("--stream-concurrency", type=int, default=8, help="long streams at a time")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated systems to measure beside direct, of {', '.join(SYSTEMS)} "
        "(e.g. --systems xpuflow,vllm_router for a quick look)",
    )
    parser.add_argument("--skip-litellm", action="store_true", help="leave litellm out of --systems")
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "xpuflow-bench"
    parser.add_argument("--litellm-venv", default=str(cache / "litellm-venv"))
    parser.add_argument("--vllm-router-venv", default=str(cache / "vllm-router-venv"))
    parser.add_argument(
        "--vllm-router-policy",
        default="round_robin",
        help="vllm-router's --policy (round_robin, or e.g. its default cache_aware)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="workers of xpuflow's deployment (each request scores them all; the anchors are unchanged); "
        "with more than 1 the JSON goes to results/gateway_overhead_replicas<N>.json unless --output",
    )
    parser.add_argument("--output", default=None, help="where the JSON goes (another path for trial runs)")
    parser.add_argument(
        "--at-commit",
        metavar="REV",
        help="run the gateway from `git archive REV src` instead of the working tree",
    )
    parser.add_argument(
        "--event-loop",
        choices=["auto", "uvloop", "asyncio"],
        help="gateway.event_loop for xpuflow serve (default: the config's default, auto)",
    )
    parser.add_argument("--client", choices=["latency", "stream", "rps", "chunks"], help=argparse.SUPPRESS)
    parser.add_argument("--url", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--cpu-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--api-key", default="sk-bench-" + secrets.token_hex(24), help=argparse.SUPPRESS)
    return parser


def parse_systems(text: str, skip_litellm: bool = False) -> list[str]:
    """The systems named in ``--systems`` (``vllm-router`` is accepted for ``vllm_router``), in the
    benchmark's own order; an unknown name lists the valid ones."""
    names = {part.strip().replace("-", "_") for part in text.split(",") if part.strip()}
    unknown = names - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown system(s) {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    return [name for name in SYSTEMS if name in names and not (skip_litellm and name == "litellm")]


def _start_system(
    name: str, args: argparse.Namespace, upstream: str, long_upstream: str, src: Path | None
) -> tuple[subprocess.Popen[bytes], str, dict[str, Any]]:
    """Start one system before ``upstream``; its process, its base URL and what was run."""
    from anchor_proxies import start_nginx, start_vllm_router

    if name == "nginx":
        return start_nginx(upstream)
    if name == "python_floor":
        port = free_port()
        argv = [sys.executable, str(HERE / "python_floor_proxy.py"), "--upstream", upstream]
        proc = start_process([*argv, "--port", str(port)], f"http://127.0.0.1:{port}/v1/models", 30)
        info = {"server": "python_floor_proxy.py: httptools + uvloop, reads the body's model, relays bytes"}
        return proc, f"http://127.0.0.1:{port}", info
    if name == "vllm_router":
        venv = Path(args.vllm_router_venv).expanduser()
        return start_vllm_router(upstream, venv, args.vllm_router_policy)
    if name == "xpuflow":
        config = _xpuflow_config(upstream, args.api_key, args.event_loop, long_upstream, args.replicas)
        proc, url = start_xpuflow(config, src=src)
        return proc, url, _xpuflow_info(args)
    config_text = LITELLM_CONFIG.format(upstream=upstream, master_key=args.api_key)
    proc, port, info = start_litellm(config_text, Path(args.litellm_venv).expanduser(), args.api_key)
    return proc, f"http://127.0.0.1:{port}", info


def _default_output(replicas: int) -> Path:
    return RESULTS if replicas == 1 else RESULTS.with_name(f"gateway_overhead_replicas{replicas}.json")


def _xpuflow_info(args: argparse.Namespace) -> dict[str, Any]:
    import uvicorn

    return {
        "server": f"xpuflow serve CONFIG (uvicorn {uvicorn.__version__}, as the CLI sets it up)",
        "config": _xpuflow_config(
            "http://127.0.0.1:PORT",
            "<the run's key>",
            args.event_loop,
            "http://127.0.0.1:PORT2",
            args.replicas,
        ),
        "engine": "Orchestrator (worker queue, dispatcher, router) -> remote_openai backend (its lean "
        "HTTP/1.1 client, backends/remote/http1.py, for an http:// upstream)",
        "product": args.product,
        "auth": "one bearer API key",
    }


def _wrk_round(name: str, url: str, pid: int, script: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One wrk run on ``url`` with the CPU time of process ``pid`` over it; an error is recorded."""
    from wrk_client import run_wrk

    duration_s = args.litellm_wrk_duration if name == "litellm" else args.wrk_duration
    cpu = cpu_s(pid)
    try:
        result = run_wrk(url, script, threads=2, connections=args.concurrency, duration_s=duration_s)
    except (subprocess.SubprocessError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:1000]}
    result["cpu_s"] = cpu_s(pid) - cpu
    result["cpu_ms_per_request"] = result["cpu_s"] * 1000.0 / max(1, result["requests"])
    return result


def _mean(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _measure(
    args: argparse.Namespace,
    procs: dict[str, subprocess.Popen[bytes]],
    urls: dict[str, str],
    runs: dict[str, dict[str, Any]],
    script: Path | None,
) -> None:
    """The latency, streaming and throughput phases; figures go into ``runs``."""
    print(f"latency at concurrency 1: {args.requests} requests per path, interleaved ...", flush=True)
    latency = _client(args, "latency", *(f"{name}={url}" for name, url in urls.items()))
    for name, samples in latency["samples_ms"].items():
        runs[name].update(
            p50_ms=_percentile(samples, 0.5),
            p99_ms=_percentile(samples, 0.99),
            mean_ms=statistics.fmean(samples),
            samples_ms=[round(s, 4) for s in samples],
            latency_errors=latency["errors"][name],
        )

    streamed = {name: url for name, url in urls.items() if name != "litellm"}
    print(f"streams at concurrency 1: time to first byte, {', '.join(streamed)} ...", flush=True)
    stream = _client(args, "stream", *(f"{name}={url}" for name, url in streamed.items()))
    for name, samples in stream["first_byte_ms"].items():
        runs[name].update(
            stream_ttfb_p50_ms=_percentile(samples, 0.5),
            stream_ttfb_p99_ms=_percentile(samples, 0.99),
            stream_total_p50_ms=_percentile(stream["samples_ms"][name], 0.5),
            stream_first_byte_ms=[round(s, 4) for s in samples],
            stream_errors=stream["errors"][name],
        )

    for round_ in range(args.rounds):
        # every other round in reverse order: a machine that speeds up or slows down during the run
        # (these are shared machines) weighs on every path alike, not on the ones measured last
        order = list(urls.items())
        if round_ % 2:
            order.reverse()
        for name, url in order:
            pid = procs["mock" if name == "direct" else name].pid
            print(f"throughput, round {round_ + 1}: {name} at concurrency {args.concurrency} ...", flush=True)
            runs[name].setdefault("rps_rounds", []).append(_client(args, "rps", url, cpu_pid=pid))
            if script is not None:
                runs[name].setdefault("wrk_rounds", []).append(_wrk_round(name, url, pid, script, args))
    for run in runs.values():
        run["rps"] = _mean(run["rps_rounds"], "rps")
        run["cpu_ms_per_request_aiohttp"] = _mean(run["rps_rounds"], "cpu_ms_per_request")
        wrk_rounds = run.get("wrk_rounds", [])
        run["rps_wrk"] = _mean(wrk_rounds, "rps")
        run["cpu_ms_per_request_wrk"] = _mean(wrk_rounds, "cpu_ms_per_request")
        run["wrk_p50_ms"] = _mean([r["latency_ms"] for r in wrk_rounds if "latency_ms" in r], "50")
        run["cpu_ms_per_request"] = run["cpu_ms_per_request_wrk"] or run["cpu_ms_per_request_aiohttp"]

    if "xpuflow" in urls:
        print(f"long streams through xpuflow: {args.streams} x {LONG_STREAM_TOKENS} tokens ...", flush=True)
        chunks = _client(args, "chunks", urls["xpuflow"], cpu_pid=procs["xpuflow"].pid)
        runs["xpuflow"]["long_streams"] = chunks
    for name in urls:
        if name != "direct":
            runs[name]["rss_after_load_mb"] = rss_mb(procs[name].pid)


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    if args.replicas < 1:
        parser.error(f"--replicas must be at least 1, got {args.replicas}")
    from wrk_client import WRK_INSTALL, write_script, wrk_binary

    systems = parse_systems(args.systems, args.skip_litellm)
    load_before = os.getloadavg()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    runs: dict[str, dict[str, Any]] = {}
    infos: dict[str, dict[str, Any]] = {name: {"error": "not in --systems"} for name in SYSTEMS}
    src: Path | None = None
    folder = Path(tempfile.mkdtemp(prefix="gateway-overhead-"))
    try:
        port, long_port = free_port(), free_port()
        upstream, long_upstream = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{long_port}"
        mock = [sys.executable, str(HERE / "mock_upstream.py")]
        procs["mock"] = start_process([*mock, "--port", str(port)], f"{upstream}/v1/models", 30)
        if "xpuflow" in systems:
            long_stream = ["--stream-tokens", str(LONG_STREAM_TOKENS)]
            long_stream += ["--token-delay-s", str(LONG_STREAM_TOKEN_DELAY_S)]
            procs["mock_long"] = start_process(
                [*mock, "--port", str(long_port), *long_stream], f"{long_upstream}/v1/models", 30
            )
        urls["direct"] = f"{upstream}/v1/chat/completions"
        runs["direct"] = {}

        args.product = "the working tree"
        if args.at_commit:
            src, commit = export_source(args.at_commit)
            args.product = f"commit {commit}"
        for name in systems:
            print(f"starting {name} ...", flush=True)
            try:
                procs[name], base, infos[name] = _start_system(name, args, upstream, long_upstream, src)
            except Exception as exc:  # measure the others even when one cannot run here
                if name == "xpuflow":
                    raise
                infos[name] = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
                print(f"  {name} could not be measured: {infos[name]['error'][:500]}", flush=True)
                continue
            time.sleep(1.0)
            runs[name] = {"idle_rss_mb": rss_mb(procs[name].pid)}
            urls[name] = f"{base}/v1/chat/completions"

        script = None
        if wrk_binary() is None:
            infos["wrk"] = {"error": f"wrk not found: {WRK_INSTALL}; the wrk figures are null"}
            print(f"  {infos['wrk']['error']}", flush=True)
        else:
            script = write_script(folder, BODY, headers(args.api_key))
            version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=30, check=False)
            infos["wrk"] = {"version": (version.stdout or version.stderr).splitlines()[0]}
        _measure(args, procs, urls, runs, script)
    finally:
        for proc in procs.values():
            stop_process(proc)
            shutil.rmtree(getattr(proc, "config_dir", ""), ignore_errors=True)
            if getattr(proc, "log_path", None):
                Path(proc.log_path).unlink(missing_ok=True)  # type: ignore[attr-defined]
        if src is not None:
            shutil.rmtree(src.parent, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    _report(runs, infos, args, (load_before, os.getloadavg()))


# -- the report -------------------------------------------------------------------------------------


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def figures(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline figures from the per-path results (a system that did not run gets nulls)."""
    direct = runs["direct"]

    def value(name: str, key: str) -> float | None:
        result = runs.get(name, {}).get(key)
        return None if result is None else float(result)

    def added(name: str, key: str) -> float | None:
        mine, base = value(name, key), value("direct", key)
        return None if mine is None or base is None else mine - base

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return None if numerator is None or not denominator or denominator <= 0 else numerator / denominator

    long_streams = runs.get("xpuflow", {}).get("long_streams")
    out: dict[str, Any] = {
        "direct_p50_ms": _round(direct.get("p50_ms")),
        "xpuflow_added_p50_ms": _round(added("xpuflow", "p50_ms")),
        "xpuflow_added_p50_vs_vllm_router": _round(
            ratio(added("xpuflow", "p50_ms"), added("vllm_router", "p50_ms")), 3
        ),
        "xpuflow_cpu_ms_per_request": _round(value("xpuflow", "cpu_ms_per_request")),
        "xpuflow_rps_vs_vllm_router": _round(
            ratio(value("xpuflow", "rps_wrk"), value("vllm_router", "rps_wrk")), 3
        ),
        "xpuflow_rps_vs_vllm_router_rounds": [
            _round(ratio(x.get("rps"), v.get("rps")), 3)
            for x, v in zip(
                runs.get("xpuflow", {}).get("wrk_rounds", []),
                runs.get("vllm_router", {}).get("wrk_rounds", []),
                strict=False,
            )
        ],
        "xpuflow_stream_ttfb_added_ms": _round(added("xpuflow", "stream_ttfb_p50_ms")),
        "xpuflow_stream_chunk_cpu_us": None
        if not long_streams
        else _round(long_streams["cpu_us_per_event"], 2),
        "xpuflow_idle_rss_mb": _round(value("xpuflow", "idle_rss_mb"), 1),
        "direct_rps_wrk": _round(value("direct", "rps_wrk"), 1),
    }
    for name in SYSTEMS:
        out[f"{name}_added_p50_ms"] = _round(added(name, "p50_ms"))
        out[f"{name}_added_p99_ms"] = _round(added(name, "p99_ms"))
        out[f"{name}_rps"] = _round(value(name, "rps"), 1)
        out[f"{name}_rps_wrk"] = _round(value(name, "rps_wrk"), 1)
        out[f"{name}_cpu_ms_per_request"] = _round(value(name, "cpu_ms_per_request"))
        out[f"{name}_idle_rss_mb"] = _round(value(name, "idle_rss_mb"), 1)
        if name != "litellm":
            out[f"{name}_stream_ttfb_added_ms"] = _round(added(name, "stream_ttfb_p50_ms"))
    return out


def targets(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of ``TARGETS``: its value, its goal and whether it is met (None: not measured, or
    reported only)."""
    out = {}
    for key, comparison, goal in TARGETS:
        value = figures.get(key)
        met = None
        if value is not None and goal is not None:
            met = value <= goal if comparison == "<=" else value >= goal
        out[key] = {"value": value, "goal": None if goal is None else f"{comparison} {goal:g}", "met": met}
    return out


def _report(
    runs: dict[str, dict[str, Any]],
    infos: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> None:
    import aiohttp

    headline = figures(runs)
    goals = targets(headline)
    method = {
        "description": __doc__,
        "systems": list(runs),
        "requests_per_path_at_concurrency_1": args.requests,
        "warmup_requests_per_path": args.warmup,
        "latency_block": args.block,
        "rps_concurrency": args.concurrency,
        "rps_duration_s": args.duration,
        "xpuflow_replicas": args.replicas,
        "wrk_duration_s": args.wrk_duration,
        "litellm_wrk_duration_s": args.litellm_wrk_duration,
        "rps_rounds": args.rounds,
        "long_streams": {
            "streams": args.streams,
            "concurrency": args.stream_concurrency,
            "token_events": LONG_STREAM_TOKENS,
            "token_delay_s": LONG_STREAM_TOKEN_DELAY_S,
        },
        "request_body": json.loads(BODY),
        "stream_request_body": json.loads(STREAM_BODY),
        "cpu_ms_per_request": "the system's process tree, user + system CPU over the measured phase over "
        "the requests served in it; from the wrk runs (from the aiohttp runs where wrk is missing; both per "
        "path under per_path)",
        **{name: infos.get(name, {}) for name in (*SYSTEMS, "wrk")},
        "client": f"aiohttp {aiohttp.__version__}, keep-alive, one process per measurement; and wrk",
        "per_path": {
            name: {k: v for k, v in run.items() if k not in ("samples_ms", "stream_first_byte_ms")}
            for name, run in runs.items()
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load[0]],
            "load_average_after": [round(x, 2) for x in load[1]],
        },
        "measured_at": time.time(),
    }
    samples = {name: run["samples_ms"] for name, run in runs.items()}
    stream_samples = {
        name: run["stream_first_byte_ms"] for name, run in runs.items() if "stream_first_byte_ms" in run
    }
    output = Path(args.output) if args.output else _default_output(args.replicas)
    output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        **headline,
        "targets": goals,
        "samples": samples,
        "stream_first_byte_samples": stream_samples,
        "method": method,
    }
    output.write_text(json.dumps(document, indent=2) + "\n")
    _print_tables(runs, infos, goals)
    print(f"load average before/after: {load[0][0]:.2f} / {load[1][0]:.2f}; wrote {output}")


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_tables(
    runs: dict[str, dict[str, Any]], infos: dict[str, dict[str, Any]], goals: dict[str, dict[str, Any]]
) -> None:
    direct = runs["direct"]
    columns = (
        ("p50 ms", 8), ("+p50 ms", 9), ("+p99 ms", 9), ("RPS aiohttp", 12), ("RPS wrk", 9),
        ("wrk p50 ms", 11), ("CPU ms/req", 11), ("+TTFB ms", 9), ("idle RSS", 10),
    )  # fmt: skip
    print()
    print(f"{'path':<12}" + "".join(f"{name:>{width}}" for name, width in columns))
    for name, run in runs.items():
        added = None if name == "direct" else run["p50_ms"] - direct["p50_ms"]
        added99 = None if name == "direct" else run["p99_ms"] - direct["p99_ms"]
        ttfb = run.get("stream_ttfb_p50_ms")
        ttfb_added = None if name == "direct" or ttfb is None else ttfb - direct["stream_ttfb_p50_ms"]
        rss = run.get("idle_rss_mb")
        cells = (
            _cell(run["p50_ms"], ".3f"), _cell(added, ".3f"), _cell(added99, ".3f"),
            _cell(run.get("rps"), ",.0f"), _cell(run.get("rps_wrk"), ",.0f"),
            _cell(run.get("wrk_p50_ms"), ".3f"), _cell(run.get("cpu_ms_per_request"), ".3f"),
            _cell(ttfb_added, ".3f"), "-" if rss is None else f"{rss:.0f} MB",
        )  # fmt: skip
        print(f"{name:<12}" + "".join(f"{c:>{w}}" for c, (_, w) in zip(cells, columns, strict=True)))
    for name, info in infos.items():
        if "error" in info:
            print(f"{name}: {info['error'][:300]}")
    print(f"\n{'target':<36}{'value':>10}{'goal':>10}  met")
    for key, goal in goals.items():
        met = {True: "yes", False: "NO", None: "-"}[goal["met"]]
        print(f"{key:<36}{_cell(goal['value'], '.4g'):>10}{goal['goal'] or 'reported':>10}  {met}")


if __name__ == "__main__":
    main()
