"""What a load run measured: percentiles, rates and errors, as a table, as JSON and as a PNG plot::

summary = summarize(result)            # plain data, documented in docs/bench.md
render_summary(summary, console)       # the percentile table
write_json(Path("run.json"), result, summary)
write_plot(Path("run.png"), result)    # needs matplotlib (the "bench" extra)
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpuflow.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

    from xpuflow.loadgen.runner import BenchResult

__all__ = ["PERCENTILES", "percentiles", "render_summary", "summarize", "write_json", "write_plot"]

PERCENTILES = (50, 90, 99)
JSON_FORMAT_VERSION = 1
#: Open-loop sends later than this (p99) are reported: the load was not the one asked for.
LATE_SEND_WARN_MS = 10.0


def percentiles(values_ms: Sequence[float]) -> dict[str, float] | None:
    """mean, p50, p90, p99, min and max (linear interpolation between ranks); None for no values."""
    if not values_ms:
        return None
    ordered = sorted(values_ms)
    stats = {"mean": sum(ordered) / len(ordered), "min": ordered[0], "max": ordered[-1]}
    for p in PERCENTILES:
        rank = (len(ordered) - 1) * p / 100.0
        low = math.floor(rank)
        high = min(low + 1, len(ordered) - 1)
        stats[f"p{p}"] = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return {k: round(v, 3) for k, v in stats.items()}


def summarize(result: BenchResult) -> dict[str, Any]:
    """The run's numbers. Latency percentiles cover successful requests; ``requests_per_s`` and
    ``output_tokens_per_s`` are successful requests and their tokens per second of the whole run."""
    records = result.records
    ok = [r for r in records if r.ok]
    wall_s = max(result.wall_s, 1e-9)
    lateness = [max(0.0, r.start_s - r.scheduled_s) * 1000.0 for r in records if r.scheduled_s is not None]
    errors = Counter(r.outcome for r in records if not r.ok)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "errors_by_status": dict(sorted(errors.items())),
        "wall_s": round(result.wall_s, 3),
        "requests_per_s": round(len(ok) / wall_s, 3),
        "output_tokens": sum(r.output_tokens for r in ok),
        "output_tokens_per_s": round(sum(r.output_tokens for r in ok) / wall_s, 3),
        "latency_ms": percentiles([r.latency_s * 1000.0 for r in ok]),
        "ttft_ms": percentiles([r.ttft_s * 1000.0 for r in ok if r.ttft_s is not None]),
        "itl_ms": percentiles([gap * 1000.0 for r in ok for gap in r.itl_s]),
        "send_lateness_ms": percentiles(lateness),
        "first_errors": [f"{r.outcome}: {r.error}" for r in records if not r.ok][:5],
    }


def render_summary(summary: dict[str, Any], console: Console) -> None:
    """The percentile table, then throughput and errors."""
    from rich.table import Table

    table = Table(title="Latency (ms)", title_justify="left", header_style="bold")
    table.add_column("metric")
    for name in ("mean", *(f"p{p}" for p in PERCENTILES), "max"):
        table.add_column(name, justify="right")
    labels = {"latency_ms": "latency", "ttft_ms": "time to first token", "itl_ms": "inter-token latency"}
    for key, label in labels.items():
        stats = summary.get(key)
        if stats is None:
            table.add_row(label, *["–"] * (len(PERCENTILES) + 2))
            continue
        table.add_row(label, *(f"{stats[c]:.2f}" for c in ("mean", *(f"p{p}" for p in PERCENTILES), "max")))
    console.print(table)

    lines = [
        f"requests   {summary['ok']} ok, {summary['errors']} failed, of {summary['requests']} "
        f"in {summary['wall_s']:.2f} s",
        f"throughput {summary['requests_per_s']:.2f} requests/s, {summary['output_tokens_per_s']:.1f} "
        "output tokens/s",
    ]
    lateness = summary.get("send_lateness_ms")
    if lateness is not None and lateness["p99"] > LATE_SEND_WARN_MS:
        lines.append(
            f"late sends p50 {lateness['p50']:.1f} ms, p99 {lateness['p99']:.1f} ms: the arrivals were not "
            "kept (the client or --concurrency could not keep up)"
        )
    for line in lines:
        console.print(line, highlight=False)
    if summary["errors"]:
        errors = Table(title="Errors", title_justify="left", header_style="bold")
        errors.add_column("status")
        errors.add_column("count", justify="right")
        for status, count in summary["errors_by_status"].items():
            errors.add_row(status, str(count))
        console.print(errors)
        for line in summary["first_errors"]:
            console.print(f"  {line}", style="red", highlight=False, markup=False)


def write_json(path: Path, result: BenchResult, summary: dict[str, Any], *, per_request: bool = True) -> None:
    """The plan, the summary and (with ``per_request``) every request's record, as one JSON file."""
    data: dict[str, Any] = {
        "format_version": JSON_FORMAT_VERSION,
        "started_at_s": round(result.started_at_s, 3),
        "plan": result.plan.to_dict(),
        "summary": summary,
    }
    if per_request:
        data["requests"] = [r.to_dict() for r in sorted(result.records, key=lambda r: r.index)]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}", field="--json") from exc


