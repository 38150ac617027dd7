"""``cluster: {address: local}`` through ``xpuflow serve CONFIG``: the gateway starts a one-node Ray of
its own, places the workers on it, answers, and leaves no Ray process behind when it stops (run inside
a network namespace by tests/cluster/test_cluster_live.py; skipped when run directly outside one)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from xpuflow.testing.serve_process import serve_process

if os.environ.get("XPUFLOW_IN_NETNS") != "1":
    pytest.skip(
        "runs inside a network namespace (tests/cluster/test_cluster_live.py)", allow_module_level=True
    )

pytest.importorskip("ray")


def _ray_processes() -> set[int]:
    """Ray's own daemons in this namespace's process tree that this test's gateway started."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"XPUFLOW_LOCAL_RAY_TEST=1" in environ:
            found.add(int(entry.name))
    return found


def test_address_local_starts_a_one_node_ray_and_stops_it(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "xpuflow.yaml"
    config.write_text(
        f"""
gateway: {{host: 127.0.0.1, port: {port}}}
cluster: {{address: local}}
deployments:
  - {{name: chat, backend: fake, device: cpu, replicas: 2, options: {{service_time_s: 0.01}}}}
"""
    )
    ray_dir = Path(f"/tmp/xfl{os.getpid()}")  # Ray's socket paths must stay under 108 bytes
    env = {"XPUFLOW_LOCAL_RAY_TEST": "1", "RAY_TMPDIR": str(ray_dir)}
    log_path = tmp_path / "serve.log"
    with serve_process(config, port=port, log_path=log_path, env=env) as proc:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {"model": "chat", "messages": [{"role": "user", "content": "a b c"}]}
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        answer = json.loads(response.read())
        connection.close()
        assert response.status == 200, answer
        assert answer["choices"][0]["message"]["content"] == "c b a"
        assert (response.getheader("x-xpuflow-worker") or "").startswith("chat/")
        assert _ray_processes(), "no Ray process started for address: local"
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    deadline = time.monotonic() + 20
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.25)
    left = _ray_processes()
    for pid in left:  # ours (by the environment marker): do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(ray_dir, ignore_errors=True)
    assert not left, f"Ray processes left after the gateway stopped: {sorted(left)}"
