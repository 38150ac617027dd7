"""What the load generator sends and when: prompts, fixed-rate arrivals, and replayed production traces.

A run is a sequence of ``RequestSpec``s. With a fixed concurrency a spec has no send time (it goes as
soon as a client is free); with a fixed rate or a trace it carries its offset from the start of the run::

    specs = rate_specs(prompts, rate_per_s=20.0, max_tokens=64, rng=random.Random(0))
    rows = read_trace(Path("AzureLLMInferenceTrace_conv.csv"), limit=500)
    specs = trace_specs(rows, speedup=10.0, max_prompt_tokens=2048, rng=random.Random(0))

Trace formats: the Azure LLM inference trace (CSV: ``TIMESTAMP,ContextTokens,GeneratedTokens``) and the
Mooncake trace (JSON lines: ``timestamp`` in milliseconds, ``input_length``, ``output_length``). Their token
counts become ``max_tokens`` and the length of a synthetic prompt.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xpuflow.errors import ConfigError

__all__ = [
    "DEFAULT_PROMPTS",
    "Prompt",
    "RequestSpec",
    "TraceRow",
    "closed_loop_specs",
    "load_prompts",
    "rate_specs",
    "read_azure_trace",
    "read_mooncake_trace",
    "read_trace",
    "synthetic_prompt",
    "trace_specs",
]

Message = dict[str, str]


@dataclass(frozen=True)
class Prompt:
    """Chat messages; ``text`` is what a plain completion endpoint gets (the last message's content)."""

    messages: tuple[Message, ...]

    @classmethod
    def of(cls, text: str) -> Prompt:
        return cls(({"role": "user", "content": text},))

    @property
    def text(self) -> str:
        return self.messages[-1]["content"] if self.messages else ""


@dataclass(frozen=True)
class RequestSpec:
    """One request of a run. ``offset_s`` is when to send it after the start (None: when a client is
    free)."""

    prompt: Prompt
    max_tokens: int
    offset_s: float | None = None


@dataclass(frozen=True)
class TraceRow:
    """One request of a production trace: its arrival after the first row, and its token counts."""

    offset_s: float
    input_tokens: int
    output_tokens: int


DEFAULT_PROMPTS: tuple[Prompt, ...] = tuple(
    Prompt.of(text)
    for text in (
        "Explain in two sentences why the sky is blue.",
        "Write a haiku about a GPU waiting for work.",
        "List three differences between a CPU and an NPU.",
        "Summarise the plot of Hamlet in one paragraph.",
        "What is the capital of Australia, and why is it not Sydney?",
        "Translate 'the model is loading, please wait' into French and German.",
        "Give a short Python function that reverses a string.",
        "Why do batch sizes matter for inference throughput?",
    )
)

# Short common words: each is one token with its leading space for most tokenizers, so a prompt of N
# words is close to N tokens.
_WORD_TEXT = (
    "the of and to in is for on that with as it be at by this from or an are was have not but all "
    "can new more one time use data work model system will about two first over each any make may "
    "such way part day well how back long high open small large light fast water point case group "
    "world number"
)
_WORDS = tuple(_WORD_TEXT.split())


def synthetic_prompt(num_tokens: int, rng: random.Random) -> Prompt:
    """A prompt of about ``num_tokens`` tokens of common words (different for each call, so no server
    cache serves it from an earlier identical prompt)."""
    count = max(1, num_tokens)
    return Prompt.of(" ".join(rng.choice(_WORDS) for _ in range(count)))


def load_prompts(path: Path) -> tuple[Prompt, ...]:
    """Prompts from a file: JSON lines with ``{"prompt": "..."}`` or ``{"messages": [...]}``
    (``.jsonl``), or plain text with one prompt per non-empty line (any other name)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read prompts from {path}: {exc}", field="--prompts") from exc
    prompts: list[Prompt] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix.lower() in {".jsonl", ".ndjson"}:
            prompts.append(_json_prompt(line, path, number))
        else:
            prompts.append(Prompt.of(line.strip()))
    if not prompts:
        raise ConfigError(f"{path} holds no prompts; write one prompt per line", field="--prompts")
    return tuple(prompts)


def _json_prompt(line: str, path: Path, number: int) -> Prompt:
    where = f"{path}:{number}"
    try:
        item: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not JSON ({exc.msg})", field="--prompts") from exc
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return Prompt.of(item["prompt"])
    messages = item.get("messages") if isinstance(item, dict) else None
    if (
        isinstance(messages, list)
        and messages
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
    ):
        return Prompt(tuple({"role": str(m.get("role", "user")), "content": m["content"]} for m in messages))
    raise ConfigError(
        f'{where} needs {{"prompt": "..."}} or {{"messages": [{{"role": ..., "content": ...}}]}}',
        field="--prompts",
    )


# -- traces -------------------------------------------------------------------------------------------


def _azure_time_s(value: str) -> float:
    # "2023-11-16 18:17:03.9799600": seven fractional digits, more than datetime parses everywhere.
    stamp, _, fraction = value.strip().partition(".")
    whole = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return whole + (float("0." + fraction) if fraction.isdigit() else 0.0)


def _rows_from_stamps(items: Iterable[tuple[float, int, int]]) -> Iterator[TraceRow]:
    first: float | None = None
    for stamp_s, tokens_in, tokens_out in items:
        first = stamp_s if first is None else first
        yield TraceRow(max(0.0, stamp_s - first), max(0, tokens_in), max(0, tokens_out))


def read_azure_trace(path: Path, limit: int | None = None) -> list[TraceRow]:
    """The first ``limit`` rows (all when None) of an Azure LLM inference trace CSV."""

    def parse() -> Iterator[tuple[float, int, int]]:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
            if missing:
                raise ConfigError(
                    f"{path} is not an Azure trace: no column(s) {', '.join(sorted(missing))}",
                    field="--trace",
                )
            for number, row in enumerate(reader, start=2):
                try:
                    yield (
                        _azure_time_s(row["TIMESTAMP"]),
                        int(row["ContextTokens"]),
                        int(row["GeneratedTokens"]),
                    )
                except (TypeError, ValueError) as exc:
                    raise ConfigError(
                        f"{path}:{number}: bad trace row {row}: {exc}", field="--trace"
                    ) from exc

    return _read(path, parse, limit)


def read_mooncake_trace(path: Path, limit: int | None = None) -> list[TraceRow]:
    """The first ``limit`` rows (all when None) of a Mooncake trace (JSON lines, times in ms)."""

    def parse() -> Iterator[tuple[float, int, int]]:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    yield (
                        float(item["timestamp"]) / 1000.0,
                        int(item["input_length"]),
                        int(item["output_length"]),
                    )
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise ConfigError(
                        f"{path}:{number}: not a Mooncake trace row (needs timestamp, input_length, "
                        f"output_length): {exc}",
                        field="--trace",
                    ) from exc

    return _read(path, parse, limit)


def _read(path: Path, parse: Any, limit: int | None) -> list[TraceRow]:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    try:
        return list(itertools.islice(_rows_from_stamps(parse()), limit))
    except OSError as exc:
        raise ConfigError(f"cannot read trace {path}: {exc}", field="--trace") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a text trace: {exc}", field="--trace") from exc


def read_trace(path: Path, limit: int | None = None) -> list[TraceRow]:
    """A trace by its file name: ``.csv`` is the Azure format, ``.jsonl``/``.json`` the Mooncake one."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_azure_trace(path, limit)
    if suffix in {".jsonl", ".json", ".ndjson"}:
        return read_mooncake_trace(path, limit)
    raise ConfigError(
        f"unknown trace format '{path.name}': use an Azure trace (.csv) or a Mooncake trace (.jsonl)",
        field="--trace",
    )


# -- schedules ----------------------------------------------------------------------------------------


def closed_loop_specs(prompts: Sequence[Prompt], max_tokens: int) -> Iterator[RequestSpec]:
    """Endless specs without send times, cycling through ``prompts`` (the runner bounds the run)."""
    for prompt in itertools.cycle(prompts):
        yield RequestSpec(prompt, max_tokens)


def rate_specs(
    prompts: Sequence[Prompt],
    *,
    rate_per_s: float,
    max_tokens: int,
    rng: random.Random,
    poisson: bool = True,
) -> Iterator[RequestSpec]:
    """Endless specs at ``rate_per_s`` on average: exponential gaps (a Poisson process, how independent
    clients arrive) or, with ``poisson=False``, evenly spaced ones."""
    if rate_per_s <= 0:
        raise ConfigError(f"--rate must be > 0 requests per second, got {rate_per_s}", field="--rate")

    def specs() -> Iterator[RequestSpec]:
        offset_s = 0.0
        for prompt in itertools.cycle(prompts):
            yield RequestSpec(prompt, max_tokens, offset_s)
            offset_s += rng.expovariate(rate_per_s) if poisson else 1.0 / rate_per_s

    return specs()


def trace_specs(
    rows: Iterable[TraceRow],
    *,
    speedup: float,
    rng: random.Random,
    max_prompt_tokens: int,
    max_tokens_cap: int | None = None,
) -> Iterator[RequestSpec]:
    """Specs replaying ``rows``: arrivals ``speedup`` times faster than recorded, a synthetic prompt of
    the row's input length (at most ``max_prompt_tokens``), and ``max_tokens`` set to its output length
    (at most ``max_tokens_cap`` when given)."""
    if speedup <= 0:
        raise ConfigError(f"--speedup must be > 0, got {speedup}", field="--speedup")

    def specs() -> Iterator[RequestSpec]:
        for row in rows:
            max_tokens = max(1, row.output_tokens)
            if max_tokens_cap is not None:
                max_tokens = min(max_tokens, max_tokens_cap)
            prompt = synthetic_prompt(min(row.input_tokens, max_prompt_tokens), rng)
            yield RequestSpec(prompt, max_tokens, row.offset_s / speedup)

    return specs()
