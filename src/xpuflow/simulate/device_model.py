"""A device's service times as data: prefill and decode speed as functions of batch size, and memory.

The simulator and the fake backend (``options.device_model``) both run requests through a
``DeviceModel``, so a simulated fleet and a gateway driven by sleeping fake workers see the same service
times::

    model = load_device_model("models/a100.yaml")
    timing = model.batch_timing([(900, 64), (1200, 64)])   # (input tokens, output tokens) per request
    timing.total_s, timing.first_token_s

A batch of ``n`` requests (xpuflow's workers run a batch to its end: static batching) takes::

    prefill_s  = overhead_s + sum(input_i) / prefill_tokens_per_s(n)
    step_s     = n / decode_tokens_per_s(n)          decode_tokens_per_s is the aggregate over the batch
    total_s    = prefill_s + max(output_i) * step_s
    first token of every request: prefill_s + step_s

A device that batches continuously (``continuous: true``: a transformers session with continuous
batching, a vLLM/SGLang/TGI server behind ``remote_openai``) takes each request as it comes, up to
``max_batch_size`` at once, and runs it beside the others; a request that starts with ``n`` running
(itself included) takes ``request_timing``::

    prefill_s = overhead_s + input / prefill_tokens_per_s(n)
    step_s    = n / decode_tokens_per_s(n)           its share of the aggregate decode speed
    total_s   = prefill_s + output * step_s

``n`` is taken when the request starts and kept to its end (requests that join or leave later do not
change it): a simplification of the device's step-by-step sharing that keeps the time of a request
known when it starts, so the simulator and the fake backend compute the same number.

Speeds between measured batch sizes are interpolated linearly; beyond the largest measured size the
aggregate speed stays flat (the device is saturated), below the smallest it is the smallest one's.

File format (YAML or JSON; ``docs/simulate.md``)::

    format_version: 1
    name: a100-llama8b
    max_batch_size: 32
    overhead_s: 0.002
    prefill_tokens_per_s: {1: 9000, 8: 14000}
    decode_tokens_per_s: {1: 55, 8: 380, 32: 1100}
    continuous: false                # optional: true when the device batches by itself
    memory_bytes: 85899345920        # optional: device memory
    weights_bytes: 16000000000       # optional: what the model holds whatever the load
    kv_bytes_per_token: 131072       # optional: KV cache per token in flight
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xpuflow.errors import ConfigError

__all__ = [
    "FORMAT_VERSION",
    "BatchTiming",
    "DeviceModel",
    "load_device_model",
    "save_device_model",
]

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class BatchTiming:
    """Seconds one batch takes: to its first tokens (``first_token_s``) and to its end (``total_s``)."""

    prefill_s: float
    step_s: float
    first_token_s: float
    total_s: float


def _curve(points: Mapping[int, float], what: str, name: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    if not points:
        raise ConfigError(f"device model '{name}' has no {what} points; give at least one", field=what)
    sizes: list[int] = []
    rates: list[float] = []
    for size, rate in sorted((int(k), float(v)) for k, v in points.items()):
        if size < 1 or not rate > 0:
            raise ConfigError(
                f"device model '{name}' {what}: batch {size} -> {rate}; batch sizes must be >= 1 and "
                "speeds > 0 tokens/s",
                field=what,
            )
        sizes.append(size)
        rates.append(rate)
    return tuple(sizes), tuple(rates)


def _interpolate(sizes: tuple[int, ...], rates: tuple[float, ...], batch: int) -> float:
    if batch <= sizes[0]:
        return rates[0]
    if batch >= sizes[-1]:
        return rates[-1]
    i = bisect_right(sizes, batch)
    lo, hi = sizes[i - 1], sizes[i]
    return rates[i - 1] + (rates[i] - rates[i - 1]) * (batch - lo) / (hi - lo)


@dataclass(frozen=True)
class DeviceModel:
    """Service-time model of one device running one model (see the module docstring)."""

    name: str
    prefill_tokens_per_s: Mapping[int, float]
    decode_tokens_per_s: Mapping[int, float]
    max_batch_size: int = 8
    overhead_s: float = 0.0
    memory_bytes: int | None = None
    weights_bytes: int = 0
    kv_bytes_per_token: int = 0
    source: str = ""
    continuous: bool = False
    _prefill: tuple[tuple[int, ...], tuple[float, ...]] = field(init=False, repr=False, compare=False)
    _decode: tuple[tuple[int, ...], tuple[float, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(
                f"device model '{self.name}': max_batch_size must be >= 1",
                field="max_batch_size",
            )
        if self.overhead_s < 0:
            raise ConfigError(
                f"device model '{self.name}': overhead_s must be >= 0",
                field="overhead_s",
            )
        if self.weights_bytes < 0 or self.kv_bytes_per_token < 0:
            raise ConfigError(
                f"device model '{self.name}': weights_bytes and kv_bytes_per_token must be >= 0",
                field="kv_bytes_per_token",
            )
        object.__setattr__(
            self,
            "_prefill",
            _curve(self.prefill_tokens_per_s, "prefill_tokens_per_s", self.name),
        )
        object.__setattr__(
            self,
            "_decode",
            _curve(self.decode_tokens_per_s, "decode_tokens_per_s", self.name),
        )

    def prefill_rate(self, batch: int) -> float:
        """Prompt tokens per second the device processes in a batch of ``batch``."""
        return _interpolate(*self._prefill, batch)

    def decode_rate(self, batch: int) -> float:
        """New tokens per second over a whole batch of ``batch`` (aggregate, not per request)."""
        return _interpolate(*self._decode, batch)

    def batch_timing(self, requests: Sequence[tuple[int, int]], slowdown: float = 1.0) -> BatchTiming:
        """Timing of one batch of (input tokens, output tokens) requests; ``slowdown`` scales it (a
        throttled or degraded device)."""
        if len(requests) == 1:  # the same arithmetic without the generators: most batches are one
            ((tokens_in, tokens_out),) = requests
            n = 1
            prefill_s = self.overhead_s + (tokens_in if tokens_in > 0 else 0) / self.prefill_rate(1)
            step_s = 1 / self.decode_rate(1)
            longest = tokens_out if tokens_out > 1 else 1
        else:
            n = max(1, len(requests))
            prefill_s = self.overhead_s + sum(max(0, i) for i, _ in requests) / self.prefill_rate(n)
            step_s = n / self.decode_rate(n)
            longest = max((max(1, o) for _, o in requests), default=1)
        return BatchTiming(
            prefill_s * slowdown,
            step_s * slowdown,
            (prefill_s + step_s) * slowdown,
            (prefill_s + longest * step_s) * slowdown,
        )

    def request_timing(
        self, input_tokens: int, output_tokens: int, concurrent: int = 1, slowdown: float = 1.0
    ) -> BatchTiming:
        """Timing of one request on a continuous device that runs ``concurrent`` requests (itself
        included) when it starts (see the module docstring)."""
        n = max(1, concurrent)
        prefill_s = self.overhead_s + max(0, input_tokens) / self.prefill_rate(n)
        step_s = n / self.decode_rate(n)
        return BatchTiming(
            prefill_s * slowdown,
            step_s * slowdown,
            (prefill_s + step_s) * slowdown,
            (prefill_s + max(1, output_tokens) * step_s) * slowdown,
        )

    def request_s(self, input_tokens: int, output_tokens: int) -> float:
        """Seconds one request takes alone (batch of one)."""
        return self.batch_timing([(input_tokens, output_tokens)]).total_s

    def throughput_per_s(self, requests: Sequence[tuple[int, int]], batch: int | None = None) -> float:
        """Requests per second the device serves when busy, for requests like these (input tokens,
        output tokens) run ``batch`` at a time (default: its ``max_batch_size``, the most a continuous
        device runs at once; for a static-batching device pass the batch size it achieves, 1 when its
        batches never fill). A static batch lasts as long as its longest request, so the pairs are
        taken as batches of consecutive requests."""
        if not requests:
            return 0.0
        if self.continuous:
            n = max(1, batch or self.max_batch_size)
            mean_s = sum(self.request_timing(i, o, n).total_s for i, o in requests) / len(requests)
            return n / mean_s if mean_s > 0 else 0.0
        n = max(1, min(batch or self.max_batch_size, self.max_batch_size))
        total_s = sum(
            self.batch_timing(list(requests[k : k + n])).total_s for k in range(0, len(requests), n)
        )
        return len(requests) / total_s if total_s > 0 else 0.0

    def memory_needed_bytes(self, input_tokens: int, output_tokens: int) -> int:
        """KV cache one request holds while it runs."""
        return self.kv_bytes_per_token * (max(0, input_tokens) + max(0, output_tokens))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "max_batch_size": self.max_batch_size,
            "overhead_s": self.overhead_s,
            "prefill_tokens_per_s": {int(k): float(v) for k, v in sorted(self.prefill_tokens_per_s.items())},
            "decode_tokens_per_s": {int(k): float(v) for k, v in sorted(self.decode_tokens_per_s.items())},
        }
        if self.memory_bytes is not None:
            data["memory_bytes"] = self.memory_bytes
        if self.weights_bytes:
            data["weights_bytes"] = self.weights_bytes
        if self.kv_bytes_per_token:
            data["kv_bytes_per_token"] = self.kv_bytes_per_token
        if self.source:
            data["source"] = self.source
        if self.continuous:
            data["continuous"] = True
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "<data>") -> DeviceModel:
        """Validate a parsed file; ConfigError naming the field and the file otherwise."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"device model {source} must be a mapping, got {type(data).__name__}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"device model {source}: format_version {version} is not supported (this xpuflow reads "
                f"{FORMAT_VERSION})",
                field="format_version",
            )
        known = {
            "format_version", "name", "max_batch_size", "overhead_s", "prefill_tokens_per_s",
            "decode_tokens_per_s", "memory_bytes", "weights_bytes", "kv_bytes_per_token", "source",
            "continuous",
        }  # fmt: skip
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise ConfigError(
                f"device model {source}: unknown field(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(known))}",
                field=unknown[0],
            )
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            if not isinstance(data.get(key), Mapping):
                raise ConfigError(
                    f"device model {source}: {key} must map batch size to tokens/s, e.g. {{1: 50, 8: 300}}",
                    field=key,
                )
        try:
            memory = data.get("memory_bytes")
            return cls(
                name=str(data.get("name") or Path(source).stem),
                prefill_tokens_per_s={int(k): float(v) for k, v in data["prefill_tokens_per_s"].items()},
                decode_tokens_per_s={int(k): float(v) for k, v in data["decode_tokens_per_s"].items()},
                max_batch_size=int(data.get("max_batch_size", 8)),
                overhead_s=float(data.get("overhead_s", 0.0)),
                memory_bytes=None if memory is None else int(float(memory)),
                weights_bytes=int(float(data.get("weights_bytes", 0))),
                kv_bytes_per_token=int(float(data.get("kv_bytes_per_token", 0))),
                source=str(data.get("source", "")),
                continuous=_flag(data.get("continuous", False), source),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"device model {source}: {exc}") from exc


def _flag(value: Any, source: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(
            f"device model {source}: continuous must be true or false, got {value!r}", field="continuous"
        )
    return value


def load_device_model(path: str | Path) -> DeviceModel:
    """Read a device model file (YAML or JSON)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"device model {file} cannot be read ({exc.strerror or exc}); write one with "
            "`xpuflow simulate-fit` or by hand (docs/simulate.md)",
            field="device_model",
        ) from exc
    try:
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"device model {file} is not valid YAML/JSON: {exc}", field="device_model") from exc
    return DeviceModel.from_dict(data, str(file))


def save_device_model(model: DeviceModel, path: str | Path) -> None:
    """Write ``model`` as YAML (or JSON for a ``.json`` name)."""
    file = Path(path)
    data = model.to_dict()
    text = (
        json.dumps(data, indent=2) + "\n"
        if file.suffix.lower() == ".json"
        else yaml.safe_dump(data, sort_keys=False)
    )
    file.write_text(text, encoding="utf-8")
