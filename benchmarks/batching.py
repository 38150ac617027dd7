"""Adaptive micro-batching on a real model: xpuflow's worker against no batching, the model's own
batched generate, and Ray Serve's ``@serve.batch``.

SmolLM2-135M-Instruct through the ``transformers`` backend on the CPU (GGUF -> ``gguf-dequant``
artifact -> session), greedy decoding, ``--new-tokens`` (32) new tokens per request, one torch thread
in every process, open-ended chat prompts. ``--clients`` (16) clients each send a request, wait for
the answer, pause a random 0..``--think-ms`` ms (a client's own turnaround), and send again.

- ``offline``: the model's own batched generate (transformers' ``model.generate``, as the Ray Serve
  deployment runs it) at batch 8, 16 and 32, no serving: the issue's limit;
- ``engine``: the xpuflow session's ``chat_batch`` at the same sizes, no serving: the same model with
  the session's own work (its prefix cache), so adaptive / engine is what the serving alone keeps;
- ``unbatched``: a ``Worker`` with ``max_batch_size=1`` under the clients;
- ``adaptive``: the same kind of worker with the adaptive batcher (default settings) under the clients;
- ``continuous``: a worker over a second session of the model with ``options.continuous_batching``
  (requests join the running batch between decoding steps; the worker forms no batches);
- ``ray_serve``: a Ray Serve deployment (local Ray on 127.0.0.1, no HTTP proxy) whose ``@serve.batch``
  method runs the same model's batched ``generate`` (loaded from the same artifact folder with
  transformers: chat template, left padding, greedy), on a thread as the session does, called through
  its deployment handle by the same clients. A first pass over ``max_batch_size`` (8, 16) x
  ``batch_wait_timeout_s`` (0.01, 0.05) picks its best setting;
- ``single client``: one client alternating requests between the unbatched and the adaptive worker
  (ABBA order): ``single_client_latency_ratio`` = adaptive p50 / unbatched p50. The adaptive worker has
  just served the 16 clients: the harder case of a load that drops.

Other work on a small machine moves timings a lot, so the measurements are interleaved: each of
``--repetitions`` passes runs one slice of every configuration, in a rotating order, and each
configuration's rate is its tokens over its time summed over its slices.

    python benchmarks/batching.py [--quick] [--no-ray] [--repetitions 3]

Writes benchmarks/results/batching.json. Goals: adaptive >= 0.85 x offline, >= 5 x unbatched,
single-client latency ratio <= 1.1, >= 1.2 x Ray Serve at equal or lower p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROMPTS, print_table, smollm2_session, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from xpuflow.backends.base import Completion, GenerationParams
from xpuflow.scheduling.request import WorkRequest
from xpuflow.scheduling.worker import Worker

OFFLINE_SIZES = (8, 16, 32)
RAY_GRID = ((8, 0.01), (8, 0.05), (16, 0.01), (16, 0.05))

Call = Callable[[int], Awaitable[int]]


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Tally:
    """Tokens, busy seconds and request latencies of one configuration, over all its slices."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self.latencies: list[float] = []
        self.slices: list[float] = []  # tok/s of each slice

    def add(self, tokens: int, seconds: float, latencies: Sequence[float] = ()) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.latencies.extend(latencies)
        self.slices.append(tokens / seconds)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tok_s": self.tokens / self.seconds,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "slice_tok_s": self.slices,
        }
        if self.latencies:
            out.update(
                requests=len(self.latencies),
                p50_ms=pct(self.latencies, 0.5) * 1000,
                p99_ms=pct(self.latencies, 0.99) * 1000,
            )
        return out


