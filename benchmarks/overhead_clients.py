"""The load clients of ``gateway_overhead.py``, each run in a process of its own and printing one JSON
object: ``latency`` and ``stream`` (concurrency 1, paths interleaved in blocks), ``rps`` (concurrency N
for a duration after a warm-up) and ``chunks`` (long streams, N at a time). ``rps`` and ``chunks`` also
read the CPU time of the system under test (``--cpu-pid``, its process tree) around the measured phase.

    python benchmarks/overhead_clients.py rps --url URL --api-key KEY --concurrency 32 --cpu-pid PID
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_s

_MESSAGES = [{"role": "user", "content": "Say hello."}]
BODY = json.dumps({"model": "chat", "messages": _MESSAGES, "max_tokens": 16}).encode()
STREAM_BODY = json.dumps({"model": "chat", "messages": _MESSAGES, "max_tokens": 16, "stream": True}).encode()
LONG_STREAM_TOKENS = 200
LONG_STREAM_TOKEN_DELAY_S = 0.001
LONG_STREAM_BODY = json.dumps(
    {"model": "chat-long", "messages": _MESSAGES, "max_tokens": LONG_STREAM_TOKENS, "stream": True}
).encode()


def headers(api_key: str) -> dict[str, str]:
    return {"content-type": "application/json", "authorization": f"Bearer {api_key}"}


async def _client_latency(
    urls: dict[str, str], api_key: str, requests: int, warmup: int, block: int, stream: bool
) -> dict[str, Any]:
    """Per path, the milliseconds of each request (head to last byte) and, for streams, to the first
    body bytes."""
    import aiohttp

    request_headers = headers(api_key)
    body = STREAM_BODY if stream else BODY
    names = list(urls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    first_byte: dict[str, list[float]] = {name: [] for name in names}
    errors = dict.fromkeys(names, 0)
    sessions = {name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for name in names}

    async def one(name: str) -> tuple[float, float, bool]:
        start = time.perf_counter()
        async with sessions[name].post(urls[name], data=body, headers=request_headers) as response:
            if stream:
                await response.content.readany()
                ttfb = time.perf_counter()
            await response.read()
            end = time.perf_counter()
            return (end - start) * 1000.0, ((ttfb if stream else end) - start) * 1000.0, response.ok

    try:
        for name in names:
            for _ in range(warmup):
                await one(name)
        for i in range(math.ceil(requests / block)):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:  # rotate, so no path always goes first
                for _ in range(min(block, requests - len(samples[name]))):
                    elapsed_ms, ttfb_ms, ok = await one(name)
                    samples[name].append(elapsed_ms)
                    first_byte[name].append(ttfb_ms)
                    errors[name] += 0 if ok else 1
    finally:
        for session in sessions.values():
            await session.close()
    return {"samples_ms": samples, "first_byte_ms": first_byte if stream else {}, "errors": errors}


async def _client_rps(
    url: str, api_key: str, concurrency: int, duration_s: float, warmup_s: float, cpu_pid: int
) -> dict[str, Any]:
    """Requests per second at ``concurrency`` after a warm-up, and the CPU seconds process ``cpu_pid``
    (the system under test) spent in the measured phase."""
    import aiohttp

    request_headers = headers(api_key)
    counts = {"ok": 0, "errors": 0, "warmup": 0}
    measuring = False

    async def worker(http: Any, deadline: float) -> None:
        while time.perf_counter() < deadline:
            try:
                async with http.post(url, data=BODY, headers=request_headers) as response:
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
        cpu = cpu_s(cpu_pid)
        start = time.perf_counter()
        await asyncio.gather(*(worker(http, start + duration_s) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        cpu = cpu_s(cpu_pid) - cpu
    served = counts["ok"] + counts["errors"]
    return {
        **counts,
        "elapsed_s": elapsed,
        "rps": counts["ok"] / elapsed,
        "cpu_s": cpu,
        "cpu_ms_per_request": cpu * 1000.0 / max(1, served),
    }


async def _client_chunks(
    url: str, api_key: str, concurrency: int, streams: int, cpu_pid: int
) -> dict[str, Any]:
    """``streams`` long streams, ``concurrency`` at a time (one round of ``concurrency`` first, not
    measured); the SSE events delivered and the CPU seconds process ``cpu_pid`` spent meanwhile."""
    import aiohttp

    request_headers = headers(api_key)
    totals = {"streams": 0, "events": 0, "errors": 0}

    async def one(http: Any, count: bool) -> None:
        async with http.post(url, data=LONG_STREAM_BODY, headers=request_headers) as response:
            body = await response.read()
            if count:
                totals["streams"] += 1
                totals["events"] += body.count(b"data:")
                totals["errors"] += 0 if response.status == 200 else 1

    async def worker(http: Any, share: int, count: bool) -> None:
        for _ in range(share):
            await one(http, count)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(*(worker(http, 1, False) for _ in range(concurrency)))
        shares = [
            streams // concurrency + (1 if i < streams % concurrency else 0) for i in range(concurrency)
        ]
        cpu = cpu_s(cpu_pid)
        start = time.perf_counter()
        await asyncio.gather(*(worker(http, share, True) for share in shares))
        elapsed = time.perf_counter() - start
        cpu = cpu_s(cpu_pid) - cpu
    return {
        **totals,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "cpu_us_per_event": cpu * 1e6 / max(1, totals["events"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["latency", "stream", "rps", "chunks"])
    parser.add_argument("--url", action="append", default=[], help="URL, or NAME=URL for latency/stream")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--stream-concurrency", type=int, default=8)
    parser.add_argument("--cpu-pid", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    if args.mode in ("latency", "stream"):
        urls = dict(item.split("=", 1) for item in args.url)
        stream = args.mode == "stream"
        result = run(_client_latency(urls, args.api_key, args.requests, args.warmup, args.block, stream))
    elif args.mode == "rps":
        result = run(
            _client_rps(args.url[0], args.api_key, args.concurrency, args.duration, 2.0, args.cpu_pid)
        )
    else:
        result = run(
            _client_chunks(args.url[0], args.api_key, args.stream_concurrency, args.streams, args.cpu_pid)
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
