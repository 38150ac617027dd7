"""Backend throughput on this machine, and artifact cache hits against the builds they replace.

For every usable backend: tokens/s (generation, 32 new tokens per request, greedy) or items/s
(embeddings, tensor rows) at batch 1, 8 and 32, through the same plugin -> build_all -> session path
the server uses. Then, for every build profile: the time of a cache hit (checksums verified) against
the build it replaces; target: hit <= 10% of miss.

    python benchmarks/backends.py [--backends llamacpp,transformers,...] [--threads 1] [--new-tokens 32]

Writes benchmarks/results/backends.json (raw per-run seconds included).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROMPTS, print_table, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from xpuflow.artifacts.builder import build_all
from xpuflow.artifacts.store import ArtifactStore
from xpuflow.backends.base import GenerationParams, ModelConfig
from xpuflow.backends.registry import get_backend
from xpuflow.bundled import minilm_path, smollm2_gguf_path
from xpuflow.types import Resource, ResourceType

BATCHES = (1, 8, 32)
CPU = Resource("cpu", ResourceType.CPU, "host CPU")
TEXTS = [f"sentence number {i} about heterogeneous hardware and model serving" for i in range(64)]


@dataclass
class Case:
    backend: str
    kind: str  # "generate" | "embed" | "tensor"
    make_config: Callable[[Path], ModelConfig]
    unit: str


def _llamacpp(threads: int) -> Case:
    return Case(
        "llamacpp",
        "generate",
        lambda _: ModelConfig("smollm2", smollm2_gguf_path(), "chat", options={"n_threads": threads}),
        "tok/s",
    )


def _transformers(threads: int) -> Case:
    return Case(
        "transformers",
        "generate",
        lambda _: ModelConfig(
            "smollm2", smollm2_gguf_path(), "chat", max_batch_size=32, options={"num_threads": threads}
        ),
        "tok/s",
    )


def _onnx(name: str, threads: int) -> Case:
    return Case(
        name,
        "embed",
        lambda _: ModelConfig(
            "minilm", minilm_path(), "embedding", max_batch_size=32, options={"num_threads": threads}
        ),
        "emb/s",
    )


def _binary() -> Case:
    def config(work: Path) -> ModelConfig:
        import numpy as np

        from xpuflow.vendor_ref import build_reference_stack, export_mlp

        stack = build_reference_stack(work / "refnpu")
        rng = np.random.default_rng(0)
        widths = [256, 512, 512, 64]
        layers = [
            (rng.standard_normal((a, b)).astype(np.float32) * 0.05, np.zeros(b, np.float32))
            for a, b in itertools.pairwise(widths)
        ]
        export_mlp(layers, work / "mlp.xpfmlp")
        return ModelConfig(
            "mlp", work / "mlp.xpfmlp", "tensor", max_batch_size=32, options={"spec": str(stack.spec)}
        )

    return Case("binary", "tensor", config, "rows/s")


async def _throughput(session: Any, case: Case, batch: int, new_tokens: int, min_s: float) -> dict[str, Any]:
    params = GenerationParams(max_tokens=new_tokens, stop=())
    runs: list[float] = []
    items: list[int] = []

    async def once() -> int:
        if case.kind == "generate":
            chats = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(batch)]
            out = await session.chat_batch(chats, params)
            return sum(c.completion_tokens for c in out)
        if case.kind == "embed":
            await session.embed(TEXTS[:batch])
            return batch
        import numpy as np

        await session.run(np.ones((batch, 256), np.float32))
        return batch

    await once()  # warm-up
    started = time.perf_counter()
    while not runs or (time.perf_counter() - started < min_s and len(runs) < 200):
        t0 = time.perf_counter()
        items.append(await once())
        runs.append(time.perf_counter() - t0)
    rate = sum(items) / sum(runs)
    return {"rate": rate, "runs_s": runs, "items": items}


def _cache_hit_vs_miss(plugin: Any, config: ModelConfig, store_root: Path) -> dict[str, Any] | None:
    profiles = plugin.required_build_profiles([CPU], config)
    if not profiles:
        return None
    t0 = time.perf_counter()
    artifacts = build_all(plugin, [CPU], config, ArtifactStore(store_root))
    miss_s = time.perf_counter() - t0
    hits = []
    for _ in range(5):
        t0 = time.perf_counter()
        again = build_all(plugin, [CPU], config, ArtifactStore(store_root))
        hits.append(time.perf_counter() - t0)
        assert all(a.metadata.get("hit") for a in again.values()), "expected cache hits"
    hit_s = statistics.median(hits)
    return {
        "profiles": [p.name for p in profiles],
        "miss_s": miss_s,
        "hit_s": hit_s,
        "hit_runs_s": hits,
        "hit_over_miss": hit_s / miss_s,
        "artifact_bytes": sum(
            int(s) for a in artifacts.values() for s in a.metadata.get("sizes", {}).values()
        ),
    }


async def _bench_case(case: Case, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    plugin = get_backend(case.backend)
    availability = plugin.availability()
    if not availability.available:
        return {"skipped": availability.reason}
    config = case.make_config(work)
    cache = _cache_hit_vs_miss(plugin, config, work / "store")
    artifacts = build_all(plugin, [CPU], config, ArtifactStore(work / "store"))
    t0 = time.perf_counter()
    session = await plugin.create_session([CPU], config, artifacts)
    load_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "unit": case.unit,
        "load_s": load_s,
        "batch_mode": str(session.batch_mode.value),
    }
    try:
        for batch in BATCHES:
            result[f"batch_{batch}"] = await _throughput(
                session, case, batch, args.new_tokens, args.min_seconds
            )
    finally:
        await session.close()
    if cache is not None:
        result["cache"] = cache
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="llamacpp,transformers,onnxruntime,openvino,binary")
    parser.add_argument("--threads", type=int, default=1, help="threads per backend (1: repeatable here)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--min-seconds", type=float, default=2.0, help="time per batch size, at least one run"
    )
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    cases = {
        "llamacpp": _llamacpp(args.threads),
        "transformers": _transformers(args.threads),
        "onnxruntime": _onnx("onnxruntime", args.threads),
        "openvino": _onnx("openvino", args.threads),
        "binary": _binary(),
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="xpuflow-bench-") as tmp:
        for name in args.backends.split(","):
            print(f"... {name}", flush=True)
            try:
                results[name] = asyncio.run(_bench_case(cases[name], Path(tmp) / name, args))
            except Exception as exc:  # one backend failing must not lose the others' figures
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    rows = []
    for name, res in results.items():
        if "batch_1" not in res:
            rows.append((name, "-", "-", "-", "-", "-", res.get("skipped") or res.get("error", "")))
            continue
        cache = res.get("cache")
        cache_txt = f"{cache['hit_s'] * 1000:.1f} ms / {cache['miss_s']:.2f} s" if cache else "no build step"
        ratio = f"{cache['hit_over_miss']:.3f}" if cache else "-"
        rates = [f"{res[f'batch_{b}']['rate']:.1f}" for b in BATCHES]
        rows.append((name, res["unit"], *rates, cache_txt, ratio))
    print_table(
        f"backend throughput (threads={args.threads}, {args.new_tokens} new tokens)",
        rows,
        ("backend", "unit", "batch 1", "batch 8", "batch 32", "hit / miss", "hit/miss"),
    )
    path = write_results(
        "backends",
        {
            "threads": args.threads,
            "new_tokens": args.new_tokens,
            "batches": list(BATCHES),
            "target_hit_over_miss": 0.10,
            "backends": results,
        },
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