async def closed_loop(
    call: Call,
    clients: int,
    think_s: float,
    seed: int,
    *,
    rounds: int | None = None,
    seconds: float | None = None,
) -> tuple[int, float, list[float]]:
    """Clients that send, wait for the answer, pause up to ``think_s``, and send again: ``rounds``
    requests each, or for ``seconds`` (then tokens and time run to the last answer inside the window,
    and unanswered requests are withdrawn). Returns (tokens, seconds, latencies)."""
    latencies: list[float] = []
    tokens = 0
    last_answer = 0.0
    started = time.perf_counter()
    stop_at = None if seconds is None else started + seconds

    async def client(c: int) -> None:
        nonlocal tokens, last_answer
        rng = random.Random(seed * 1000 + c)
        r = 0
        while (rounds is None or r < rounds) and (stop_at is None or time.perf_counter() < stop_at):
            await asyncio.sleep(rng.uniform(0.0, think_s))
            sent = time.perf_counter()
            got = await call(c + r * clients)  # not `tokens += await ...`: that reads tokens first
            now = time.perf_counter()
            if stop_at is None or now <= stop_at:
                tokens += got
                latencies.append(now - sent)
                last_answer = now
            r += 1

    tasks = [asyncio.ensure_future(client(c)) for c in range(clients)]
    if stop_at is None:
        await asyncio.gather(*tasks)
        return tokens, time.perf_counter() - started, latencies
    await asyncio.wait(tasks, timeout=seconds)
    for task in tasks:
        task.cancel()  # withdraws queued requests from the worker
    await asyncio.gather(*tasks, return_exceptions=True)
    return tokens, max(last_answer - started, 1e-9), latencies


def worker_call(worker: Worker, params: GenerationParams) -> Call:
    async def call(i: int) -> int:
        result = await worker.submit(WorkRequest.chat(messages(i), params))
        assert isinstance(result, Completion)
        return result.completion_tokens

    return call


async def settle(worker: Worker) -> None:
    """Wait until the worker's device is idle (a withdrawn request may still be running)."""
    while worker.metrics.in_flight or len(worker.queue):
        await asyncio.sleep(0.02)


async def single_client(
    unbatched: Worker, adaptive: Worker, params: GenerationParams, n: int
) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"unbatched": [], "adaptive": []}
    for i in range(n):
        order = [("unbatched", unbatched), ("adaptive", adaptive)]
        if i % 2:
            order.reverse()  # ABBA: slow drift of the machine hits both alike
        for name, worker in order:
            started = time.perf_counter()
            await worker.submit(WorkRequest.chat(messages(i), params))
            samples[name].append(time.perf_counter() - started)
    p50 = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "unbatched_p50_ms": p50["unbatched"] * 1000,
        "adaptive_p50_ms": p50["adaptive"] * 1000,
        "ratio_p50": p50["adaptive"] / p50["unbatched"],
        "ratio_mean": statistics.mean(samples["adaptive"]) / statistics.mean(samples["unbatched"]),
        "adaptive_ms": [s * 1000 for s in samples["adaptive"]],
        "unbatched_ms": [s * 1000 for s in samples["unbatched"]],
    }


# -- Ray Serve ------------------------------------------------------------------------------------------


def model_generate(
    model: Any, tokenizer: Any, eos: set[int], conversations: list[list[dict[str, str]]], new_tokens: int
) -> list[int]:
    """The model's own batched ``generate`` (chat template, left padding, greedy), no xpuflow: the new
    tokens of each row up to its first end-of-sequence token."""
    import torch
    from transformers import GenerationConfig

    texts = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
    ]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=sorted(eos),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.inference_mode():
        output = model.generate(**encoded, generation_config=config)
    width = encoded["input_ids"].shape[1]
    return [next((i for i, t in enumerate(row) if t in eos), len(row)) for row in output[:, width:].tolist()]


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
            return model_generate(self.model, self.tokenizer, self.eos, conversations, new_tokens)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def __call__(self, conversations: list[list[dict[str, str]]]) -> list[int]:
            # On a thread, as the xpuflow session does, so the replica keeps queueing requests
            # while the model runs.
            return await asyncio.to_thread(self._generate, conversations)

    return SmolGenerator.bind()


