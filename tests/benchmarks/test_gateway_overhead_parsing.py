"""The pure parts of benchmarks/gateway_overhead.py: wrk's report, the nginx config, --systems, and the
headline figures and targets built from per-path results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gateway_overhead
from anchor_proxies import nginx_config
from wrk_client import parse, script_text, time_ms

WRK_REPORT = """\
Running 10s test @ http://127.0.0.1:8080/v1/chat/completions
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   635.91us    0.89ms  12.92ms   93.69%
    Req/Sec    13.20k     1.07k   15.00k    86.54%
  Latency Distribution
     50%  250.00us
     75%  491.00us
     90%    1.20ms
     99%    2.00s
  263571 requests in 10.10s, 180.12MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 12
Requests/sec:  26096.14
Transfer/sec:     17.83MB
"""


def test_wrk_report_parses_into_numbers() -> None:
    result = parse(WRK_REPORT)
    assert result["rps"] == pytest.approx(26096.14)
    assert result["requests"] == 263571
    assert result["elapsed_s"] == pytest.approx(10.10)
    assert result["latency_ms"] == pytest.approx({"50": 0.25, "75": 0.491, "90": 1.2, "99": 2000.0})
    assert result["non_2xx"] == 12
    assert result["socket_errors"] == {"connect": 0, "read": 3, "write": 0, "timeout": 2}


def test_wrk_report_without_errors_counts_none() -> None:
    clean = "\n".join(
        line for line in WRK_REPORT.splitlines() if "errors" not in line and "Non-2xx" not in line
    )
    result = parse(clean)
    assert result["non_2xx"] == 0
    assert result["socket_errors"] == {"connect": 0, "read": 0, "write": 0, "timeout": 0}


def test_a_failed_wrk_run_is_an_error_not_a_figure() -> None:
    with pytest.raises(ValueError, match="no figures"):
        parse("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_wrk_durations() -> None:
    assert time_ms("635.91us") == pytest.approx(0.63591)
    assert time_ms("1.5ms") == pytest.approx(1.5)
    assert time_ms("2.00s") == pytest.approx(2000.0)
    assert time_ms("1.00m") == pytest.approx(60000.0)
    with pytest.raises(ValueError, match="not a wrk duration"):
        time_ms("fast")


def test_wrk_script_posts_the_body_with_its_headers() -> None:
    text = script_text(b'{"model": "chat", "q": "say \\"hi\\""}', {"authorization": "Bearer k"})
    assert 'wrk.method = "POST"' in text
    assert 'wrk.body = "{\\"model\\": \\"chat\\", \\"q\\": \\"say \\\\\\"hi\\\\\\"\\"}"' in text
    assert 'wrk.headers["authorization"] = "Bearer k"' in text


def test_nginx_config_keeps_upstream_connections_and_writes_only_in_its_folder(tmp_path: Path) -> None:
    text = nginx_config("http://127.0.0.1:9100", 9200, tmp_path)
    assert "server 127.0.0.1:9100;" in text
    assert "keepalive 64;" in text
    assert "proxy_http_version 1.1;" in text
    assert 'proxy_set_header Connection "";' in text
    assert "listen 127.0.0.1:9200;" in text
    assert "worker_processes 1;" in text
    assert "access_log off;" in text
    paths = [line.split()[1].rstrip(";") for line in text.splitlines() if "_path " in line or "pid " in line]
    assert paths
    assert all(path.startswith(str(tmp_path)) for path in paths)


def test_systems_option_keeps_the_benchmark_order() -> None:
    assert gateway_overhead.parse_systems("xpuflow, vllm-router,nginx") == ["nginx", "vllm_router", "xpuflow"]
    assert gateway_overhead.parse_systems("python-floor,nginx") == ["nginx", "python_floor"]
    assert gateway_overhead.parse_systems("xpuflow,litellm", skip_litellm=True) == ["xpuflow"]
    with pytest.raises(SystemExit, match="choose from nginx"):
        gateway_overhead.parse_systems("envoy")


def _runs(with_router: bool = True) -> dict[str, dict[str, object]]:
    runs: dict[str, dict[str, object]] = {
        "direct": {"p50_ms": 0.1, "p99_ms": 0.3, "stream_ttfb_p50_ms": 0.12, "rps_wrk": 90000.0},
        "xpuflow": {
            "p50_ms": 0.4,
            "p99_ms": 1.3,
            "stream_ttfb_p50_ms": 0.52,
            "rps": 2000.0,
            "rps_wrk": 4000.0,
            "cpu_ms_per_request": 0.25,
            "idle_rss_mb": 70.04,
            "long_streams": {"cpu_us_per_event": 12.345},
        },
    }
    if with_router:
        runs["vllm_router"] = {"p50_ms": 0.3, "p99_ms": 0.6, "rps_wrk": 8000.0, "idle_rss_mb": 79.0}
    return runs


def test_figures_are_differences_and_ratios_within_the_run() -> None:
    figures = gateway_overhead.figures(_runs())
    assert figures["xpuflow_added_p50_ms"] == pytest.approx(0.3)
    assert figures["vllm_router_added_p50_ms"] == pytest.approx(0.2)
    assert figures["xpuflow_added_p50_vs_vllm_router"] == pytest.approx(1.5)
    assert figures["xpuflow_rps_vs_vllm_router"] == pytest.approx(0.5)
    assert figures["xpuflow_stream_ttfb_added_ms"] == pytest.approx(0.4)
    assert figures["xpuflow_stream_chunk_cpu_us"] == pytest.approx(12.35)
    assert figures["xpuflow_idle_rss_mb"] == pytest.approx(70.0)
    assert figures["litellm_rps"] is None
    assert figures["nginx_added_p50_ms"] is None


def test_targets_say_what_is_met_and_leave_the_unmeasured_open() -> None:
    goals = gateway_overhead.targets(gateway_overhead.figures(_runs(with_router=False)))
    assert goals["xpuflow_added_p50_ms"] == {"value": pytest.approx(0.3), "goal": "<= 0.35", "met": True}
    assert goals["xpuflow_cpu_ms_per_request"]["met"] is False
    assert goals["xpuflow_stream_ttfb_added_ms"]["met"] is True
    assert goals["xpuflow_idle_rss_mb"]["met"] is True
    assert goals["xpuflow_rps_vs_vllm_router"] == {"value": None, "goal": ">= 0.4", "met": None}
    assert goals["xpuflow_stream_chunk_cpu_us"]["goal"] is None


def test_replicas_go_into_xpuflows_config_and_their_own_results_file() -> None:
    from xpuflow.config import parse_config

    one = gateway_overhead._xpuflow_config("http://127.0.0.1:1", "sk-bench-0123456789")
    two = gateway_overhead._xpuflow_config("http://127.0.0.1:1", "sk-bench-0123456789", replicas=2)
    assert "replicas" not in one["deployments"][0]  # the default config, as every earlier run had it
    assert [d.replicas for d in parse_config(two).deployments] == [2]
    assert gateway_overhead._default_output(1) == gateway_overhead.RESULTS
    assert gateway_overhead._default_output(2).name == "gateway_overhead_replicas2.json"
    with pytest.raises(SystemExit):
        gateway_overhead._parser().parse_args(["--replicas", "x"])