def write_plot(path: Path, result: BenchResult) -> None:
    """A PNG: latency (and time to first token) of each request over the run, and their histogram."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(
            "--plot needs matplotlib: pip install 'xpuflow[bench]' (or pip install matplotlib)",
            field="--plot",
        ) from exc

    ok = [r for r in result.records if r.ok]
    failed = [r for r in result.records if not r.ok]
    ttft = [r for r in ok if r.ttft_s is not None]
    figure = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    over_time, histogram = figure.subplots(1, 2, width_ratios=(3, 2))

    over_time.scatter([r.start_s for r in ok], [r.latency_s * 1000 for r in ok], s=8, label="latency")
    if ttft:
        over_time.scatter(
            [r.start_s for r in ttft], [r.ttft_s * 1000 for r in ttft if r.ttft_s is not None], s=8,
            label="time to first token",
        )  # fmt: skip
    if failed:
        over_time.scatter(
            [r.start_s for r in failed], [r.latency_s * 1000 for r in failed], s=18, marker="x",
            color="tab:red", label=f"failed ({len(failed)})",
        )  # fmt: skip
    if ok:
        stats = percentiles([r.latency_s * 1000 for r in ok]) or {}
        for name, style in (("p50", "--"), ("p99", ":")):
            over_time.axhline(
                stats[name], color="tab:blue", linestyle=style, linewidth=1, label=f"latency {name}"
            )
    over_time.set_xlabel("request start (s since the run began)")
    over_time.set_ylabel("ms")
    over_time.set_title("Latency over time")
    over_time.grid(alpha=0.3)
    if ok or failed:
        over_time.legend(loc="upper left", fontsize="small")

    if ok:
        latencies = [r.latency_s * 1000 for r in ok]
        histogram.hist(latencies, bins=min(50, max(5, len(ok) // 4)), alpha=0.8, label="latency")
        if ttft:
            histogram.hist(
                [r.ttft_s * 1000 for r in ttft if r.ttft_s is not None], bins=min(50, max(5, len(ttft) // 4)),
                alpha=0.6, label="time to first token",
            )  # fmt: skip
        histogram.legend(fontsize="small")
    else:
        histogram.text(0.5, 0.5, "no successful requests", ha="center", va="center")
    histogram.set_xlabel("ms")
    histogram.set_ylabel("requests")
    histogram.set_title("Latency histogram")
    histogram.grid(alpha=0.3)
    figure.suptitle(
        f"xpuflow bench: {result.plan.endpoint} ({len(ok)} ok, {len(failed)} failed)", fontsize="medium"
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}", field="--plot") from exc
