"""Adaptive micro-batching on a real model: xpuflow's worker against no batching, the model's own
batched generate, and Ray Serve's ``@serve.batch``.

SmolLM2-135M-Instruct through the ``transformers`` backend on the CPU (GGUF -> ``gguf-dequant``
artifact -> session), greedy decoding, ``--new-tokens`` (32) new tokens per request, one torch thread
everywhere for repeatable figures. Client requests are chat messages with open-ended prompts.

- ``offline``: the session's own ``chat_batch`` at batch 8, 16 and 32, no serving (the limit);
- ``unbatched``: a ``Worker`` with ``max_batch_size=1`` under ``--clients`` (16) concurrent clients, each
  sending its next request when the last one is answered;
- ``adaptive``: the same worker with the adaptive batcher (default settings, cap 32) under the same load;
- ``single client``: one client alternating requests between the two workers (ABBA order, so drift
  cancels): ``single_client_latency_ratio`` = adaptive p50 / unbatched p50. The adaptive worker is the
  one that just served the 16 clients, so this is the harder case of a load that drops;
- ``ray_serve``: a Ray Serve deployment (local Ray on 127.0.0.1, no HTTP proxy) whose batched method
  runs the same model's batched ``generate`` (loaded from the same artifact folder with transformers,
  left padding, greedy), called through its deployment handle by the same clients, over a grid of
  ``max_batch_size`` (8, 16) and ``batch_wait_timeout_s`` (0.01, 0.05); the best setting is reported.

    python benchmarks/batching.py [--quick] [--no-ray] [--rounds 3]

Writes benchmarks/results/batching.json. Goals: adaptive >= 0.85 x offline, >= 5 x unbatched,
single-client latency ratio <= 1.1, >= 1.2 x Ray Serve at equal or lower p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from xpuflow.backends.base import Completion, GenerationParams, ModelConfig
from xpuflow.backends.transformers import DEQUANT_PROFILE, TransformersPlugin
from xpuflow.build.builder import build_all
from xpuflow.build.store import ArtifactStore
from xpuflow.bundled import smollm2_gguf_path
from xpuflow.scheduling.request import WorkRequest
from xpuflow.scheduling.worker import Worker
from xpuflow.types import Resource, ResourceType

CPU = Resource("cpu", ResourceType.CPU, "host CPU")
# Open-ended requests, so greedy decoding runs to the token limit instead of stopping early.
PROMPTS = [
    "Write a long story about the sea.",
    "Describe in detail how a CPU cache works.",
    "Write a long essay about the history of Rome.",
    "Explain in detail how airplanes fly.",
    "Describe your favourite city in great detail.",
    "Write a long poem about mountains.",
    "Explain in detail how vaccines work.",
    "Describe the water cycle in great detail.",
]
OFFLINE_SIZES = (8, 16, 32)
RAY_GRID = ((8, 0.01), (8, 0.05), (16, 0.01), (16, 0.05))


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load_summary(tokens: int, seconds: float, latencies: list[float]) -> dict[str, Any]:
    return {
        "tok_s": tokens / seconds,
        "seconds": seconds,
        "requests": len(latencies),
        "tokens": tokens,
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
    }


async def closed_loop(call: Callable[[int], Awaitable[int]], clients: int, rounds: int) -> dict[str, Any]:
    """``clients`` clients, each sending ``rounds`` requests one after another; ``call(i)`` returns the
    completion tokens of request ``i``."""
    latencies: list[float] = []
    tokens = 0

    async def client(c: int) -> None:
        nonlocal tokens
        for r in range(rounds):
            started = time.perf_counter()
            got = await call(c + r * clients)  # not `tokens += await ...`: that reads tokens first
            latencies.append(time.perf_counter() - started)
            tokens += got

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return load_summary(tokens, time.perf_counter() - started, latencies)


def worker_call(worker: Worker, params: GenerationParams) -> Callable[[int], Awaitable[int]]:
    async def call(i: int) -> int:
        result = await worker.submit(WorkRequest.chat(messages(i), params))
        assert isinstance(result, Completion)
        return result.completion_tokens

    return call


async def offline(session: Any, params: GenerationParams, sizes: Sequence[int], reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in sizes:
        runs = []
        tokens = 0
        for _ in range(reps):
            started = time.perf_counter()
            completions = await session.chat_batch([messages(i) for i in range(size)], params)
            runs.append(time.perf_counter() - started)
            tokens = sum(c.completion_tokens for c in completions)
        out[str(size)] = {"tok_s": tokens / statistics.mean(runs), "runs_s": runs, "tokens": tokens}
    return out


async def single_client(
    unbatched: Worker, adaptive: Worker, params: GenerationParams, requests: int
) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"unbatched": [], "adaptive": []}
    for i in range(requests):
        order = [("unbatched", unbatched), ("adaptive", adaptive)]
        if i % 2:
            order.reverse()  # ABBA: slow drift of the machine hits both alike
        for name, worker in order:
            started = time.perf_counter()
            await worker.submit(WorkRequest.chat(messages(i), params))
            samples[name].append(time.perf_counter() - started)
    p50 = {k: statistics.median(v) for k, v in samples.items()}
    mean = {k: statistics.mean(v) for k, v in samples.items()}
    return {
        "unbatched_p50_ms": p50["unbatched"] * 1000,
        "adaptive_p50_ms": p50["adaptive"] * 1000,
        "ratio_p50": p50["adaptive"] / p50["unbatched"],
        "ratio_mean": mean["adaptive"] / mean["unbatched"],
        "adaptive_ms": [s * 1000 for s in samples["adaptive"]],
        "unbatched_ms": [s * 1000 for s in samples["unbatched"]],
    }


async def xpuflow_part(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    import torch

    torch.set_num_threads(1)
    plugin = TransformersPlugin()
    config = ModelConfig(
        "smollm2", smollm2_gguf_path(), "chat", max_batch_size=32, options={"num_threads": 1}
    )
    artifacts = build_all(plugin, [CPU], config, ArtifactStore())
    folder = artifacts[DEQUANT_PROFILE].path
    session = await plugin.create_session([CPU], config, artifacts)
    params = GenerationParams(max_tokens=args.new_tokens)
    out: dict[str, Any] = {}
    try:
        await session.chat_batch([messages(0)], params)  # warm-up
        print("... offline", flush=True)
        out["offline"] = await offline(session, params, args.offline_sizes, args.offline_reps)
        unbatched = Worker(session, worker_id="unbatched", max_batch_size=1)
        adaptive = Worker(session, worker_id="adaptive")
        async with unbatched, adaptive:
            print("... unbatched", flush=True)
            out["unbatched"] = await closed_loop(
                worker_call(unbatched, params), args.clients, args.unbatched_rounds
            )
            print("... adaptive", flush=True)
            await closed_loop(worker_call(adaptive, params), args.clients, 1)  # warm-up round
            out["adaptive"] = await closed_loop(worker_call(adaptive, params), args.clients, args.rounds)
            out["adaptive"]["worker"] = adaptive.to_dict()
            print("... single client", flush=True)
            out["single_client"] = await single_client(unbatched, adaptive, params, args.single_requests)
    finally:
        await session.close()
    return out, folder


# -- Ray Serve ------------------------------------------------------------------------------------------


def _ray_app(folder: str, new_tokens: int) -> Any:
    from ray import serve

    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
    class SmolGenerator:
        """The same model and decoding as the transformers session: chat template, left padding,
        greedy, cut at the first end-of-sequence token."""

        def __init__(self) -> None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            torch.set_num_threads(1)
            self.torch = torch
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model = AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, dtype=torch.float32
            ).eval()
            eos = self.model.generation_config.eos_token_id
            self.eos = {eos} if isinstance(eos, int) else set(eos or ())
            self.eos.add(self.tokenizer.eos_token_id)

        def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
            self.__call__.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
            self.__call__.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]

        def _generate(self, conversations: list[list[dict[str, str]]]) -> list[int]:
            from transformers import GenerationConfig

            texts = [
                self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                for c in conversations
            ]
            encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            config = GenerationConfig(
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=sorted(self.eos),
                pad_token_id=self.tokenizer.pad_token_id,
            )
            with self.torch.inference_mode():
                output = self.model.generate(**encoded, generation_config=config)
            width = encoded["input_ids"].shape[1]
            counts = []
            for row in output[:, width:].tolist():
                end = next((i for i, t in enumerate(row) if t in self.eos), len(row))
                counts.append(end)
            return counts

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def __call__(self, conversations: list[list[dict[str, str]]]) -> list[int]:
            # On a thread, as the xpuflow session does, so the replica keeps queueing requests
            # while the model runs.
            return await asyncio.to_thread(self._generate, conversations)

    return SmolGenerator.bind()


def ray_part(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Ray Serve on the same model and load; every failure is recorded, never raised."""
    try:
        import ray
        from ray import serve
    except Exception as exc:
        return {"error": f"ray[serve] is not importable: {type(exc).__name__}: {exc}"}
    tmp = tempfile.mkdtemp(prefix="xpf-ray-")
    os.environ["RAY_TMPDIR"] = tmp
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    result: dict[str, Any] = {"ray_version": ray.__version__, "grid": {}}
    try:
        ray.init(
            address="local",
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            num_cpus=2,
            _temp_dir=tmp,
            log_to_driver=False,
        )
        serve.start(proxy_location="Disabled")
        handle = serve.run(_ray_app(str(folder), args.new_tokens), name="smol", route_prefix=None)

        async def call(i: int) -> int:
            return int(await handle.remote(messages(i)))

        async def sweep() -> None:
            for max_batch_size, wait_s in args.ray_grid:
                print(
                    f"... ray serve max_batch_size={max_batch_size} batch_wait_timeout_s={wait_s}", flush=True
                )
                await handle.configure.remote(max_batch_size, wait_s)
                await closed_loop(call, args.clients, 1)  # warm-up round
                summary = await closed_loop(call, args.clients, args.ray_rounds)
                result["grid"][f"{max_batch_size}/{wait_s}"] = {
                    "max_batch_size": max_batch_size,
                    "batch_wait_timeout_s": wait_s,
                    **summary,
                }

        asyncio.run(sweep())
        best = max(result["grid"].values(), key=lambda r: r["tok_s"])
        result["best"] = best
    except Exception as exc:  # Ray failing must not lose the other figures
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
    return result


