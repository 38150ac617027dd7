"""What a gateway adds on top of a model server: xpuflow next to the LiteLLM proxy, one mock upstream.

One mock OpenAI server (``mock_upstream.py``: raw asyncio, answers every request at once) serves three
paths, in one run:

- direct: client -> upstream;
- xpuflow: client -> ``xpuflow serve CONFIG`` (its own process, as users run it: one ``remote_openai``
  deployment of the upstream behind its worker queue and the logical-model router; ``max_batch_size``
  64, the greedy batch policy, 64 pooled connections) -> upstream;
- LiteLLM: client -> ``litellm --config ... --num_workers 1`` (its own process; installed by this
  script into its own virtual environment under the cache folder on first use; one model, one upstream,
  retries off, logging at error level) -> upstream.

Both gateways check the same bearer key (LiteLLM refuses to start without a master key).

Latency, concurrency 1: one client process sends ``--warmup`` unmeasured requests per path, then
``--requests`` per path in blocks of ``--block`` consecutive requests, the paths taking turns block by
block in a rotating order (each path on its own keep-alive connection). Blocks keep each path's
processes as warm as a run of its own would, while background load on a shared machine falls on all
three alike. The added p50 and p99 are a gateway's percentile minus the direct one.

Throughput, concurrency 32: one client process per run, ``--duration`` seconds after a 2 s warm-up,
``--rounds`` rounds in turn over the paths; the RPS is the mean over rounds. The CPU time the gateway
process spent per request in those runs is recorded too (a figure that background load barely moves).

Idle RSS: the gateway's process tree (psutil) once it answers its health check, before any request.

    python benchmarks/gateway_overhead.py [--requests 500] [--duration 10] [--rounds 2] [--skip-litellm]
                                          [--at-commit HEAD]

Writes benchmarks/results/gateway_overhead.json: ``direct_p50_ms``, ``xpuflow_added_p50_ms``,
``xpuflow_added_p99_ms``, ``litellm_added_p50_ms``, ``litellm_added_p99_ms``, ``xpuflow_rps``,
``litellm_rps``, ``xpuflow_idle_rss_mb``, then ``samples`` (raw latencies in ms per path) and ``method``.
Goals: xpuflow adds <= 1 ms at p50 and <= 1/15 of LiteLLM's, serves >= 10x LiteLLM's requests per second
and idles in <= 150 MB.
"""

from __future__ import annotations

