"""Where ``xpuflow serve``'s time goes per request, and a same-run before/after of the gateway's hot path.

One mock upstream (``mock_upstream.py``) and one or two gateways, each ``xpuflow serve CONFIG`` in its own
process with ``gateway_overhead.py``'s config: the working tree (``after``) and, with ``--baseline REV``,
the package of commit REV (``before``). For each gateway, in turn:

1. Latency at concurrency 1: one client process over direct, before and after in rotating blocks of
   ``--block`` (one keep-alive connection per path); added p50 = path p50 - direct p50, to the last byte
   and to the first body bytes (``ttfb``: for a stream, its first event).
2. CPU per request: a throughput client in its own process (aiohttp; concurrency ``--concurrency``,
   ``--duration`` s after a 2 s warm-up; with ``--wrk``, wrk ``-t2`` with as many connections, the load
   the headline of ``gateway_overhead.py`` is measured under), the gateway process's own CPU time over
   the requests sent, and the RPS; ``--rounds`` rounds, the gateways taking turns, the first of a round
   alternating. With ``--baseline``, each round's after/before CPU ratio is kept and their median
   reported (``after_vs_before_cpu_median``): the sides ran back to back, so the ratio holds where the
   machine's speed drifts.
3. Profile: py-spy (``--profile-rate`` per second, non-blocking, only samples that hold the GIL) on the
   gateway while the same throughput client runs once more. ``summarize_profile`` of ``engines.py``
   turns the samples into on-CPU milliseconds per request by group (the innermost xpuflow frame on the
   stack: the HTTP app, the engine, the remote client; else the library at the leaf) plus the xpuflow
   functions with the most inclusive time and the frames with the most self time. Sampling slows the
   process, so the profile's absolute figures run above step 2's; its shares are what it is for.

    python benchmarks/gateway_profile.py [--baseline REV] [--duration 6] [--rounds 2] [--stream] [--wrk]

``--stream`` sends ``"stream": true`` requests in all steps (the mock's SSE answer), so the figures are
the streamed path's. Writes benchmarks/results/gateway_profile.json (``--output`` for another file):
per side its added p50, RPS, CPU ms per request and profile, and ``method``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
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
from _common import cpu_s, export_source, free_port, start_process, start_xpuflow, stop_process
from gateway_overhead import _xpuflow_config

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gateway_profile.json"


_MESSAGES = [{"role": "user", "content": "Say hello."}]


def _body(stream: bool) -> bytes:
    body: dict[str, Any] = {"model": "chat", "messages": _MESSAGES, "max_tokens": 16}
    return json.dumps({**body, "stream": True} if stream else body).encode()


async def _latency(urls: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Concurrency 1, one keep-alive connection per path, the paths taking turns in rotating blocks:
    per path the milliseconds to the last byte and to the first body bytes."""
    import aiohttp

    body, names = _body(args.stream), list(urls)
    samples: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, list[float]] = {n: [] for n in names}
    errors = dict.fromkeys(names, 0)
    sessions = {n: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for n in names}

    async def one(name: str) -> tuple[float, float, bool]:
        start = time.perf_counter()
        async with sessions[name].post(urls[name], data=body, headers=_headers(args)) as response:
            await response.content.readany()
            ttfb = time.perf_counter()
            await response.read()
            end = time.perf_counter()
            return (end - start) * 1000.0, (ttfb - start) * 1000.0, response.status == 200

    try:
        for name in names:
            for _ in range(args.warmup):
                await one(name)
        for i in range(math.ceil(args.requests / args.block)):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                for _ in range(min(args.block, args.requests - len(samples[name]))):
                    total_ms, first_ms, ok = await one(name)
                    samples[name].append(total_ms)
                    first[name].append(first_ms)
                    errors[name] += 0 if ok else 1
    finally:
        for session in sessions.values():
            await session.close()
    return {"samples_ms": samples, "first_byte_ms": first, "errors": errors}


