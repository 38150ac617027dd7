"""What a simulated run measured: latency percentiles, SLO attainment, goodput, utilisation, as numbers,
a table, JSON and a plot.

    slo = parse_slo("ttft_p99=2s,e2e_p99=30s")
    summary = summarize(result, slo)
    summary["e2e_s"]["p99"], summary["slo_attainment"], summary["goodput_per_s"]

A request *attains* the SLO when it was served with TTFT and end-to-end latency within the targets'
values; ``slo_attainment`` is the share of all requests that did, ``goodput_per_s`` their number per
second of the trace (first arrival to last arrival), ``by_deployment`` the same per deployment. A
fleet *meets* the SLO when the percentiles named by the targets (``p99`` of TTFT, ...) are within them
and every request was served.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xpuflow.errors import ConfigError
from xpuflow.simulate.engine import OUTCOMES, SimResult

__all__ = [
    "Slo",
    "meets_slo",
    "parse_slo",
    "percentile",
    "render_table",
    "summarize",
    "utilisation_series",
    "write_plot",
]

_TARGET = re.compile(r"^(ttft|e2e)_p([0-9]{1,2}(?:\.[0-9]+)?)=([0-9.]+)\s*(ms|s)?$")


@dataclass(frozen=True)
class Slo:
    """Latency targets: ``ttft_s``/``e2e_s`` at the percentiles ``ttft_pct``/``e2e_pct`` (None: none)."""

    ttft_s: float | None = 2.0
    ttft_pct: float = 99.0
    e2e_s: float | None = 30.0
    e2e_pct: float = 99.0

    def describe(self) -> str:
        parts = []
        if self.ttft_s is not None:
            parts.append(f"ttft_p{self.ttft_pct:g}={self.ttft_s:g}s")
        if self.e2e_s is not None:
            parts.append(f"e2e_p{self.e2e_pct:g}={self.e2e_s:g}s")
        return ",".join(parts)


def parse_slo(text: str) -> Slo:
    """``ttft_p99=2s,e2e_p99=30s`` (ms or s; a bare number is seconds). Targets left out are not checked."""
    values: dict[str, Any] = {"ttft_s": None, "e2e_s": None}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _TARGET.match(part)
        if not match:
            raise ConfigError(
                f"--slo '{part}': write ttft_pNN=VALUE or e2e_pNN=VALUE with s or ms, "
                "e.g. ttft_p99=2s,e2e_p99=30s",
                field="--slo",
            )
        metric, pct, value, unit = match.groups()
        seconds = float(value) / (1000.0 if unit == "ms" else 1.0)
        if not seconds > 0 or not 0 < float(pct) < 100:
            raise ConfigError(
                f"--slo '{part}': the value must be > 0 and the percentile in (0, 100)",
                field="--slo",
            )
        values[f"{metric}_s"] = seconds
        values[f"{metric}_pct"] = float(pct)
    if values["ttft_s"] is None and values["e2e_s"] is None:
        raise ConfigError("--slo names no target; e.g. ttft_p99=2s,e2e_p99=30s", field="--slo")
    return Slo(**values)


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Linear interpolation between ranks (numpy's default); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * pct / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "mean": sum(values) / len(values) if values else None,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


def utilisation_series(result: SimResult, buckets: int = 60) -> tuple[list[float], dict[str, list[float]]]:
    """Bucket start times and each worker's busy share per bucket."""
    span = max(result.span_s, 1e-9)
    width = span / buckets
    starts = [i * width for i in range(buckets)]
    series: dict[str, list[float]] = {}
    for worker, intervals in result.busy.items():
        busy = [0.0] * buckets
        for start, stop in intervals:
            a, i = start, min(buckets - 1, int(start / width))
            while a < stop and i < buckets:
                end = min(stop, (i + 1) * width)
                busy[i] += max(0.0, end - a)
                a, i = end, i + 1
        series[worker] = [x / width for x in busy]
    return starts, series


def summarize(result: SimResult, slo: Slo) -> dict[str, Any]:
    """The run's numbers (seconds; see the module docstring)."""
    served = [i for i, o in enumerate(result.outcomes) if o == "ok"]
    ttft = [result.ttft_s[i] for i in served]
    e2e = [result.e2e_s[i] for i in served]
    queue = [result.queue_s[i] for i in served]
    n = len(result.outcomes)
    attained = sum(
        1
        for i in served
        if (slo.ttft_s is None or result.ttft_s[i] <= slo.ttft_s)
        and (slo.e2e_s is None or result.e2e_s[i] <= slo.e2e_s)
    )
    arrivals = result.arrival_s
    trace_span = max(arrivals[-1] - arrivals[0], 1e-9) if arrivals else 1e-9
    span = max(result.span_s, 1e-9)
    util = {w: sum(b - a for a, b in iv) / span for w, iv in result.busy.items()}
    counts = dict.fromkeys(OUTCOMES, 0)
    for o in result.outcomes:
        counts[o] = counts.get(o, 0) + 1
    return {
        "policy": result.policy,
        "requests": n,
        "outcomes": counts,
        "ttft_s": _stats(ttft),
        "e2e_s": _stats(e2e),
        "queue_s": _stats(queue),
        "slo": slo.describe(),
        "slo_attainment": attained / n if n else None,
        "goodput_per_s": attained / trace_span,
        "throughput_per_s": len(served) / trace_span,
        "utilisation": util,
        "mean_utilisation": sum(util.values()) / len(util) if util else None,
        "span_s": result.span_s,
        "faults": result.faults,
        "meets_slo": meets_slo(result, slo),
        "by_deployment": _by_deployment(result, slo, served),
    }


