"""``xpuflow serve CONFIG`` in its own process, as a user runs it, for end-to-end tests::

    with serve_process(config_path, port=port, log_path=tmp_path / "serve.log") as proc:
        ...                                   # /ready answered 200; talk to 127.0.0.1:port
    assert proc.returncode == 0               # stopped by SIGINT (drain), killed only if it hung

Start-up failures fail fast with the end of the gateway's log, which says why.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["serve_process"]


def _ready(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/ready")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@contextmanager
def serve_process(
    config: Path,
    *,
    port: int,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    ready_timeout_s: float = 120.0,
    stop_timeout_s: float = 60.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start the gateway on ``config`` (which listens on ``port``), wait for ``/ready``, yield the
    process; on exit send SIGINT (a graceful drain) and wait, killing it only past ``stop_timeout_s``."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xpuflow.cli.main", "serve", str(config), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        try:
            deadline = time.monotonic() + ready_timeout_s
            while not _ready(port):
                if proc.poll() is not None:
                    raise AssertionError(f"xpuflow serve exited with {proc.returncode}:\n{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"xpuflow serve not ready after {ready_timeout_s:g} s:\n{_tail(log_path)}"
                    )
                time.sleep(0.2)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=stop_timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def _tail(log_path: Path, size: int = 3000) -> str:
    return log_path.read_text(errors="replace")[-size:]