class RayServe:
    """Local Ray on 127.0.0.1 with one Serve replica; ``error`` says why it is unusable."""

    def __init__(self, folder: Path, new_tokens: int) -> None:
        self.handle: Any = None
        self.error: str | None = None
        self.version: str | None = None
        try:
            import ray
            from ray import serve
        except Exception as exc:
            self.error = f"ray[serve] is not importable: {type(exc).__name__}: {exc}"
            return
        self.version = ray.__version__
        tmp = tempfile.mkdtemp(prefix="xpf-ray-")
        os.environ["RAY_TMPDIR"] = tmp
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
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
            self.handle = serve.run(_ray_app(str(folder), new_tokens), name="smol", route_prefix=None)
        except Exception as exc:
            self.error = f"Ray Serve did not start: {type(exc).__name__}: {exc}"
            self.close()

    def call(self) -> Call:
        async def call(i: int) -> int:
            return int(await self.handle.remote(messages(i)))

        return call

    async def configure(self, max_batch_size: int, wait_s: float) -> None:
        await self.handle.configure.remote(max_batch_size, wait_s)

    def close(self) -> None:
        try:
            import ray
            from ray import serve
        except Exception:
            return
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()


# -- the run --------------------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, session: Any, ray: RayServe | None) -> dict[str, Any]:
    params = GenerationParams(max_tokens=args.new_tokens)
    think_s = args.think_ms / 1000.0
    out: dict[str, Any] = {}
    await session.chat_batch([messages(0)], params)  # warm-up

    ray_ok = ray is not None and ray.handle is not None
    if ray_ok:
        assert ray is not None
        grid: dict[str, Any] = {}
        for max_batch_size, wait_s in args.ray_grid:
            print(f"... ray serve setting max_batch_size={max_batch_size} wait={wait_s}", flush=True)
            await ray.configure(max_batch_size, wait_s)
            await closed_loop(ray.call(), args.clients, think_s, 0, rounds=1)  # warm-up
            tokens, seconds, lat = await closed_loop(ray.call(), args.clients, think_s, 1, rounds=args.rounds)
            grid[f"{max_batch_size}/{wait_s}"] = {
                "max_batch_size": max_batch_size,
                "batch_wait_timeout_s": wait_s,
                "tok_s": tokens / seconds,
                "p99_ms": pct(lat, 0.99) * 1000,
            }
        best_key = max(grid, key=lambda k: grid[k]["tok_s"])
        out["ray_grid"] = grid
        out["ray_setting"] = grid[best_key]
        await ray.configure(grid[best_key]["max_batch_size"], grid[best_key]["batch_wait_timeout_s"])

    unbatched = Worker(session, worker_id="unbatched", max_batch_size=1)
    adaptive = Worker(session, worker_id="adaptive")
    continuous_session, _ = await smollm2_session(args.clients, continuous=True)
    continuous = Worker(continuous_session, worker_id="continuous")
    tallies: dict[str, Tally] = {}
    async with unbatched, adaptive, continuous:
        await closed_loop(worker_call(adaptive, params), args.clients, think_s, 0, rounds=1)  # warm-up
        await closed_loop(worker_call(continuous, params), args.clients, think_s, 0, rounds=1)

        async def run_slice(name: str, rep: int) -> None:
            tally = tallies.setdefault(name, Tally())
            if name.startswith("offline_"):
                # the same model through transformers' own batched generate, no xpuflow
                convs = [messages(i) for i in range(int(name.split("_")[1]))]
                started = time.perf_counter()
                counts = await session._runner.call(
                    model_generate,
                    session._model,
                    session._tokenizer,
                    set(session._eos_ids),
                    convs,
                    args.new_tokens,
                )
                tally.add(sum(counts), time.perf_counter() - started)
            elif name.startswith("engine_"):
                size = int(name.split("_")[1])
                started = time.perf_counter()
                done = await session.chat_batch([messages(i) for i in range(size)], params)
                tally.add(sum(c.completion_tokens for c in done), time.perf_counter() - started)
            elif name == "unbatched":
                worker_tokens, seconds, lat = await closed_loop(
                    worker_call(unbatched, params), args.clients, think_s, rep, seconds=args.unbatched_s
                )
                tally.add(worker_tokens, seconds, lat)
                await settle(unbatched)
            elif name in ("adaptive", "continuous"):
                worker = adaptive if name == "adaptive" else continuous
                tally.add(
                    *await closed_loop(
                        worker_call(worker, params), args.clients, think_s, rep, rounds=args.rounds
                    )
                )
            else:
                assert ray is not None
                tally.add(*await closed_loop(ray.call(), args.clients, think_s, rep, rounds=args.rounds))

        names = [f"{kind}_{s}" for kind in ("offline", "engine") for s in args.offline_sizes]
        names += ["unbatched", "adaptive", "continuous"]
        if ray_ok:
            names.append("ray_serve")
        for rep in range(args.repetitions):
            shift = rep % len(names)
            order = names[shift:] + names[:shift]
            print(f"... pass {rep + 1}/{args.repetitions}: {', '.join(order)}", flush=True)
            for name in order:
                await run_slice(name, rep + 1)
        out["adaptive_worker"] = adaptive.to_dict()
        print("... single client", flush=True)
        out["single_client"] = await single_client(unbatched, adaptive, params, args.single_requests)
        out["single_client_continuous"] = await single_client(
            unbatched, continuous, params, args.single_requests
        )
    await continuous_session.close()
    out["configs"] = {name: tally.summary() for name, tally in tallies.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--think-ms", type=float, default=2.0, help="client pause before each request")
    parser.add_argument("--repetitions", type=int, default=3, help="interleaved passes")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per serving slice")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Serve comparison")
    parser.add_argument("--quick", action="store_true", help="one pass, fewer settings (about 3 minutes)")
    args = parser.parse_args()
    args.offline_sizes, args.ray_grid = OFFLINE_SIZES, RAY_GRID
    args.unbatched_s, args.single_requests = 12.0, 8
    if args.quick:
        args.repetitions, args.rounds, args.offline_sizes = 1, 1, (16, 32)
        args.ray_grid, args.unbatched_s, args.single_requests = ((16, 0.01),), 6.0, 4

    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()

    async def setup() -> tuple[Any, Path]:
        return await smollm2_session(32)

    loop = asyncio.new_event_loop()
    session, folder = loop.run_until_complete(setup())
    ray = None if args.no_ray else RayServe(folder, args.new_tokens)
    try:
        ours = loop.run_until_complete(measure(args, session, ray))
    finally:
        loop.run_until_complete(session.close())
        loop.close()
        if ray is not None:
            ray.close()

    configs = ours["configs"]
    offline = {k: v for k, v in configs.items() if k.startswith("offline_")}
    engine = {k: v for k, v in configs.items() if k.startswith("engine_")}
    best_name = max(offline, key=lambda k: offline[k]["tok_s"])
    best_engine = max(engine, key=lambda k: engine[k]["tok_s"])
    engine_same_batch = engine.get(f"engine_{args.clients}")
    adaptive, unbatched = configs["adaptive"], configs["unbatched"]
    ray_cfg = configs.get("ray_serve")
    same_batch = offline.get(f"offline_{args.clients}")
    data: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (GGUF dequantised to fp32), transformers backend, CPU",
        "torch_threads": 1,
        "clients": args.clients,
        "new_tokens": args.new_tokens,
        "think_ms": args.think_ms,
        "greedy": True,
        "quick": args.quick,
        "repetitions": args.repetitions,
        "unbatched_tok_s": unbatched["tok_s"],
        "adaptive_tok_s": adaptive["tok_s"],
        "offline_tok_s": offline[best_name]["tok_s"],
        "offline_best_batch": int(best_name.split("_")[1]),
        "adaptive_vs_offline": adaptive["tok_s"] / offline[best_name]["tok_s"],
        # With N clients no server batches more than N requests: the limit at that batch size.
        "adaptive_vs_offline_at_client_count": adaptive["tok_s"] / same_batch["tok_s"]
        if same_batch
        else None,
        # xpuflow's own engine offline (the session's chat_batch, with its prefix cache): what the
        # serving keeps of it, apart from what the engine adds over the model's own generate
        "engine_offline_tok_s": engine[best_engine]["tok_s"],
        "engine_offline_best_batch": int(best_engine.split("_")[1]),
        "adaptive_vs_engine_offline": adaptive["tok_s"] / engine[best_engine]["tok_s"],
        "adaptive_vs_engine_offline_at_client_count": adaptive["tok_s"] / engine_same_batch["tok_s"]
        if engine_same_batch
        else None,
        "adaptive_vs_unbatched": adaptive["tok_s"] / unbatched["tok_s"],
        "single_client_latency_ratio": ours["single_client"]["ratio_p50"],
        "ray_serve_tok_s": ray_cfg["tok_s"] if ray_cfg else None,
        "adaptive_vs_ray_serve": adaptive["tok_s"] / ray_cfg["tok_s"] if ray_cfg else None,
        "adaptive_p99_ms": adaptive["p99_ms"],
        # options.continuous_batching on the same model: requests join the running batch
        "continuous_tok_s": configs["continuous"]["tok_s"],
        "continuous_p99_ms": configs["continuous"]["p99_ms"],
        "continuous_vs_adaptive": configs["continuous"]["tok_s"] / adaptive["tok_s"],
        "continuous_vs_ray_serve": configs["continuous"]["tok_s"] / ray_cfg["tok_s"] if ray_cfg else None,
        "continuous_single_client_latency_ratio": ours["single_client_continuous"]["ratio_p50"],
        "ray_serve_p99_ms": ray_cfg["p99_ms"] if ray_cfg else None,
        "ray_serve_setting": ours.get("ray_setting"),
        "ray_serve_error": None if ray is None else ray.error,
        "ray_version": None if ray is None else ray.version,
        "goals": {
            "adaptive_vs_offline": ">= 0.85",
            "adaptive_vs_unbatched": ">= 5",
            "single_client_latency_ratio": "<= 1.1",
            "adaptive_vs_ray_serve": ">= 1.2 at equal or lower p99",
        },
        "details": ours,
        "total_s": time.perf_counter() - started,
    }
    rows = [
        (name, f"{cfg['tok_s']:.1f}", "-", "-", " ".join(f"{x:.0f}" for x in cfg["slice_tok_s"]))
        for group in (offline, engine)
        for name, cfg in sorted(group.items(), key=lambda kv: int(kv[0].split("_")[1]))
    ]
    for name, cfg in (
        ("unbatched", unbatched),
        ("xpuflow adaptive", adaptive),
        ("xpuflow continuous", configs.get("continuous")),
        ("ray serve", ray_cfg),
    ):
        if cfg:
            rows.append(
                (
                    name,
                    f"{cfg['tok_s']:.1f}",
                    f"{cfg['p50_ms']:.0f}" if "p50_ms" in cfg else "-",
                    f"{cfg['p99_ms']:.0f}" if "p99_ms" in cfg else "-",
                    " ".join(f"{x:.0f}" for x in cfg["slice_tok_s"]),
                )
            )
    print_table(
        f"SmolLM2-135M on CPU, {args.clients} clients, {args.new_tokens} new tokens, 1 torch thread",
        rows,
        ("config", "tok/s", "p50 ms", "p99 ms", "tok/s per slice"),
    )
    if ray is not None and ray.error:
        print("ray serve:", ray.error)
    print(
        f"adaptive/offline {data['adaptive_vs_offline']:.2f} (at batch {args.clients}: "
        f"{data['adaptive_vs_offline_at_client_count'] or float('nan'):.2f})  adaptive/engine offline "
        f"{data['adaptive_vs_engine_offline']:.2f} (at batch {args.clients}: "
        f"{data['adaptive_vs_engine_offline_at_client_count'] or float('nan'):.2f})  adaptive/unbatched "
        f"{data['adaptive_vs_unbatched']:.2f}  single-client latency ratio "
        f"{data['single_client_latency_ratio']:.3f}"
        + (f"  adaptive/ray {data['adaptive_vs_ray_serve']:.2f}" if data["adaptive_vs_ray_serve"] else "")
    )
    print("wrote", write_results("batching", data))


if __name__ == "__main__":
    main()
