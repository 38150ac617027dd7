from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from xpuflow.cli.main import app

runner = CliRunner()


def trace(tmp_path: Path) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(f'{{"arrival_s": {i * 0.5}, "input_tokens": 200, "output_tokens": 20}}\n' for i in range(60))
    )
    return path


def test_compare_writes_json_and_plot(fleet_file: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    result = runner.invoke(
        app, ["simulate", str(fleet_file), "--trace", str(trace(tmp_path)), "--compare", "--json", str(out),
              "--plot", str(png), "--kill", "big/0@5", "--slow", "small/1x3@2", "--sample", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [p["policy"] for p in data["policies"]] == [
        "xpuflow",
        "round-robin",
        "random",
        "p2c",
        "jsq",
        "least-latency",
    ]
    assert png.stat().st_size > 1000


def test_find_min(fleet_file: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "simulate",
            str(fleet_file),
            "--trace",
            str(trace(tmp_path)),
            "--slo",
            "ttft_p99=3s,e2e_p99=8s",
            "--find-min",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "smallest fleet found" in result.output


def test_bad_inputs_exit_2(fleet_file: Path, tmp_path: Path) -> None:
    missing = runner.invoke(
        app, ["simulate", str(fleet_file), "--trace", "nope-trace", "--trace-dir", str(tmp_path)]
    )
    assert missing.exit_code == 2
    assert "not found" in missing.output
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,input_tokens,output_tokens\n0,1,2\n1,x,2\n")
    malformed = runner.invoke(app, ["simulate", str(fleet_file), "--trace", str(bad)])
    assert malformed.exit_code == 2
    assert "bad.csv:3" in malformed.output
    slo = runner.invoke(app, ["simulate", str(fleet_file), "--trace", str(bad), "--slo", "p99=2"])
    assert slo.exit_code == 2


def test_simulate_fit(tmp_path: Path) -> None:
    source = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "backends.json"
    out = tmp_path / "cpu.yaml"
    result = runner.invoke(app, ["simulate-fit", str(source), "--backend", "llamacpp", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "decode_tokens_per_s" in out.read_text()