import argparse
import asyncio
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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gateway_overhead.json"
BODY = json.dumps(
    {"model": "chat", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
).encode()
LITELLM_SPEC = "litellm[proxy]"
LITELLM_CONFIG = """\
model_list:
  - model_name: chat
    litellm_params:
      model: openai/mock
      api_base: {upstream}/v1
      api_key: sk-mock
      max_retries: 0
general_settings:
  master_key: {master_key}
litellm_settings:
  num_retries: 0
  request_timeout: 30
  set_verbose: false
  telemetry: false
router_settings:
  num_retries: 0
"""


# -- clients (each runs in its own process) ----------------------------------------------------------


def _headers(api_key: str) -> dict[str, str]:
    return {"content-type": "application/json", "authorization": f"Bearer {api_key}"}


async def _client_latency(
    urls: dict[str, str], api_key: str, requests: int, warmup: int, block: int
) -> dict[str, Any]:
    import aiohttp

    headers = _headers(api_key)
    names = list(urls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    errors = dict.fromkeys(names, 0)
    sessions = {name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for name in names}

    async def one(name: str) -> tuple[float, bool]:
        start = time.perf_counter()
        async with sessions[name].post(urls[name], data=BODY, headers=headers) as response:
            await response.read()
            return (time.perf_counter() - start) * 1000.0, response.status == 200

    try:
        for name in names:
            for _ in range(warmup):
                await one(name)
        for i in range(math.ceil(requests / block)):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:  # rotate, so no path always goes first
                for _ in range(min(block, requests - len(samples[name]))):
                    elapsed_ms, ok = await one(name)
                    samples[name].append(elapsed_ms)
                    errors[name] += 0 if ok else 1
    finally:
        for session in sessions.values():
            await session.close()
    return {"samples_ms": samples, "errors": errors}


async def _client_rps(
    url: str, api_key: str, concurrency: int, duration_s: float, warmup_s: float
) -> dict[str, Any]:
    import aiohttp

    headers = _headers(api_key)
    counts = {"ok": 0, "errors": 0, "warmup": 0}
    measuring = False

    async def worker(http: Any, deadline: float) -> None:
        while time.perf_counter() < deadline:
            try:
                async with http.post(url, data=BODY, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            counts["warmup" if not measuring else "ok" if ok else "errors"] += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        deadline = time.perf_counter() + warmup_s
        await asyncio.gather(*(worker(http, deadline) for _ in range(concurrency)))
        measuring = True
        start = time.perf_counter()
        await asyncio.gather(*(worker(http, start + duration_s) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {**counts, "elapsed_s": elapsed, "rps": counts["ok"] / elapsed}


def _client_main(args: argparse.Namespace) -> None:
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    if args.client == "latency":
        urls = dict(item.split("=", 1) for item in args.url)
        result = run(_client_latency(urls, args.api_key, args.requests, args.warmup, args.block))
    else:
        result = run(_client_rps(args.url[0], args.api_key, args.concurrency, args.duration, 2.0))
    print(json.dumps(result))


# -- processes --------------------------------------------------------------------------------------


def _xpuflow_config(upstream: str, api_key: str, event_loop: str | None = None) -> dict[str, Any]:
    deployment = remote_deployment(
        "chat",
        upstream,
        max_batch_size=64,
        batching={"policy": "greedy", "queue_capacity": 1024},
        options={"max_connections": 64},
    )
    config: dict[str, Any] = {"deployments": [deployment], "api_keys": [{"name": "bench", "key": api_key}]}
    if event_loop is not None:  # gateway.event_loop (left out by default: older commits lack the field)
        config["gateway"] = {"event_loop": event_loop}
    return config


def _client(args: argparse.Namespace, mode: str, *urls: str) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--client", mode, "--api-key", args.api_key]
    argv += [a for url in urls for a in ("--url", url)]
    argv += ["--requests", str(args.requests), "--warmup", str(args.warmup), "--block", str(args.block)]
    argv += ["--concurrency", str(args.concurrency), "--duration", str(args.duration)]
    out = subprocess.run(
        argv, check=True, capture_output=True, timeout=args.requests * 3 + args.duration * 3 + 300
    )
    return dict(json.loads(out.stdout))


def litellm_venv(venv: Path) -> tuple[Path, str]:
    """The LiteLLM proxy binary in ``venv`` (installed there on first use) and its version; also used
    by ``reliability.py``."""
    binary, python = venv / "bin" / "litellm", venv / "bin" / "python"
    if not binary.exists():
        print(f"installing {LITELLM_SPEC} into {venv} (first run only) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", LITELLM_SPEC],
            check=True,
            timeout=1800,
            capture_output=True,
        )
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    return binary, version


def start_litellm(
    config_text: str, venv: Path, api_key: str
) -> tuple[subprocess.Popen[bytes], int, dict[str, Any]]:
    """Start the LiteLLM proxy (one worker, error-level logs, no price-list fetch) on a free port with
    ``config_text`` as its config; the config folder goes with the process (``proc.config_dir``).
    Returns the process, its port and what was run (the key redacted). Used by reliability.py too."""
    binary, version = litellm_venv(venv)
    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="litellm-bench-")) / "config.yaml"
    config.write_text(config_text)
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list from the internet
        "LITELLM_TELEMETRY": "False",
    }
    argv = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1"]
    try:
        proc = start_process(argv, f"http://127.0.0.1:{port}/health/liveliness", timeout_s=240, env=env)
    except BaseException:
        shutil.rmtree(config.parent, ignore_errors=True)
        raise
    proc.config_dir = config.parent  # type: ignore[attr-defined]  # removed with the process
    info = {
        "version": version,
        "config": config_text.replace(api_key, "<the run's key>"),
        "argv": ["litellm", *argv[1:]],
        "env": {k: env[k] for k in ("LITELLM_LOG", "LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_TELEMETRY")},
    }
    return proc, port, info


# -- the run ----------------------------------------------------------------------------------------


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=500, help="measured requests per path at concurrency 1"
    )
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests per path first")
    parser.add_argument("--block", type=int, default=50, help="consecutive latency requests per path")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each throughput run")
    parser.add_argument("--rounds", type=int, default=2, help="throughput runs per path, in turn")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--skip-litellm", action="store_true")
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    parser.add_argument("--litellm-venv", default=str(cache / "xpuflow-bench" / "litellm-venv"))
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
    parser.add_argument("--client", choices=["latency", "rps"], help=argparse.SUPPRESS)
    parser.add_argument("--url", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--api-key", default="sk-bench-" + secrets.token_hex(24), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        _client_main(args)
        return

    load_before = os.getloadavg()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    runs: dict[str, dict[str, Any]] = {}
    litellm: dict[str, Any] = {}
    src: Path | None = None
    try:
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        procs["mock"] = start_process(
            [sys.executable, str(HERE / "mock_upstream.py"), "--port", str(port)], f"{upstream}/v1/models", 30
        )
        urls["direct"] = f"{upstream}/v1/chat/completions"
        runs["direct"] = {}

        args.product = "the working tree"
        if args.at_commit:
            src, commit = export_source(args.at_commit)
            args.product = f"commit {commit}"
        procs["xpuflow"], gateway = start_xpuflow(
            _xpuflow_config(upstream, args.api_key, args.event_loop), src=src
        )
        time.sleep(1.0)
        runs["xpuflow"] = {"idle_rss_mb": rss_mb(procs["xpuflow"].pid)}
        urls["xpuflow"] = f"{gateway}/v1/chat/completions"

        if args.skip_litellm:
            litellm = {"error": "skipped (--skip-litellm)"}
        else:
            print("starting the LiteLLM proxy (installing it on first use) ...", flush=True)
            try:
                procs["litellm"], port, litellm = start_litellm(
                    LITELLM_CONFIG.format(upstream=upstream, master_key=args.api_key),
                    Path(args.litellm_venv).expanduser(),
                    args.api_key,
                )
                time.sleep(1.0)
                runs["litellm"] = {"idle_rss_mb": rss_mb(procs["litellm"].pid)}
                urls["litellm"] = f"http://127.0.0.1:{port}/v1/chat/completions"
            except Exception as exc:  # report xpuflow's figures even when LiteLLM cannot run here
                litellm = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
                print(f"  LiteLLM could not be measured: {litellm['error'][:500]}", flush=True)

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

        for round_ in range(args.rounds):
            for name, url in urls.items():
                print(
                    f"throughput, round {round_ + 1}: {name} at concurrency {args.concurrency} ...",
                    flush=True,
                )
                pid = procs["mock" if name == "direct" else name].pid
                others = {n: cpu_s(p.pid) for n, p in procs.items() if n not in ("mock", name)}
                cpu = cpu_s(pid)
                result = _client(args, "rps", url)
                sent = result["ok"] + result["errors"] + result["warmup"]
                result["gateway_cpu_ms_per_request"] = (cpu_s(pid) - cpu) * 1000.0 / max(1, sent)
                result["idle_cpu_s_of_the_others"] = {n: cpu_s(procs[n].pid) - c for n, c in others.items()}
                runs[name].setdefault("rps_rounds", []).append(result)
        for run in runs.values():
            run["rps"] = statistics.fmean(r["rps"] for r in run["rps_rounds"])
            run["cpu_ms_per_request"] = statistics.fmean(
                r["gateway_cpu_ms_per_request"] for r in run["rps_rounds"]
            )
        if "xpuflow" in procs:
            runs["xpuflow"]["rss_after_load_mb"] = rss_mb(procs["xpuflow"].pid)
        if "litellm" in procs:
            runs["litellm"]["rss_after_load_mb"] = rss_mb(procs["litellm"].pid)
    finally:
        for proc in procs.values():
            stop_process(proc)
            shutil.rmtree(getattr(proc, "config_dir", ""), ignore_errors=True)
            if getattr(proc, "log_path", None):
                Path(proc.log_path).unlink(missing_ok=True)  # type: ignore[attr-defined]
        if src is not None:
            shutil.rmtree(src.parent, ignore_errors=True)
    _report(runs, litellm, args, (load_before, os.getloadavg()))


def _report(
    runs: dict[str, dict[str, Any]],
    litellm: dict[str, Any],
    args: argparse.Namespace,
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> None:
    import aiohttp
    import uvicorn

    direct, xpuflow, lite = runs["direct"], runs["xpuflow"], runs.get("litellm")

    def added(run: dict[str, Any] | None, key: str) -> float | None:
        return None if run is None else round(run[key] - direct[key], 4)

    figures: dict[str, Any] = {
        "direct_p50_ms": round(direct["p50_ms"], 4),
        "xpuflow_added_p50_ms": added(xpuflow, "p50_ms"),
        "xpuflow_added_p99_ms": added(xpuflow, "p99_ms"),
        "litellm_added_p50_ms": added(lite, "p50_ms"),
        "litellm_added_p99_ms": added(lite, "p99_ms"),
        "xpuflow_rps": round(xpuflow["rps"], 1),
        "litellm_rps": None if lite is None else round(lite["rps"], 1),
        "xpuflow_idle_rss_mb": round(xpuflow["idle_rss_mb"], 1),
    }
    method = {
        "description": __doc__,
        "requests_per_path_at_concurrency_1": args.requests,
        "warmup_requests_per_path": args.warmup,
        "latency_block": args.block,
        "rps_concurrency": args.concurrency,
        "rps_duration_s": args.duration,
        "rps_rounds": args.rounds,
        "request_body": json.loads(BODY),
        "xpuflow": {
            "server": f"xpuflow serve CONFIG (uvicorn {uvicorn.__version__}, as the CLI sets it up)",
            "config": _xpuflow_config("http://127.0.0.1:PORT", "<the run's key>"),
            "engine": "Orchestrator (worker queue, dispatcher, router) -> remote_openai backend (aiohttp)",
            "product": args.product,
            "auth": "one bearer API key",
        },
        "litellm": litellm,
        "client": f"aiohttp {aiohttp.__version__}, keep-alive, one process per measurement",
        "per_path": {name: {k: v for k, v in run.items() if k != "samples_ms"} for name, run in runs.items()},
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
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({**figures, "samples": samples, "method": method}, indent=2) + "\n")

    columns = ("p50 ms", 9), ("p99 ms", 9), ("+p50 ms", 9), ("+p99 ms", 9), ("RPS @32", 9), ("CPU ms/req", 11)
    print()
    print(f"{'path':<9}" + "".join(f"{name:>{width}}" for name, width in columns) + f"{'idle RSS':>10}")
    for name, run in runs.items():
        a50 = "-" if name == "direct" else f"{run['p50_ms'] - direct['p50_ms']:.3f}"
        a99 = "-" if name == "direct" else f"{run['p99_ms'] - direct['p99_ms']:.3f}"
        rss = f"{run['idle_rss_mb']:.0f} MB" if "idle_rss_mb" in run else "-"
        print(
            f"{name:<9}{run['p50_ms']:>9.3f}{run['p99_ms']:>9.3f}{a50:>9}{a99:>9}"
            f"{run['rps']:>9,.0f}{run['cpu_ms_per_request']:>11.3f}{rss:>10}"
        )
    if lite is not None:
        ratio_p50 = (lite["p50_ms"] - direct["p50_ms"]) / max(1e-9, xpuflow["p50_ms"] - direct["p50_ms"])
        ratio_rps = xpuflow["rps"] / lite["rps"]
        print(f"\nLiteLLM adds {ratio_p50:.1f}x xpuflow's p50; xpuflow serves {ratio_rps:.1f}x its RPS")
    else:
        print(f"\nLiteLLM: {litellm.get('error')}")
    print(f"load average before/after: {load[0][0]:.2f} / {load[1][0]:.2f}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
