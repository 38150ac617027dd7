"""Load generator for OpenAI-compatible endpoints (``xpuflow bench``): closed-loop concurrency, fixed-rate
or trace-replayed arrivals, streaming-aware timings (time to first token, inter-token latency), and a
report as a table, JSON and a PNG plot. See docs/bench.md."""

from __future__ import annotations

from xpuflow.loadgen.arrivals import (
    DEFAULT_PROMPTS,
    Prompt,
    RequestSpec,
    TraceRow,
    closed_loop_specs,
    load_prompts,
    rate_specs,
    read_trace,
    trace_specs,
)
from xpuflow.loadgen.report import render_summary, summarize, write_json, write_plot
from xpuflow.loadgen.runner import BenchPlan, BenchResult, RequestRecord, run_bench

__all__ = [
    "DEFAULT_PROMPTS",
    "BenchPlan",
    "BenchResult",
    "Prompt",
    "RequestRecord",
    "RequestSpec",
    "TraceRow",
    "closed_loop_specs",
    "load_prompts",
    "rate_specs",
    "read_trace",
    "render_summary",
    "run_bench",
    "summarize",
    "trace_specs",
    "write_json",
    "write_plot",
]
