"""What a gateway adds on top of a model server: xpuflow against the LiteLLM proxy, one mock upstream.

One mock OpenAI server (``mock_upstream.py``: raw asyncio, answers every request at once) serves all
three paths, each measured by a client in its own process (aiohttp, keep-alive):

- direct: client -> upstream;
- xpuflow: client -> xpuflow gateway (its own process: uvicorn with uvloop and httptools, one worker;
  the engine is ``RemoteEngine``, which forwards through the ``remote_openai`` backend) -> upstream;
- LiteLLM: client -> ``litellm --config`` proxy (its own process, one worker; installed by this script
  into its own virtual environment under the cache folder; one model, one upstream, retries off,
  logging at error level) -> upstream.

Latency: concurrency 1, ``--requests`` sequential requests after ``--warmup`` unmeasured ones; the
added p50/p99 is the gateway's percentile minus the direct one. Throughput: concurrency 32 for
``--duration`` seconds after a 2 s warm-up. The gateways run one at a time (the other is stopped), and
the gateway's idle RSS is read (psutil, its process tree) once it answers ``/health``, before any load.

    python benchmarks/gateway_overhead.py [--requests 500] [--duration 10] [--skip-litellm]

Writes benchmarks/results/gateway_overhead.json: ``direct_p50_ms``, ``xpuflow_added_p50_ms``,
``xpuflow_added_p99_ms``, ``litellm_added_p50_ms``, ``litellm_added_p99_ms``, ``xpuflow_rps``,
``litellm_rps``, ``xpuflow_idle_rss_mb``, plus ``samples`` (raw latencies in ms) and ``method``. Goals:
xpuflow adds <= 1 ms at p50 and <= 1/15 of LiteLLM's, serves >= 10x LiteLLM's requests per second, and
idles in <= 150 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gateway_overhead.json"
BODY = json.dumps(
    {"model": "chat", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
).encode()
LITELLM_SPEC = "litellm[proxy]"


# -- client (runs in its own process) ---------------------------------------------------------------


def _headers(api_key: str) -> dict[str, str]:
    return {"content-type": "application/json", "authorization": f"Bearer {api_key}"}


async def _client_latency(url: str, api_key: str, requests: int, warmup: int) -> dict[str, Any]:
    import aiohttp

    samples, errors = [], 0
    headers = _headers(api_key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        for i in range(warmup + requests):
            start = time.perf_counter()
            async with http.post(url, data=BODY, headers=headers) as response:
                await response.read()
                ok = response.status == 200
            elapsed_ms = (time.perf_counter() - start) * 1000.0
            if i >= warmup:
                samples.append(elapsed_ms)
                errors += 0 if ok else 1
    return {"samples_ms": samples, "errors": errors}


async def _client_rps(
    url: str, api_key: str, concurrency: int, duration_s: float, warmup_s: float
) -> dict[str, Any]:
    import aiohttp

    headers = _headers(api_key)
    counts = {"ok": 0, "errors": 0}
    measuring = False

    async def worker(http: Any, deadline: float) -> None:
        while time.perf_counter() < deadline:
            try:
                async with http.post(url, data=BODY, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            if measuring:
                counts["ok" if ok else "errors"] += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        deadline = time.perf_counter() + warmup_s
        await asyncio.gather(*(worker(http, deadline) for _ in range(concurrency)))
        measuring = True
        start = time.perf_counter()
        await asyncio.gather(*(worker(http, start + duration_s) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "ok": counts["ok"],
        "errors": counts["errors"],
        "elapsed_s": elapsed,
        "rps": counts["ok"] / elapsed,
    }


def _client_main(args: argparse.Namespace) -> None:
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    if args.client == "latency":
        result = run(_client_latency(args.url, args.api_key, args.requests, args.warmup))
    else:
        result = run(_client_rps(args.url, args.api_key, args.concurrency, args.duration, 2.0))
    print(json.dumps(result))


# -- the xpuflow gateway (runs in its own process) ---------------------------------------------------


def _serve_xpuflow(port: int, upstream: str, api_key: str) -> None:
    import uvicorn

    from xpuflow.serving.app import create_app
    from xpuflow.serving.remote_engine import RemoteEngine
    from xpuflow.serving.settings import GatewaySettings

    engine = RemoteEngine.from_urls({"chat": (upstream, "mock")}, options={"max_connections": 64})
    app = create_app(engine, GatewaySettings(api_keys={api_key: "bench"}), lifespan=engine.lifespan)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


# -- orchestration ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_ok(url: str, timeout_s: float = 2.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except Exception:
        return False


def _start(
    argv: list[str], ready_url: str, timeout_s: float, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log = tempfile.NamedTemporaryFile(prefix="gateway-bench-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc.log_path = log.name  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{argv[0]} exited with {proc.returncode}; log: {Path(log.name).read_text()[-2000:]}"
            )
        if _http_ok(ready_url):
            return proc
        time.sleep(0.25)
    _stop(proc)
    raise RuntimeError(f"{' '.join(argv[:3])} did not answer {ready_url} within {timeout_s:g} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the group of the process we started, and only that
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def _rss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs) / (1 << 20)


def _client(mode: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--client", mode, "--url", url, "--api-key", args.api_key]
    argv += ["--requests", str(args.requests), "--warmup", str(args.warmup)]
    argv += ["--concurrency", str(args.concurrency), "--duration", str(args.duration)]
    out = subprocess.run(argv, check=True, capture_output=True, timeout=args.duration * 3 + 300)
    return dict(json.loads(out.stdout))


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def _measure(name: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    print(f"  {name}: latency at concurrency 1 ({args.requests} requests) ...", flush=True)
    latency = _client("latency", url, args)
    print(f"  {name}: throughput at concurrency {args.concurrency} ({args.duration:g} s) ...", flush=True)
    rps = _client("rps", url, args)
    samples = latency["samples_ms"]
    return {
        "p50_ms": _percentile(samples, 0.5),
        "p99_ms": _percentile(samples, 0.99),
        "samples_ms": [round(s, 4) for s in samples],
        "latency_errors": latency["errors"],
        "rps": rps["rps"],
        "rps_errors": rps["errors"],
    }


def _litellm_venv(args: argparse.Namespace) -> tuple[Path, str]:
    """The LiteLLM proxy binary (installed on first use) and its version."""
    venv = Path(args.litellm_venv).expanduser()
    binary = venv / "bin" / "litellm"
    python = venv / "bin" / "python"
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


def _run_litellm(upstream: str, args: argparse.Namespace) -> dict[str, Any]:
    binary, version = _litellm_venv(args)
    port = _free_port()
    config = Path(tempfile.mkdtemp(prefix="litellm-bench-")) / "config.yaml"
    config.write_text(LITELLM_CONFIG.format(upstream=upstream, master_key=args.api_key))
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list from the internet
        "LITELLM_TELEMETRY": "False",
        "DISABLE_ADMIN_UI": "True",
    }
    argv = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1"]
    proc = _start(argv, f"http://127.0.0.1:{port}/health/liveliness", timeout_s=180, env=env)
    try:
        time.sleep(1.0)
        rss = _rss_mb(proc.pid)
        result = _measure("litellm", f"http://127.0.0.1:{port}/v1/chat/completions", args)
    finally:
        _stop(proc)
    shown = LITELLM_CONFIG.replace("{master_key}", "<random per run>")
    return {**result, "idle_rss_mb": rss, "version": version, "config": shown, "argv": argv[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="measured requests at concurrency 1")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests first")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of the throughput run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--skip-litellm", action="store_true")
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    parser.add_argument("--litellm-venv", default=str(cache / "xpuflow-bench" / "litellm-venv"))
    parser.add_argument("--client", choices=["latency", "rps"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--serve-xpuflow", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--api-key", default="sk-bench-" + secrets.token_hex(24), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        _client_main(args)
        return
    if args.serve_xpuflow:
        _serve_xpuflow(args.serve_xpuflow, args.upstream, args.api_key)
        return

    upstream_port = _free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    mock = _start(
        [sys.executable, str(HERE / "mock_upstream.py"), "--port", str(upstream_port)],
        f"{upstream}/v1/models",
        timeout_s=30,
    )
    results: dict[str, Any] = {}
    litellm: dict[str, Any] = {}
    try:
        print("direct to the mock upstream", flush=True)
        results["direct"] = _measure("direct", f"{upstream}/v1/chat/completions", args)

        print("through xpuflow", flush=True)
        port = _free_port()
        argv = [sys.executable, __file__, "--serve-xpuflow", str(port), "--upstream", upstream]
        argv += ["--api-key", args.api_key]
        gateway = _start(argv, f"http://127.0.0.1:{port}/health", timeout_s=60)
        try:
            time.sleep(1.0)
            idle_rss = _rss_mb(gateway.pid)
            results["xpuflow"] = _measure("xpuflow", f"http://127.0.0.1:{port}/v1/chat/completions", args)
            results["xpuflow"]["idle_rss_mb"] = idle_rss
            results["xpuflow"]["rss_after_load_mb"] = _rss_mb(gateway.pid)
        finally:
            _stop(gateway)

        if args.skip_litellm:
            litellm = {"error": "skipped (--skip-litellm)"}
        else:
            print("through the LiteLLM proxy", flush=True)
            try:
                results["litellm"] = _run_litellm(upstream, args)
                litellm = {k: results["litellm"][k] for k in ("version", "config", "argv")}
            except Exception as exc:  # report xpuflow's figures even when LiteLLM cannot run here
                litellm = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                print(f"  LiteLLM could not be measured: {litellm['error'][:300]}", flush=True)
    finally:
        _stop(mock)

    _report(results, litellm, args)


def _report(results: dict[str, Any], litellm: dict[str, Any], args: argparse.Namespace) -> None:
    direct, xpuflow, lite = results["direct"], results["xpuflow"], results.get("litellm")

    def added(run: dict[str, Any] | None, key: str) -> float | None:
        return None if run is None else round(run[key] - direct[key], 4)

    import aiohttp
    import uvicorn

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
        "requests_at_concurrency_1": args.requests,
        "warmup_requests": args.warmup,
        "rps_concurrency": args.concurrency,
        "rps_duration_s": args.duration,
        "request_body": json.loads(BODY),
        "xpuflow": {
            "server": f"uvicorn {uvicorn.__version__} (uvloop, httptools, 1 worker, access log off)",
            "engine": "RemoteEngine -> remote_openai (aiohttp, max_connections 64)",
            "auth": "one bearer API key (LiteLLM: the same key as its master key)",
        },
        "litellm": litellm,
        "client": f"aiohttp {aiohttp.__version__}, one process per measurement, keep-alive",
        "per_path": {
            name: {k: v for k, v in run.items() if k != "samples_ms"} for name, run in results.items()
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "measured_at": time.time(),
    }
    samples = {name: run["samples_ms"] for name, run in results.items()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({**figures, "samples": samples, "method": method}, indent=2) + "\n")

    print()
    columns = ("p50 ms", 10), ("p99 ms", 10), ("added p50", 12), ("added p99", 12), ("RPS @32", 10)
    print(f"{'path':<10}" + "".join(f"{name:>{width}}" for name, width in columns) + f"{'idle RSS':>11}")
    for name, run in results.items():
        a50 = None if name == "direct" else run["p50_ms"] - direct["p50_ms"]
        a99 = None if name == "direct" else run["p99_ms"] - direct["p99_ms"]
        rss = run.get("idle_rss_mb")
        print(
            f"{name:<10}{run['p50_ms']:>10.3f}{run['p99_ms']:>10.3f}"
            f"{'-' if a50 is None else f'{a50:.3f}':>12}{'-' if a99 is None else f'{a99:.3f}':>12}"
            f"{run['rps']:>10,.0f}{'-' if rss is None else f'{rss:.0f} MB':>11}"
        )
    if lite is not None:
        ratio_p50 = (lite["p50_ms"] - direct["p50_ms"]) / max(1e-9, xpuflow["p50_ms"] - direct["p50_ms"])
        ratio_rps = xpuflow["rps"] / lite["rps"]
        print(f"\nLiteLLM adds {ratio_p50:.1f}x xpuflow's p50; xpuflow serves {ratio_rps:.1f}x its RPS")
    else:
        print(f"\nLiteLLM: {litellm.get('error')}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
