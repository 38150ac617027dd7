"""Arrival schedules, prompts files, trace readers (on the real traces, first rows only), the endpoint
URL and the percentile maths."""

from __future__ import annotations

import csv
import itertools
import json
import random
import statistics
from pathlib import Path

import pytest

from xpuflow.errors import ConfigError
from xpuflow.loadgen.arrivals import (
    DEFAULT_PROMPTS,
    Prompt,
    TraceRow,
    closed_loop_specs,
    load_prompts,
    rate_specs,
    read_azure_trace,
    read_mooncake_trace,
    read_trace,
    synthetic_prompt,
    trace_specs,
)
from xpuflow.loadgen.report import percentiles
from xpuflow.loadgen.runner import BenchPlan, endpoint_url

TRACES = Path(__file__).parents[2] / ".." / "shared" / "data" / "traces"
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason="the shared traces folder is not present")
ROWS = 200


@needs_traces
@pytest.mark.parametrize("name", ["AzureLLMInferenceTrace_code.csv", "AzureLLMInferenceTrace_conv.csv"])
def test_azure_trace_first_rows(name: str) -> None:
    rows = read_azure_trace(TRACES / name, limit=ROWS)
    with (TRACES / name).open(newline="") as handle:
        raw = list(itertools.islice(csv.DictReader(handle), ROWS))
    assert len(rows) == ROWS
    assert [(r.input_tokens, r.output_tokens) for r in rows] == [
        (int(x["ContextTokens"]), int(x["GeneratedTokens"])) for x in raw
    ]
    offsets = [r.offset_s for r in rows]
    assert offsets[0] == 0.0
    assert offsets == sorted(offsets)
    assert offsets[-1] < 3600  # the first rows of an hour-long trace


@needs_traces
def test_azure_timestamps_keep_their_fraction() -> None:
    rows = read_azure_trace(TRACES / "AzureLLMInferenceTrace_code.csv", limit=3)
    # 18:17:03.9799600, 18:17:04.0319600, 18:17:04.0781490
    assert [r.offset_s for r in rows] == pytest.approx([0.0, 0.052, 0.098189], abs=1e-6)


@needs_traces
def test_mooncake_trace_first_rows() -> None:
    path = TRACES / "mooncake_conversation_trace.jsonl"
    rows = read_mooncake_trace(path, limit=ROWS)
    with path.open() as handle:
        raw = [json.loads(line) for line in itertools.islice(handle, ROWS)]
    assert [(r.input_tokens, r.output_tokens) for r in rows] == [
        (x["input_length"], x["output_length"]) for x in raw
    ]
    assert [r.offset_s for r in rows] == [(x["timestamp"] - raw[0]["timestamp"]) / 1000.0 for x in raw]
    assert rows == read_trace(path, limit=ROWS)


def test_trace_format_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    wrong_columns = tmp_path / "a.csv"
    wrong_columns.write_text("time,in,out\n1,2,3\n")
    with pytest.raises(ConfigError, match="not an Azure trace: no column"):
        read_trace(wrong_columns)
    bad_row = tmp_path / "b.csv"
    bad_row.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n")
    with pytest.raises(ConfigError, match=r"b\.csv:2: bad trace row"):
        read_trace(bad_row)
    bad_json = tmp_path / "c.jsonl"
    bad_json.write_text('{"timestamp": 0, "input_length": 3}\n')
    with pytest.raises(ConfigError, match=r"c.jsonl:1: not a Mooncake trace row \(needs timestamp"):
        read_trace(bad_json)
    with pytest.raises(ConfigError, match="unknown trace format"):
        read_trace(tmp_path / "d.txt")


