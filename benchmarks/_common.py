"""Shared helpers for benchmarks: whole-process timing, medians, tables and JSON results."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

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


def time_process(argv: list[str], runs: int, env: dict[str, str] | None = None) -> list[float]:
    """Wall-clock milliseconds of each of ``runs`` executions of ``argv`` (after one warm-up run)."""
    subprocess.run(argv, check=True, capture_output=True, env=env)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
    }


def machine() -> dict[str, Any]:
    import os

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({**data, "machine": machine(), "measured_at": time.time()}, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(title)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


async def smollm2_session(max_batch_size: int, *, continuous: bool = False) -> tuple[Any, Path]:
    """SmolLM2-135M-Instruct on the CPU through the ``transformers`` backend, one torch thread (the GGUF
    is dequantised once into the artifact store), optionally with ``options.continuous_batching``.
    Returns the session and the dequantised model folder."""
    from xpuflow.backends.base import ModelConfig
    from xpuflow.backends.transformers import DEQUANT_PROFILE, TransformersPlugin
    from xpuflow.build.builder import build_all
    from xpuflow.build.store import ArtifactStore
    from xpuflow.bundled import smollm2_gguf_path
    from xpuflow.types import Resource, ResourceType

    cpu = Resource("cpu", ResourceType.CPU, "host CPU")
    plugin = TransformersPlugin()
    options = {"num_threads": 1, "continuous_batching": continuous}
    config = ModelConfig(
        "smollm2", smollm2_gguf_path(), "chat", max_batch_size=max_batch_size, options=options
    )
    artifacts = build_all(plugin, [cpu], config, ArtifactStore())
    session = await plugin.create_session([cpu], config, artifacts)
    return session, artifacts[DEQUANT_PROFILE].path
