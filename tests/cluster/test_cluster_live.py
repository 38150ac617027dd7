"""Runs tests/cluster/live (a real head + two worker raylets on loopback) and tests/cluster/local
(``address: local``) in a network namespace.

Ray looks up its own address outward even when told 127.0.0.1, so the cluster lives where loopback is
the only interface (``unshare --net --map-root-user``). The inner run's output is shown on failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

from xpuflow.testing.ray_cluster import in_netns_argv, netns_available

HERE = Path(__file__).resolve().parent


@pytest.mark.e2e
@pytest.mark.parametrize("suite", ["live", "local"])
def test_live_cluster_suite(suite: str) -> None:
    """live: a head and two raylets; local: ``cluster: {address: local}`` through ``xpuflow serve``."""
    if not netns_available():
        pytest.skip("cannot create a network namespace here (unshare --net --map-root-user)")
    argv = in_netns_argv(
        [sys.executable, "-m", "pytest", "-v", "-x", "-p", "no:cacheprovider", str(HERE / suite)]
    )
    env = {**os.environ, "XPUFLOW_IN_NETNS": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        done = subprocess.run(
            argv, check=False, env=env, capture_output=True, text=True, timeout=400, cwd=HERE.parents[1]
        )
    except subprocess.TimeoutExpired as exc:  # say which test hung
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"the live cluster suite ran past 400 s; its output so far:\n{output[-6000:]}")
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, tail