def _by_deployment(result: SimResult, slo: Slo, served: list[int]) -> dict[str, dict[str, Any]]:
    """Per deployment (``deployment/index`` worker ids): the requests it served, their share of all
    served, and the shares of them within the TTFT target and attaining the SLO. Where a policy sends
    requests, and which of them it makes late, is most of why two policies' goodputs differ."""
    groups: dict[str, list[int]] = {}
    for i in served:
        groups.setdefault(result.worker[i].rpartition("/")[0], []).append(i)
    out: dict[str, dict[str, Any]] = {}
    for name, indices in sorted(groups.items()):
        n = len(indices)
        in_ttft = [i for i in indices if slo.ttft_s is None or result.ttft_s[i] <= slo.ttft_s]
        attained = [i for i in in_ttft if slo.e2e_s is None or result.e2e_s[i] <= slo.e2e_s]
        out[name] = {
            "served": n,
            "share_of_served": n / len(served),
            "within_ttft": len(in_ttft) / n,
            "slo_attainment": len(attained) / n,
            "ttft_p50_s": percentile([result.ttft_s[i] for i in indices], 50),
            "e2e_p50_s": percentile([result.e2e_s[i] for i in indices], 50),
        }
    return out


def meets_slo(result: SimResult, slo: Slo) -> bool:
    """Every request served, and each target's percentile within it."""
    if any(o != "ok" for o in result.outcomes):
        return False
    if slo.ttft_s is not None and (percentile(result.ttft_s, slo.ttft_pct) or 0.0) > slo.ttft_s:
        return False
    return not (slo.e2e_s is not None and (percentile(result.e2e_s, slo.e2e_pct) or 0.0) > slo.e2e_s)


def _fmt(value: float | None, scale: float = 1000.0) -> str:
    return "-" if value is None else f"{value * scale:,.0f}"


def render_table(summaries: Sequence[Mapping[str, Any]], title: str = "Simulated") -> Any:
    """A rich ``Table``: one row per policy (latencies in ms)."""
    from rich.table import Table

    table = Table(title=title)
    for column in (
        "policy", "TTFT p50", "TTFT p99", "e2e p50", "e2e p99", "queue p50", "queue p99",
        "SLO att.", "goodput/s", "util mean", "util min..max", "failed",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "policy" else "right")
    for s in summaries:
        util = list(s["utilisation"].values()) or [0.0]
        failed = s["requests"] - s["outcomes"].get("ok", 0)
        table.add_row(
            s["policy"],
            _fmt(s["ttft_s"]["p50"]), _fmt(s["ttft_s"]["p99"]),
            _fmt(s["e2e_s"]["p50"]), _fmt(s["e2e_s"]["p99"]),
            _fmt(s["queue_s"]["p50"]), _fmt(s["queue_s"]["p99"]),
            "-" if s["slo_attainment"] is None else f"{s['slo_attainment']:.1%}",
            f"{s['goodput_per_s']:.2f}",
            "-" if s["mean_utilisation"] is None else f"{s['mean_utilisation']:.0%}",
            f"{min(util):.0%}..{max(util):.0%}",
            str(failed),
        )  # fmt: skip
    return table


def write_plot(path: Path, results: Sequence[SimResult]) -> None:
    """Latency CDFs (TTFT and end-to-end) per policy, and each policy's mean utilisation over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for result in results:
        for ax, values in ((axes[0], result.ttft_s), (axes[1], result.e2e_s)):
            served = sorted(v for v, o in zip(values, result.outcomes, strict=True) if o == "ok")
            if served:
                ys = [(i + 1) / len(result.outcomes) for i in range(len(served))]
                ax.plot(served, ys, label=result.policy)
        starts, series = utilisation_series(result)
        mean = (
            [sum(col) / max(1, len(series)) for col in zip(*series.values(), strict=True)] if series else []
        )
        axes[2].plot(starts, mean, label=result.policy)
    for ax, label in ((axes[0], "TTFT (s)"), (axes[1], "end-to-end latency (s)")):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("share of requests")
        ax.grid(True, alpha=0.3)
    axes[2].set_xlabel("simulated time (s)")
    axes[2].set_ylabel("mean worker utilisation")
    axes[2].set_ylim(0, 1.05)
    axes[2].grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
