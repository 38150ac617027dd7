"""``xpuflow bench`` against the real gateway over a FakeEngine, under uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
import typer
from bench_helpers import API_KEY, Gateway
from typer.testing import CliRunner

from xpuflow.errors import AdmissionRejected, RoutingError
from xpuflow.loadgen import BenchPlan, RequestRecord, closed_loop_specs, run_bench, summarize
from xpuflow.loadgen.arrivals import DEFAULT_PROMPTS

TRACES = Path(__file__).parents[2] / ".." / "shared" / "data" / "traces"


def invoke(cli: typer.Typer, *args: str) -> Any:
    return CliRunner().invoke(cli, ["bench", *args], catch_exceptions=False)


def bench_json(cli: typer.Typer, tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "run.json"
    result = invoke(cli, *args, "--json", str(out))
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def max_overlap(requests: list[dict[str, Any]]) -> int:
    """Most requests that were in flight at one instant, from their start and latency."""
    edges = sorted(
        [(r["start_s"], 1) for r in requests]
        + [(r["start_s"] + r["latency_ms"] / 1000.0, -1) for r in requests],
        key=lambda e: (e[0], e[1]),
    )
    running = best = 0
    for _, step in edges:
        running += step
        best = max(best, running)
    return best


def test_streaming_closed_loop_measures_ttft_and_itl(
    cli: typer.Typer, gateway: Gateway, tmp_path: Path
) -> None:
    before = len(gateway.engine.calls)
    data = bench_json(
        cli, tmp_path, gateway.url, "--concurrency", "4", "--requests", "40", "--max-tokens", "6"
    )
    summary = data["summary"]
    assert (summary["requests"], summary["ok"], summary["errors"]) == (40, 40, 0)
    assert summary["errors_by_status"] == {}
    for key in ("latency_ms", "ttft_ms", "itl_ms"):
        assert set(summary[key]) == {"mean", "p50", "p90", "p99", "min", "max"}
        assert 0 < summary[key]["p50"] <= summary[key]["p90"] <= summary[key]["p99"] <= summary[key]["max"]
    assert summary["ttft_ms"]["p50"] <= summary["latency_ms"]["p50"]
    assert summary["requests_per_s"] > 0
    assert summary["output_tokens"] == 40 * 6  # every default prompt has more than 6 words
    requests = data["requests"]
    assert [r["index"] for r in requests] == list(range(40))
    assert all(r["outcome"] == "ok" and r["status"] == 200 and len(r["itl_ms"]) == 5 for r in requests)
    assert 1 < max_overlap(requests) <= 4
    assert data["plan"] == {
        "url": f"{gateway.url}/v1/chat/completions", "model": "chat", "concurrency": 4, "rate_per_s": None,
        "num_requests": 40, "duration_s": None, "stream": True, "max_tokens": 6, "timeout_s": 60.0,
        "api_key": None,
    }  # fmt: skip
    calls = gateway.engine.calls[before:]
    assert len(calls) == 40
    assert {c.params.max_tokens for c in calls} == {6}
    assert {c.payload[0]["content"] for c in calls} == {p.text for p in DEFAULT_PROMPTS}


def test_the_table_names_every_measure(cli: typer.Typer, gateway: Gateway) -> None:
    result = invoke(cli, gateway.url + "/v1", "--requests", "5")
    assert result.exit_code == 0, result.output
    for text in ("latency", "time to first token", "inter-token latency", "p50", "p90", "p99",
                 "5 ok, 0 failed, of 5", "requests/s", "output tokens/s"):  # fmt: skip
        assert text in result.output


def test_fixed_rate_for_a_duration_stops_by_itself(
    cli: typer.Typer, gateway: Gateway, tmp_path: Path
) -> None:
    data = bench_json(cli, tmp_path, gateway.url, "--rate", "40", "--duration-s", "0.75", "--no-stream")
    summary, requests = data["summary"], data["requests"]
    assert 10 <= summary["requests"] <= 70  # Poisson around 30
    assert summary["ok"] == summary["requests"]
    assert summary["ttft_ms"] is None
    assert summary["itl_ms"] is None
    assert all(r["start_s"] < 0.75 + 0.5 and r["scheduled_s"] < 0.75 for r in requests)
    assert summary["wall_s"] < 5
    assert summary["send_lateness_ms"] is not None


def test_constant_rate_spaces_requests_evenly(cli: typer.Typer, gateway: Gateway, tmp_path: Path) -> None:
    data = bench_json(cli, tmp_path, gateway.url, "--rate", "50", "--constant-rate", "--requests", "10")
    scheduled = [r["scheduled_s"] for r in data["requests"]]
    assert scheduled == pytest.approx([i * 0.02 for i in range(10)])


def test_completions_url_sends_prompts(cli: typer.Typer, gateway: Gateway, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alpha beta gamma\n\n  delta epsilon  \n")
    before = len(gateway.engine.calls)
    data = bench_json(
        cli, tmp_path, gateway.url + "/v1/completions", "--prompts", str(prompts), "--requests", "4"
    )
    assert data["summary"]["ok"] == 4
    assert [c.payload for c in gateway.engine.calls[before:]] == ["alpha beta gamma", "delta epsilon"] * 2


def test_prompts_from_json_lines(cli: typer.Typer, gateway: Gateway, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps(
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two"}]}
        )
        + "\n"
        + json.dumps({"prompt": "three four"})
        + "\n"
    )
    before = len(gateway.engine.calls)
    data = bench_json(
        cli, tmp_path, gateway.url, "--prompts", str(prompts), "--requests", "2", "--concurrency", "1"
    )
    assert data["summary"]["ok"] == 2
    first, second = gateway.engine.calls[before:]
    assert [m["content"] for m in first.payload] == ["be brief", "one two"]
    assert second.payload[-1]["content"] == "three four"


@pytest.mark.skipif(not TRACES.is_dir(), reason="the shared traces folder is not present")
@pytest.mark.parametrize(
    ("name", "expected_offsets_s"),
    [
        ("AzureLLMInferenceTrace_code.csv", [0.0, 0.052, 0.098189]),
        ("mooncake_conversation_trace.jsonl", [0.0, 0.0, 0.0]),
    ],
)
def test_trace_replay_maps_token_counts(
    cli: typer.Typer, gateway: Gateway, tmp_path: Path, name: str, expected_offsets_s: list[float]
) -> None:
    before = len(gateway.engine.calls)
    args = ("--trace", str(TRACES / name), "--requests", "12", "--speedup", "100", "--max-tokens", "12")
    data = bench_json(cli, tmp_path, gateway.url, *args, "--max-prompt-tokens", "300")
    assert data["summary"]["ok"] == 12
    scheduled = [r["scheduled_s"] for r in data["requests"]]
    assert scheduled[:3] == pytest.approx([o / 100 for o in expected_offsets_s], abs=1e-6)
    from xpuflow.loadgen.arrivals import read_trace

    rows = read_trace(TRACES / name, limit=12)
    calls = gateway.engine.calls[before:]
    assert sorted(c.params.max_tokens for c in calls) == sorted(
        min(12, max(1, r.output_tokens)) for r in rows
    )
    assert sorted(len(c.payload[0]["content"].split()) for c in calls) == sorted(
        min(300, max(1, r.input_tokens)) for r in rows
    )


def test_api_key_is_sent_as_a_bearer_token(cli: typer.Typer, keyed_gateway: Gateway, tmp_path: Path) -> None:
    data = bench_json(cli, tmp_path, keyed_gateway.url, "--requests", "3", "--api-key", API_KEY)
    assert data["summary"]["ok"] == 3
    assert data["plan"]["api_key"] == "set"
    assert API_KEY not in (tmp_path / "run.json").read_text()


def test_a_missing_key_fails_every_request_with_401_and_exit_1(
    cli: typer.Typer, keyed_gateway: Gateway
) -> None:
    result = invoke(cli, keyed_gateway.url, "--requests", "3")
    assert result.exit_code == 1
    assert "no request to" in result.output
    assert "401" in result.output


def test_server_errors_are_counted_by_status(cli: typer.Typer, gateway: Gateway, tmp_path: Path) -> None:
    gateway.engine.fail_next(AdmissionRejected("queue full", retry_after_s=1), times=2)
    gateway.engine.fail_next(RoutingError("no worker can take model 'chat'"), times=1)
    data = bench_json(cli, tmp_path, gateway.url, "--requests", "6", "--concurrency", "1", "--no-stream")
    summary = data["summary"]
    assert (summary["ok"], summary["errors"]) == (3, 3)
    assert summary["errors_by_status"] == {"429": 2, "503": 1}
    assert any("queue full" in line for line in summary["first_errors"])


def test_an_error_event_inside_a_stream_is_a_stream_failure(gateway: Gateway) -> None:
    gateway.engine.stream_error_after = 2
    try:
        plan = BenchPlan(url=gateway.url, num_requests=2, concurrency=1, max_tokens=8)
        result = asyncio.run(run_bench(plan, closed_loop_specs(DEFAULT_PROMPTS, 8)))
    finally:
        gateway.engine.stream_error_after = None
    assert [r.outcome for r in result.records] == ["stream", "stream"]
    assert all(r.status == 200 and r.error and "failed after 2 chunks" in r.error for r in result.records)
    assert summarize(result)["errors_by_status"] == {"stream": 2}


def test_a_closed_port_is_a_connection_error(cli: typer.Typer) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = invoke(cli, f"http://127.0.0.1:{port}", "--requests", "2")
    assert result.exit_code == 1
    assert "connection" in result.output


def test_a_slow_answer_times_out(gateway: Gateway) -> None:
    plan = BenchPlan(url=gateway.url, num_requests=2, concurrency=2, timeout_s=0.05)
    gateway.engine.chunk_interval_s = 0.2
    try:
        result = asyncio.run(run_bench(plan, closed_loop_specs(DEFAULT_PROMPTS, 8)))
    finally:
        gateway.engine.chunk_interval_s = 0.0005
    assert [r.outcome for r in result.records] == ["timeout", "timeout"]
    assert all(0.05 <= r.latency_s < 1.0 for r in result.records)


def test_on_record_sees_every_request(gateway: Gateway) -> None:
    seen: list[RequestRecord] = []
    plan = BenchPlan(url=gateway.url, num_requests=7, concurrency=3)
    result = asyncio.run(run_bench(plan, closed_loop_specs(DEFAULT_PROMPTS, 4), on_record=seen.append))
    assert seen == result.records
    assert sorted(r.index for r in seen) == list(range(7))


def test_the_plot_is_a_png(cli: typer.Typer, gateway: Gateway, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the bench extra)")
    plot = tmp_path / "run.png"
    result = invoke(cli, gateway.url, "--requests", "20", "--concurrency", "4", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 20_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "0"], "--rate must be > 0"),
        (["--requests", "0"], "--requests must be >= 1"),
        (["--concurrency", "0"], "--concurrency must be from 1"),
        (["--duration-s", "-1"], "--duration-s must be > 0"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--timeout-s", "0"], "--timeout-s must be > 0"),
        (["--prompts", "p.txt", "--trace", "t.csv"], "use --prompts or --trace, not both"),
        (["--trace", "t.csv", "--rate", "3"], "use --speedup instead of --rate"),
        (["--trace", "t.csv", "--speedup", "0"], "--speedup must be > 0"),
        (["--trace", "t.parquet"], "unknown trace format"),
        (["--trace", "missing.csv"], "cannot read trace"),
        (["--prompts", "missing.txt"], "cannot read prompts"),
        (["--prompts", "empty.txt"], "holds no prompts"),
        (["--prompts", "bad.jsonl"], "bad.jsonl:1 is not JSON"),
    ],
)
def test_bad_input_exits_2_with_a_reason(
    cli: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("p.txt").write_text("hi\n")
    Path("t.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,10,5\n")
    Path("t.parquet").write_text("x")
    Path("empty.txt").write_text("\n\n")
    Path("bad.jsonl").write_text("{not json\n")
    result = invoke(cli, "http://127.0.0.1:9", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_a_url_that_is_not_http_exits_2(cli: typer.Typer) -> None:
    result = invoke(cli, "ftp://127.0.0.1:21")
    assert result.exit_code == 2
    assert "URL must look like http://127.0.0.1:8000" in result.output