# -- main -----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed requests per client (adaptive)")
    parser.add_argument("--ray-rounds", type=int, default=2, help="timed requests per client per Ray setting")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Serve comparison")
    parser.add_argument("--quick", action="store_true", help="a short run: fewer rounds, one Ray setting")
    args = parser.parse_args()
    args.offline_sizes = OFFLINE_SIZES
    args.offline_reps = 2
    args.unbatched_rounds = 1
    args.single_requests = 8
    args.ray_grid = RAY_GRID
    if args.quick:
        args.offline_sizes, args.offline_reps, args.rounds = (16,), 1, 1
        args.single_requests, args.ray_rounds, args.ray_grid = 4, 1, ((16, 0.01),)

    started = time.perf_counter()
    ours, folder = asyncio.run(xpuflow_part(args))
    ray = {"skipped": "--no-ray"} if args.no_ray else ray_part(folder, args)

    offline_best_size, offline_best = max(ours["offline"].items(), key=lambda kv: kv[1]["tok_s"])
    adaptive = ours["adaptive"]
    unbatched = ours["unbatched"]
    data: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (GGUF dequantised to fp32), transformers backend, CPU",
        "torch_threads": 1,
        "clients": args.clients,
        "new_tokens": args.new_tokens,
        "greedy": True,
        "quick": args.quick,
        "unbatched_tok_s": unbatched["tok_s"],
        "adaptive_tok_s": adaptive["tok_s"],
        "offline_tok_s": offline_best["tok_s"],
        "offline_best_batch": int(offline_best_size),
        "adaptive_vs_offline": adaptive["tok_s"] / offline_best["tok_s"],
        # With N clients no server can batch more than N requests: the limit at that batch size.
        "adaptive_vs_offline_at_client_count": (
            adaptive["tok_s"] / ours["offline"][str(args.clients)]["tok_s"]
            if str(args.clients) in ours["offline"]
            else None
        ),
        "adaptive_vs_unbatched": adaptive["tok_s"] / unbatched["tok_s"],
        "single_client_latency_ratio": ours["single_client"]["ratio_p50"],
        "ray_serve_tok_s": ray.get("best", {}).get("tok_s"),
        "adaptive_vs_ray_serve": (adaptive["tok_s"] / ray["best"]["tok_s"]) if "best" in ray else None,
        "adaptive_p99_ms": adaptive["p99_ms"],
        "ray_serve_p99_ms": ray.get("best", {}).get("p99_ms"),
        "goals": {
            "adaptive_vs_offline": ">= 0.85",
            "adaptive_vs_unbatched": ">= 5",
            "single_client_latency_ratio": "<= 1.1",
            "adaptive_vs_ray_serve": ">= 1.2 at equal or lower p99",
        },
        "details": {**ours, "ray_serve": ray},
        "total_s": time.perf_counter() - started,
    }
    rows = [
        ("offline (limit)", f"{offline_best['tok_s']:.1f}", f"batch {offline_best_size}", "-", "-"),
        (
            "unbatched",
            f"{unbatched['tok_s']:.1f}",
            "1",
            f"{unbatched['p50_ms']:.0f}",
            f"{unbatched['p99_ms']:.0f}",
        ),
        (
            "xpuflow adaptive",
            f"{adaptive['tok_s']:.1f}",
            f"{adaptive['worker']['metrics']['mean_batch_size']:.1f} (mean)",
            f"{adaptive['p50_ms']:.0f}",
            f"{adaptive['p99_ms']:.0f}",
        ),
    ]
    if "best" in ray:
        best = ray["best"]
        rows.append(
            (
                "ray serve (best)",
                f"{best['tok_s']:.1f}",
                f"max {best['max_batch_size']}, wait {best['batch_wait_timeout_s']} s",
                f"{best['p50_ms']:.0f}",
                f"{best['p99_ms']:.0f}",
            )
        )
    else:
        rows.append(("ray serve", "-", ray.get("error") or ray.get("skipped", ""), "-", "-"))
    print_table(
        f"SmolLM2-135M on CPU, {args.clients} clients, {args.new_tokens} new tokens, 1 torch thread",
        rows,
        ("server", "tok/s", "batch", "p50 ms", "p99 ms"),
    )
    print(
        f"adaptive/offline {data['adaptive_vs_offline']:.2f}  adaptive/unbatched "
        f"{data['adaptive_vs_unbatched']:.2f}  single-client latency ratio "
        f"{data['single_client_latency_ratio']:.3f}"
        + (f"  adaptive/ray {data['adaptive_vs_ray_serve']:.2f}" if data["adaptive_vs_ray_serve"] else "")
    )
    print("wrote", write_results("batching", data))


if __name__ == "__main__":
    main()
