"""The examples run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.e2e
def test_gpu_to_any_device_example_answers_paris_both_ways(tmp_path: Path) -> None:
    env = {**os.environ, "XPUFLOW_CACHE_DIR": str(tmp_path / "store"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "gpu_to_any_device.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "runtime: device=cpu" in out.stdout
    assert "transformers: device=cpu" in out.stdout
    assert out.stdout.count("Paris") >= 2