async def _rps(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """``--concurrency`` clients without pause, a 2 s warm-up, then ``--duration`` s measured."""
    import aiohttp

    body, counts = _body(args.stream), {"ok": 0, "errors": 0, "warmup": 0}
    measuring = False

    async def worker(http: Any, deadline: float) -> None:
        while time.perf_counter() < deadline:
            try:
                async with http.post(url, data=body, headers=_headers(args)) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            counts["warmup" if not measuring else "ok" if ok else "errors"] += 1

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        deadline = time.perf_counter() + 2.0
        await asyncio.gather(*(worker(http, deadline) for _ in range(args.concurrency)))
        measuring = True
        start = time.perf_counter()
        await asyncio.gather(*(worker(http, start + args.duration) for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
    return {**counts, "elapsed_s": elapsed, "rps": counts["ok"] / elapsed}


def _headers(args: argparse.Namespace) -> dict[str, str]:
    return {"content-type": "application/json", "authorization": f"Bearer {args.api_key}"}


def _client(args: argparse.Namespace, mode: str, *urls: str) -> dict[str, Any]:
    """A load client in a process of its own (this file with ``--client``), so that its CPU time is
    not the benchmark's; it prints one JSON object."""
    argv = [sys.executable, __file__, "--client", mode, "--api-key", args.api_key]
    argv += [a for url in urls for a in ("--url", url)]
    argv += ["--requests", str(args.requests), "--warmup", str(args.warmup), "--block", str(args.block)]
    argv += ["--concurrency", str(args.concurrency), "--duration", str(args.duration)]
    argv += ["--stream"] if args.stream else []
    timeout_s = args.requests * 3 + args.duration * 3 + 300
    out = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the {mode} client failed: {out.stderr.decode(errors='replace')[-2000:]}")
    return dict(json.loads(out.stdout))


def _client_main(args: argparse.Namespace) -> None:
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    if args.client == "latency":
        urls = dict(item.split("=", 1) for item in args.url)
        print(json.dumps(run(_latency(urls, args))))
    else:
        print(json.dumps(run(_rps(args.url[0], args))))


def _profile(pid: int, url: str, args: argparse.Namespace) -> dict[str, Any]:
    from engines import _py_spy, summarize_profile

    spy = _py_spy()
    if spy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    with tempfile.TemporaryDirectory(prefix="xpuflow-gateway-profile-") as tmp:
        out = Path(tmp) / "profile.txt"
        argv = [spy, "record", "-p", str(pid), "-r", str(args.profile_rate), "-f", "raw", "--nolineno"]
        spy_proc = subprocess.Popen(
            [*argv, "--gil", "--nonblocking", "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(1.0)  # attach
            if spy_proc.poll() is not None:
                error = spy_proc.stderr.read().decode(errors="replace") if spy_proc.stderr else ""
                return {"skipped": f"py-spy could not attach: {error.strip()[-300:]}"}
            result = _client(args, "rps", url)
        finally:
            spy_proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
            try:
                spy_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy_proc.kill()
                spy_proc.wait()
        raw = out.read_text() if out.exists() else ""
    if args.profile_dir:
        keep = Path(args.profile_dir)
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"{len(list(keep.iterdir()))}.txt").write_text(raw)
    # requests sent while sampling: the warm-up's and the measured ones
    sent = result["ok"] + result["errors"] + result["warmup"]
    return {**summarize_profile(raw, sent, args.profile_rate), "rps_while_sampled": round(result["rps"], 1)}


def _wrk_script(args: argparse.Namespace) -> Path:
    from wrk_client import WRK_INSTALL, write_script, wrk_binary

    if wrk_binary() is None:
        raise SystemExit(f"--wrk: wrk not found: {WRK_INSTALL}")
    folder = Path(tempfile.mkdtemp(prefix="xpuflow-profile-wrk-"))
    return write_script(folder, _body(args.stream), _headers(args))


def _wrk_rps(url: str, pid: int, script: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Step 2 under wrk: a 2 s warm-up run, then the measured one with the gateway's CPU time over it."""
    from wrk_client import run_wrk

    run_wrk(url, script, threads=2, connections=args.concurrency, duration_s=2.0)
    cpu = cpu_s(pid)
    result = run_wrk(url, script, threads=2, connections=args.concurrency, duration_s=args.duration)
    result["cpu_ms_per_request"] = (cpu_s(pid) - cpu) * 1000.0 / max(1, result["requests"])
    return result


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="REV", help="also profile the gateway of commit REV (before)")
    parser.add_argument("--requests", type=int, default=400, help="latency requests per path")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of each throughput run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profile-rate", type=int, default=500)
    parser.add_argument("--profile-dir", help="keep the raw py-spy profiles in this folder")
    parser.add_argument("--no-profile", action="store_true", help="skip step 3")
    parser.add_argument("--stream", action="store_true", help="streamed requests (SSE) throughout")
    parser.add_argument(
        "--wrk",
        action="store_true",
        help="step 2 under wrk (-t2, --concurrency connections) instead of the aiohttp client",
    )
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--client", choices=["latency", "rps"], help=argparse.SUPPRESS)
    parser.add_argument("--url", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--api-key", default="sk-bench-" + secrets.token_hex(24), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        _client_main(args)
        return

    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    src: Path | None = None
    sides: dict[str, dict[str, Any]] = {}
    try:
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        procs["mock"] = start_process(
            [sys.executable, str(HERE / "mock_upstream.py"), "--port", str(port)], f"{upstream}/v1/models", 30
        )
        urls["direct"] = f"{upstream}/v1/chat/completions"
        config = _xpuflow_config(upstream, args.api_key)
        if args.baseline:
            src, commit = export_source(args.baseline)
            procs["before"], gateway = start_xpuflow(config, src=src)
            urls["before"] = f"{gateway}/v1/chat/completions"
            sides["before"] = {"product": f"commit {commit}"}
        procs["after"], gateway = start_xpuflow(config)
        urls["after"] = f"{gateway}/v1/chat/completions"
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
        sides["after"] = {"product": f"the working tree (HEAD {head.stdout.strip()})"}
        time.sleep(1.0)

        print(f"latency at concurrency 1 over {', '.join(urls)} ...", flush=True)
        latency = _client(args, "latency", *(f"{n}={u}" for n, u in urls.items()))
        p50 = {n: _percentile(s, 0.5) for n, s in latency["samples_ms"].items()}
        p99 = {n: _percentile(s, 0.99) for n, s in latency["samples_ms"].items()}
        ttfb = {n: _percentile(s, 0.5) for n, s in latency["first_byte_ms"].items()}
        for name, side in sides.items():
            side["added_p50_ms"] = round(p50[name] - p50["direct"], 4)
            side["added_ttfb_p50_ms"] = round(ttfb[name] - ttfb["direct"], 4)
            side["added_p99_ms"] = round(p99[name] - p99["direct"], 4)
            side["latency_errors"] = latency["errors"][name]
        script = _wrk_script(args) if args.wrk else None
        for round_ in range(args.rounds):
            # the sides take turns, the first of a round alternating (a machine that speeds up or
            # slows down during the run weighs on both alike)
            for name, side in sorted(sides.items(), reverse=bool(round_ % 2)):
                print(f"throughput, round {round_ + 1}: {name} ...", flush=True)
                if script is not None:
                    result = _wrk_rps(urls[name], procs[name].pid, script, args)
                else:
                    cpu = cpu_s(procs[name].pid)
                    result = _client(args, "rps", urls[name])
                    sent = result["ok"] + result["errors"] + result["warmup"]
                    result["cpu_ms_per_request"] = (cpu_s(procs[name].pid) - cpu) * 1000.0 / max(1, sent)
                side.setdefault("rps_rounds", []).append(result)
        for side in sides.values():
            side["rps"] = round(statistics.fmean(r["rps"] for r in side["rps_rounds"]), 1)
            side["cpu_ms_per_request"] = round(
                statistics.fmean(r["cpu_ms_per_request"] for r in side["rps_rounds"]), 4
            )
        if not args.no_profile:
            for name, side in sides.items():
                print(f"profile: {name} ...", flush=True)
                side["profile"] = _profile(procs[name].pid, urls[name], args)
    finally:
        for proc in procs.values():
            stop_process(proc)
            shutil.rmtree(getattr(proc, "config_dir", ""), ignore_errors=True)
            if getattr(proc, "log_path", None):
                Path(proc.log_path).unlink(missing_ok=True)  # type: ignore[attr-defined]
        if src is not None:
            shutil.rmtree(src.parent, ignore_errors=True)

    paired = (
        [
            a["cpu_ms_per_request"] / b["cpu_ms_per_request"]
            for a, b in zip(sides["after"]["rps_rounds"], sides["before"]["rps_rounds"], strict=True)
        ]
        if "before" in sides
        else []
    )
    out = {
        "direct_p50_ms": round(p50["direct"], 4),
        # each round's after/before CPU per request (the sides ran back to back): its median and all
        "after_vs_before_cpu_median": round(statistics.median(paired), 4) if paired else None,
        "after_vs_before_cpu_rounds": [round(r, 4) for r in paired],
        **{
            f"{name}_{k}": side[k]
            for name, side in sides.items()
            for k in ("added_p50_ms", "added_ttfb_p50_ms", "rps")
        },
        **{f"{name}_cpu_ms_per_request": side["cpu_ms_per_request"] for name, side in sides.items()},
        "sides": sides,
        "method": {
            "description": __doc__,
            "stream": args.stream,
            "request_body": json.loads(_body(args.stream)),
            "config": _xpuflow_config("http://127.0.0.1:PORT", "<the run's key>"),
            "load": "wrk -t2" if args.wrk else "aiohttp client",
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "latency_requests_per_path": args.requests,
            "profile_rate_hz": args.profile_rate,
            "cpu_count": os.cpu_count(),
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "measured_at": time.time(),
    }
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'side':<8}{'+p50 ms':>9}{'RPS':>9}{'CPU ms/req':>12}")
    for name, side in sides.items():
        print(f"{name:<8}{side['added_p50_ms']:>9.3f}{side['rps']:>9,.0f}{side['cpu_ms_per_request']:>12.3f}")
        for group, figures in (side.get("profile", {}).get("by_group") or {}).items():
            print(f"    {figures['ms_per_request']:>7.3f} ms  {figures['share']:>5.1%}  {group}")
    if paired:
        median = statistics.median(paired)
        print(f"after/before CPU per request, median of {len(paired)} paired rounds: {median:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
