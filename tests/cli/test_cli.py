"""The CLI as a user runs it: a real subprocess, its exit code, stdout and stderr."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def xpuflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xpuflow.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_lists_commands() -> None:
    out = xpuflow("--help")
    assert out.returncode == 0
    for command in ("info", "advise"):
        assert command in out.stdout


def test_info_json_is_stable() -> None:
    out = xpuflow("info", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= {"xpuflow", "resources", "overview", "probes", "backends"}
    assert set(data["overview"]) >= {"cuda", "igpu", "npu", "pim", "cpu", "remote"}
    assert data["overview"]["cpu"] == ["cpu"]
    cpu = next(r for r in data["resources"] if r["id"] == "cpu")
    assert cpu["attributes"]["logical_cores"] >= 1
    assert all(p["reason"] for p in data["probes"])
    names = {b["name"] for b in data["backends"]}
    assert {"llamacpp", "transformers", "onnxruntime", "openvino", "remote_openai", "binary"} <= names
    assert all(b["reason"] for b in data["backends"])


def test_info_human_output() -> None:
    out = xpuflow("info")
    assert out.returncode == 0, out.stderr
    assert "Devices" in out.stdout
    assert "Backends" in out.stdout
    assert "cpu" in out.stdout


def test_advise_json() -> None:
    out = xpuflow("advise", "--params", "1e8", "--batch", "2", "--precision", "fp32", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["device"] == "cpu"  # the only device on a machine without accelerators
    assert data["reason"]
    assert data["estimated_memory_bytes"] > 1e8 * 4


def test_advise_human_output() -> None:
    out = xpuflow("advise", "--params", "1e8")
    assert out.returncode == 0, out.stderr
    assert "device" in out.stdout
    assert "cpu" in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--params", "-5"], "model_size"),
        (["--params", "0"], "model_size"),
        (["--params", "1e9", "--precision", "fp12"], "fp32"),
        (["--params", "1e9", "--strategy", "fastest"], "latency"),
        (["--params", "1e9", "--batch", "0"], "batch"),
        (["--params", "1e9", "--task", "dreaming"], "inference"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_traceback(args: list[str], needle: str) -> None:
    out = xpuflow("advise", *args)
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_model_too_big_is_a_clear_error() -> None:
    out = xpuflow("advise", "--params", "1e15", "--precision", "fp32")
    assert out.returncode == 2
    assert "int8" in out.stderr or "int4" in out.stderr
    assert "Traceback" not in out.stderr
