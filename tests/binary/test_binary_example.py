"""examples/binary_npu/run.py runs end to end and matches numpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xpuflow.vendor_ref import find_c_compiler

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "binary_npu" / "run.py"


@pytest.mark.slow
@pytest.mark.e2e
def test_example_prints_a_small_error(tmp_path: Path) -> None:
    if find_c_compiler() is None:
        pytest.skip("no C compiler to build the reference NPU stack")
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_err=")
    assert float(last.split("=", 1)[1]) < 1e-4
    assert "engine built" in done.stdout
