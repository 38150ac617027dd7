"""benchmarks/engines.py's profile groups: which part of the gateway a py-spy stack counts for."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from engines import _group_of


def stack(*files: str) -> list[str]:
    return [f"f ({file}:1)" for file in files]


def test_the_upstream_client_has_a_group_of_its_own() -> None:
    frames = stack("xpuflow/routing/dispatch.py", "xpuflow/backends/remote/http1.py")
    assert _group_of(frames) == "xpuflow upstream client (backends/remote)"


def test_json_and_deadlines_count_for_their_caller() -> None:
    frames = stack("xpuflow/serving/inference.py", "xpuflow/serving/openai_schema.py", "xpuflow/jsonio.py")
    assert _group_of(frames) == "xpuflow HTTP app (serving: middleware, app)"
    frames = stack("xpuflow/scheduling/worker.py", "xpuflow/deadlines.py")
    assert _group_of(frames) == "xpuflow engine (orchestrator, routing, scheduling, policy)"


def test_the_rest_of_xpuflow_is_other() -> None:
    assert _group_of(stack("xpuflow/artifacts/store.py")) == "xpuflow other"
