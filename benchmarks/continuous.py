"""Continuous batching against the adaptive static batcher under open-loop traffic of mixed lengths.

SmolLM2-135M-Instruct through the ``transformers`` backend on the CPU, one torch thread, greedy. The
same seeded sequence of requests arrives in both runs: Poisson arrivals at ``--rate`` requests/s, each a
one-line chat prompt with ``max_tokens`` drawn from (8, 16, 32, 64). Two workers over two sessions of
the same model (both with the prefix cache):

- ``static``: the adaptive micro-batcher; a batch runs to its longest row before the next one starts;
- ``continuous``: ``options.continuous_batching``; requests join the running batch at the next
  decoding step and leave it when done.

Both take at most ``--max-batch`` (16) requests at once. Each configuration runs ``--repetitions``
times, alternating. Reported per configuration: latency p50/p90/p99 (arrival to answer), tokens/s over
the run, mean tokens per request, and the ratios continuous/static measured in the same run.

    python benchmarks/continuous.py [--rate 2.0] [--requests 60] [--repetitions 2]

Writes benchmarks/results/continuous.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROMPTS, print_table, smollm2_session, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from xpuflow.backends.base import Completion, GenerationParams
from xpuflow.scheduling.request import WorkRequest
from xpuflow.scheduling.worker import Worker

LENGTHS = (8, 16, 32, 64)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def workload(rate: float, count: int, seed: int) -> list[tuple[float, int, int]]:
    """(arrival offset s, prompt index, max_tokens) per request."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(count):
        t += rng.expovariate(rate)
        out.append((t, i % len(PROMPTS), rng.choice(LENGTHS)))
    return out


async def run(worker: Worker, requests: list[tuple[float, int, int]]) -> dict[str, Any]:
    latencies: list[float] = []
    tokens = 0
    start = time.perf_counter()

    async def one(at: float, prompt: int, max_tokens: int) -> None:
        nonlocal tokens
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        sent = time.perf_counter()
        chat = [{"role": "user", "content": PROMPTS[prompt]}]
        result = await worker.submit(WorkRequest.chat(chat, GenerationParams(max_tokens=max_tokens)))
        assert isinstance(result, Completion)
        latencies.append(time.perf_counter() - sent)
        tokens += result.completion_tokens

    await asyncio.gather(*(one(*r) for r in requests))
    seconds = time.perf_counter() - start
    return {"latencies_s": latencies, "tokens": tokens, "seconds": seconds}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [x for r in runs for x in r["latencies_s"]]
    tokens = sum(r["tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {
        "requests": len(latencies),
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p90_ms": pct(latencies, 0.9) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "mean_ms": statistics.mean(latencies) * 1000,
        "tok_s": tokens / seconds,
        "tokens": tokens,
        "seconds": seconds,
        "run_tok_s": [r["tokens"] / r["seconds"] for r in runs],
        "run_p50_ms": [pct(r["latencies_s"], 0.5) * 1000 for r in runs],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sessions = {
        "static": (await smollm2_session(args.max_batch))[0],
        "continuous": (await smollm2_session(args.max_batch, continuous=True))[0],
    }
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sessions}
    try:
        warm = [(0.0, i, 8) for i in range(4)]
        workers = {name: Worker(s, worker_id=name) for name, s in sessions.items()}
        for worker in workers.values():
            await worker.start()
            await run(worker, warm)
        for rep in range(args.repetitions):
            requests = workload(args.rate, args.requests, seed=rep)
            order = ["static", "continuous"] if rep % 2 == 0 else ["continuous", "static"]
            for name in order:
                print(f"... repetition {rep + 1}/{args.repetitions}: {name}", flush=True)
                results[name].append(await run(workers[name], requests))
        loop_stats = {
            "steps": sessions["continuous"]._loop.steps,
            "max_rows_seen": sessions["continuous"]._loop.max_rows_seen,
        }
        for worker in workers.values():
            await worker.stop()
    finally:
        for session in sessions.values():
            await session.close()
    return {"configs": {name: summarise(runs) for name, runs in results.items()}, "loop": loop_stats}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=2.0, help="arrivals per second (Poisson)")
    parser.add_argument("--requests", type=int, default=60, help="requests per run")
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    out = asyncio.run(main_async(args))
    static, continuous = out["configs"]["static"], out["configs"]["continuous"]
    data = {
        "model": "SmolLM2-135M-Instruct (GGUF dequantised to fp32), transformers backend, CPU, 1 thread",
        "rate_per_s": args.rate,
        "requests_per_run": args.requests,
        "repetitions": args.repetitions,
        "max_batch": args.max_batch,
        "max_tokens_choices": list(LENGTHS),
        "p50_ratio_continuous_vs_static": continuous["p50_ms"] / static["p50_ms"],
        "p99_ratio_continuous_vs_static": continuous["p99_ms"] / static["p99_ms"],
        "tok_s_ratio_continuous_vs_static": continuous["tok_s"] / static["tok_s"],
        **out,
        "total_s": time.perf_counter() - started,
    }
    rows = [
        (
            name,
            f"{cfg['p50_ms']:.0f}",
            f"{cfg['p90_ms']:.0f}",
            f"{cfg['p99_ms']:.0f}",
            f"{cfg['tok_s']:.1f}",
            " ".join(f"{x:.0f}" for x in cfg["run_p50_ms"]),
        )
        for name, cfg in out["configs"].items()
    ]
    print_table(
        f"SmolLM2-135M, Poisson {args.rate:g}/s, max_tokens in {LENGTHS}, at most {args.max_batch} at once",
        rows,
        ("worker", "p50 ms", "p90 ms", "p99 ms", "tok/s", "p50 per run"),
    )
    print(
        f"continuous/static: p50 {data['p50_ratio_continuous_vs_static']:.2f}, p99 "
        f"{data['p99_ratio_continuous_vs_static']:.2f}, tok/s {data['tok_s_ratio_continuous_vs_static']:.2f}"
    )
    print("wrote", write_results("continuous", data))


if __name__ == "__main__":
    main()
