"""Device models fitted from measurements: ``xpuflow bench --json`` runs or ``backends.json``.

    model = fit_bench_runs([Path("c1.json"), Path("c8.json")], name="a100")   # one run per concurrency
    model = fit_backends_json(Path("benchmarks/results/backends.json"), backend="llamacpp")
    save_device_model(model, "a100.yaml")

From ``xpuflow bench`` runs (streamed, so TTFT is measured): each run is one batch-size point, its
``plan.concurrency``. Prefill speed is the median of ``prompt_tokens / TTFT`` over the run's successful
requests (requests without ``prompt_tokens`` use ``prompt_tokens_guess``: the bench's synthetic prompts
are about one token per word); the aggregate decode speed is the median per-request
``(output_tokens - 1) / (latency - TTFT)`` times the concurrency.

From ``backends.json``: its ``batch_N.rate`` (generated tokens per second over a batch of N) is the
decode speed at N. That benchmark does not time prompts apart, so prefill speed is ``prefill_ratio``
times the batch-1 decode speed (10 by default: prompt tokens go through in parallel; measure it with
``xpuflow bench`` where it matters).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xpuflow.errors import ConfigError
from xpuflow.simulate.device_model import DeviceModel

__all__ = ["fit_backends_json", "fit_bench_runs"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", field="FILES") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not JSON: {exc.msg} at line {exc.lineno}", field="FILES") from exc


def fit_backends_json(
    path: Path,
    backend: str,
    *,
    name: str | None = None,
    prefill_ratio: float = 10.0,
    max_batch_size: int | None = None,
    memory_bytes: int | None = None,
) -> DeviceModel:
    """The device model of ``backend`` in a ``benchmarks/backends.py`` result file."""
    data = _read_json(path)
    backends = data.get("backends") if isinstance(data, dict) else None
    if not isinstance(backends, dict):
        raise ConfigError(
            f"{path} has no 'backends' object; is it benchmarks/results/backends.json?",
            field="FILES",
        )
    entry = backends.get(backend)
    if not isinstance(entry, dict):
        raise ConfigError(
            f"{path} has no backend '{backend}'; it has: {', '.join(backends)}",
            field="--backend",
        )
    if entry.get("unit") != "tok/s":
        raise ConfigError(
            f"backend '{backend}' in {path} measures {entry.get('unit')}, not generated tokens/s",
            field="--backend",
        )
    decode: dict[int, float] = {}
    for key, value in entry.items():
        if (
            key.startswith("batch_")
            and isinstance(value, dict)
            and isinstance(value.get("rate"), (int, float))
        ):
            decode[int(key.removeprefix("batch_"))] = float(value["rate"])
    if not decode:
        raise ConfigError(
            f"backend '{backend}' in {path} has no batch_N.rate measurements",
            field="--backend",
        )
    first = decode[min(decode)]
    return DeviceModel(
        name=name or backend,
        prefill_tokens_per_s={1: first * prefill_ratio},
        decode_tokens_per_s=decode,
        max_batch_size=max_batch_size or max(decode),
        memory_bytes=memory_bytes,
        source=f"fitted from {path.name} ({backend}); prefill = {prefill_ratio:g} x batch-1 decode (assumed)",
    )


def fit_bench_runs(
    paths: Sequence[Path],
    *,
    name: str,
    prompt_tokens_guess: int | None = None,
    max_batch_size: int | None = None,
    memory_bytes: int | None = None,
) -> DeviceModel:
    """A device model from ``xpuflow bench --json`` runs, one batch-size point per run (its concurrency)."""
    prefill: dict[int, float] = {}
    decode: dict[int, float] = {}
    for path in paths:
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("requests"), list):
            raise ConfigError(
                f"{path} is not `xpuflow bench --json` output (no 'requests' list)",
                field="FILES",
            )
        concurrency = int((data.get("plan") or {}).get("concurrency") or 1)
        prefill_rates: list[float] = []
        decode_rates: list[float] = []
        for record in data["requests"]:
            if record.get("outcome") != "ok" or not record.get("ttft_ms") or not record.get("latency_ms"):
                continue
            ttft_s = record["ttft_ms"] / 1000.0
            prompt = record.get("prompt_tokens") or prompt_tokens_guess
            if prompt:
                prefill_rates.append(prompt / ttft_s)
            tokens = record.get("output_tokens") or 0
            decode_s = (record["latency_ms"] - record["ttft_ms"]) / 1000.0
            if tokens > 1 and decode_s > 0:
                decode_rates.append((tokens - 1) / decode_s)
        if not decode_rates:
            raise ConfigError(
                f"{path}: no successful streamed request with more than one output token; run the bench with "
                "--stream and a --max-tokens above 1",
                field="FILES",
            )
        decode[concurrency] = statistics.median(decode_rates) * concurrency
        if prefill_rates:
            prefill[concurrency] = statistics.median(prefill_rates)
    if not prefill:
        raise ConfigError(
            "no run reports prompt_tokens; pass --prompt-tokens N (the bench's prompt length)",
            field="--prompt-tokens",
        )
    return DeviceModel(
        name=name,
        prefill_tokens_per_s=prefill,
        decode_tokens_per_s=decode,
        max_batch_size=max_batch_size or max(decode),
        memory_bytes=memory_bytes,
        source="fitted from xpuflow bench runs: " + ", ".join(p.name for p in paths),
    )
