"""Request traces for the simulator: the shipped public traces by name, or a file of your own.

    requests = load_trace("azure-conv", search_dirs=default_trace_dirs(), duration_s=600)
    requests = load_trace("my_trace.jsonl")

Names: ``azure-conv`` and ``azure-code`` (Azure LLM inference trace 2023), ``mooncake`` (Mooncake
conversation trace), or one of their file names. They are looked up in ``search_dirs`` (in order);
a name that is in none of them is an error that lists where it looked.

Files of your own: JSON lines ``{"arrival_s": 0.12, "input_tokens": 900, "output_tokens": 64}``
(``priority``: high, normal or low, optional), or a CSV with the header
``arrival_s,input_tokens,output_tokens``. Arrival times are seconds from any origin, in order. A file
that is neither an Azure nor a Mooncake trace is read in this format; a bad row is an error naming the
file, the line and the field.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from xpuflow.errors import ConfigError
from xpuflow.loadgen.arrivals import read_azure_trace, read_mooncake_trace
from xpuflow.scheduling.request import Priority

__all__ = [
    "NAMED_TRACES",
    "SimRequest",
    "default_trace_dirs",
    "load_trace",
    "resolve_trace",
    "slice_trace",
]

NAMED_TRACES = {
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
    "azure-code": "AzureLLMInferenceTrace_code.csv",
    "mooncake": "mooncake_conversation_trace.jsonl",
}

_FIELDS = ("arrival_s", "input_tokens", "output_tokens")


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request of a trace: arrival (seconds from the first), token counts, priority."""

    arrival_s: float
    input_tokens: int
    output_tokens: int
    priority: Priority = Priority.NORMAL


def default_trace_dirs(cwd: Path | None = None) -> list[Path]:
    """Where named traces are looked up: ``./traces``, ``../shared/data/traces`` and
    ``../data/traces`` from the working directory, and ``shared/data/traces`` beside a source checkout."""
    here = Path.cwd() if cwd is None else cwd
    dirs = [
        here / "traces",
        here.parent / "shared" / "data" / "traces",
        here.parent / "data" / "traces",
    ]
    checkout = Path(__file__).resolve().parents[3]  # src/xpuflow/simulate/trace.py -> the project
    dirs.append(checkout.parent / "shared" / "data" / "traces")
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def resolve_trace(name: str, search_dirs: Sequence[Path] = ()) -> Path:
    """The file of a trace given by name or path; ConfigError saying where it looked."""
    direct = Path(os.path.expanduser(name))
    if direct.is_file():
        return direct
    file_name = NAMED_TRACES.get(name, name)
    for folder in search_dirs:
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(d) for d in search_dirs) or "no folders"
    raise ConfigError(
        f"trace '{name}' not found: it is not a file, and {file_name} is not in {looked}; pass a path, "
        f"--trace-dir DIR, or a name: {', '.join(NAMED_TRACES)}",
        field="--trace",
    )


def load_trace(
    name: str,
    search_dirs: Sequence[Path] = (),
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    limit: int | None = None,
) -> list[SimRequest]:
    """Read a trace and cut it to ``[start_s, start_s + duration_s)`` (then at most ``limit`` rows);
    arrivals are re-based to the first kept row."""
    path = resolve_trace(name, search_dirs)
    requests = _read(path)
    if not requests:
        raise ConfigError(f"trace {path} holds no requests", field="--trace")
    return slice_trace(requests, start_s=start_s, duration_s=duration_s, limit=limit)


def slice_trace(
    requests: Sequence[SimRequest],
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    limit: int | None = None,
) -> list[SimRequest]:
    """The requests arriving in ``[start_s, start_s + duration_s)``, at most ``limit``, re-based to 0."""
    end = float("inf") if duration_s is None else start_s + duration_s
    kept = [r for r in requests if start_s <= r.arrival_s < end]
    if limit is not None:
        kept = kept[:limit]
    if not kept:
        raise ConfigError(
            f"no request of the trace arrives in [{start_s:g} s, {end:g} s)",
            field="--start-s",
        )
    origin = kept[0].arrival_s
    return [SimRequest(r.arrival_s - origin, r.input_tokens, r.output_tokens, r.priority) for r in kept]


def _read(path: Path) -> list[SimRequest]:
    suffix = path.suffix.lower()
    try:
        with path.open(encoding="utf-8") as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read trace {path}: {exc}", field="--trace") from exc
    if suffix == ".csv" and first.startswith("TIMESTAMP"):
        rows = read_azure_trace(path)
    elif suffix in {".jsonl", ".json", ".ndjson"} and '"input_length"' in first:
        rows = read_mooncake_trace(path)
    else:
        return _sorted(path, list(_read_own(path, suffix)))
    return [SimRequest(r.offset_s, r.input_tokens, max(1, r.output_tokens)) for r in rows]


def _sorted(path: Path, requests: list[SimRequest]) -> list[SimRequest]:
    if not requests:
        return requests
    origin = min(r.arrival_s for r in requests)
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    return [SimRequest(r.arrival_s - origin, r.input_tokens, r.output_tokens, r.priority) for r in ordered]


def _read_own(path: Path, suffix: str) -> Iterator[SimRequest]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            if suffix == ".csv":
                reader = csv.DictReader(handle)
                missing = [f for f in _FIELDS if f not in (reader.fieldnames or ())]
                if missing:
                    raise ConfigError(
                        f"{path}:1: the CSV header needs {', '.join(_FIELDS)}; missing {', '.join(missing)}",
                        field=missing[0],
                    )
                for number, row in enumerate(reader, start=2):
                    yield _row(path, number, row)
                return
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{number}: not JSON ({exc.msg})", field="--trace") from exc
                if not isinstance(item, dict):
                    raise ConfigError(
                        f"{path}:{number}: each line must be a JSON object",
                        field="--trace",
                    )
                yield _row(path, number, item)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a text trace: {exc}", field="--trace") from exc


def _row(path: Path, number: int, item: dict[str, object]) -> SimRequest:
    values: list[float] = []
    for name in _FIELDS:
        raw = item.get(name)
        if raw is None or raw == "":
            raise ConfigError(f"{path}:{number}: field '{name}' is missing", field=name)
        try:
            value = float(str(raw))
        except ValueError:
            raise ConfigError(
                f"{path}:{number}: field '{name}' is not a number: {raw!r}", field=name
            ) from None
        if not value >= 0 or value == float("inf"):
            raise ConfigError(
                f"{path}:{number}: field '{name}' must be a finite number >= 0, got {raw!r}",
                field=name,
            )
        if name != "arrival_s" and value != int(value):
            raise ConfigError(
                f"{path}:{number}: field '{name}' must be a whole number, got {raw!r}",
                field=name,
            )
        values.append(value)
    priority = Priority.NORMAL
    if item.get("priority") not in (None, ""):
        try:
            priority = Priority.parse(str(item["priority"]))
        except ConfigError:
            raise ConfigError(
                f"{path}:{number}: field 'priority' must be high, normal or low, got {item['priority']!r}",
                field="priority",
            ) from None
    return SimRequest(values[0], int(values[1]), max(1, int(values[2])), priority)
