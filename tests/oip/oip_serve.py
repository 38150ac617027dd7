"""``xpuflow serve CONFIG`` in its own process, for the OIP tests: free ports, readiness, clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The key of the fake gateway's configuration (``FAKE_CONFIG``).
KEY = "sk-oip-test-key-0001"

FAKE_CONFIG = {
    "api_keys": [{"name": "team", "key": KEY}],
    "deployments": [
        {"name": "embed", "backend": "fake", "task": "embedding"},
        {"name": "double", "backend": "fake", "task": "tensor"},
        {"name": "chat", "backend": "fake", "task": "chat"},
    ],
}


@dataclass(frozen=True)
class Served:
    url: str
    grpc: str
    log: Path
    pid: int


@contextmanager
def xpuflow_serve(tmp: Path, config: dict[str, Any], *, timeout_s: float = 60.0) -> Iterator[Served]:
    """Start ``xpuflow serve`` on free HTTP and gRPC ports of 127.0.0.1; stop it with SIGTERM (SIGKILL
    after 15 s)."""
    port, grpc_port = free_port(), free_port()
    gateway = {**config.get("gateway", {}), "host": "127.0.0.1", "port": port, "grpc_port": grpc_port}
    path = tmp / "xpuflow.yaml"
    path.write_text(yaml.safe_dump({**config, "gateway": gateway}))
    log = tmp / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xpuflow.cli.main", "serve", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"xpuflow serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"xpuflow serve not ready in {timeout_s} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield Served(url, f"127.0.0.1:{grpc_port}", log, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