def test_trace_specs_scale_time_and_map_tokens() -> None:
    rows = [TraceRow(0.0, 5, 0), TraceRow(2.0, 5000, 40), TraceRow(10.0, 3, 7)]
    specs = list(
        trace_specs(rows, speedup=4.0, rng=random.Random(1), max_prompt_tokens=100, max_tokens_cap=20)
    )
    assert [s.offset_s for s in specs] == [0.0, 0.5, 2.5]
    assert [s.max_tokens for s in specs] == [1, 20, 7]
    assert [len(s.prompt.text.split()) for s in specs] == [5, 100, 3]
    uncapped = list(trace_specs(rows, speedup=1.0, rng=random.Random(1), max_prompt_tokens=10))
    assert [s.max_tokens for s in uncapped] == [1, 40, 7]


def test_synthetic_prompts_differ_and_have_the_length_asked() -> None:
    rng = random.Random(3)
    first, second = synthetic_prompt(64, rng), synthetic_prompt(64, rng)
    assert len(first.text.split()) == len(second.text.split()) == 64
    assert first != second
    assert len(synthetic_prompt(0, rng).text.split()) == 1


def test_poisson_arrivals_average_the_rate() -> None:
    specs = list(
        itertools.islice(
            rate_specs(DEFAULT_PROMPTS, rate_per_s=50.0, max_tokens=8, rng=random.Random(7)), 4001
        )
    )
    gaps = [b.offset_s - a.offset_s for a, b in itertools.pairwise(specs)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 50.0, rel=0.05)
    assert statistics.pstdev(gaps) == pytest.approx(1 / 50.0, rel=0.1)  # exponential: sd == mean
    assert specs[0].offset_s == 0.0
    again = list(
        itertools.islice(
            rate_specs(DEFAULT_PROMPTS, rate_per_s=50.0, max_tokens=8, rng=random.Random(7)), 4001
        )
    )
    assert again == specs


def test_constant_arrivals_and_closed_loop_specs() -> None:
    specs = list(
        itertools.islice(
            rate_specs([Prompt.of("x")], rate_per_s=4.0, max_tokens=2, rng=random.Random(), poisson=False), 4
        )
    )
    assert [s.offset_s for s in specs] == [0.0, 0.25, 0.5, 0.75]
    closed = list(itertools.islice(closed_loop_specs(DEFAULT_PROMPTS, 9), len(DEFAULT_PROMPTS) + 1))
    assert all(s.offset_s is None and s.max_tokens == 9 for s in closed)
    assert closed[-1].prompt == DEFAULT_PROMPTS[0]


def test_prompt_files(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n second \n")
    assert [p.text for p in load_prompts(text)] == ["first prompt", "second"]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a"}\n{"messages": [{"content": "b"}]}\n')
    assert [p.messages for p in load_prompts(lines)] == [
        ({"role": "user", "content": "a"},),
        ({"role": "user", "content": "b"},),
    ]
    lines.write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError, match=r'p.jsonl:1 needs \{"prompt"'):
        load_prompts(lines)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1/chat/completions"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1/chat/completions"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/chat/completions"),
        ("http://127.0.0.1:8000/v1/completions", "http://127.0.0.1:8000/v1/completions"),
        ("https://gw.example/prefix/v1/chat/completions/", "https://gw.example/prefix/v1/chat/completions"),
        ("http://127.0.0.1:8000/api", "http://127.0.0.1:8000/api/v1/chat/completions"),
    ],
)
def test_endpoint_url(url: str, expected: str) -> None:
    assert endpoint_url(url) == expected


def test_a_plan_must_be_bounded() -> None:
    with pytest.raises(ConfigError, match="bound the run"):
        BenchPlan(url="http://127.0.0.1:1")
    assert "sk-" not in repr(BenchPlan(url="http://127.0.0.1:1", num_requests=1, api_key="sk-secret"))


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    stats = percentiles(values)
    assert stats == {"mean": 50.5, "min": 1.0, "max": 100.0, "p50": 50.5, "p90": 90.1, "p99": 99.01}
    assert percentiles([]) is None
    assert percentiles([7.0]) == {"mean": 7.0, "min": 7.0, "max": 7.0, "p50": 7.0, "p90": 7.0, "p99": 7.0}
