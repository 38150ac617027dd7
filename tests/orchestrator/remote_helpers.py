"""Mock upstream processes on 127.0.0.1 and an orchestrator of remote_openai deployments in front of them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xpuflow.backends.base import GenerationParams
from xpuflow.config import parse_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.engine import InferenceCall
from xpuflow.scheduling.request import RequestKind
from xpuflow.types import Resource, ResourceType

SCRIPT = Path(__file__).with_name("mock_upstream.py")
INVENTORY = Inventory.of([Resource("cpu", ResourceType.CPU, "cpu", {"memory_bytes": 8 << 30})])


@dataclass
class Upstream:
    proc: subprocess.Popen[str]
    port: int
    args: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:  # SIGSTOP: the process hangs, its sockets stay open
        os.kill(self.proc.pid, signal.SIGSTOP)

    def cont(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def restart(self) -> None:
        """Start it again on the same port (after ``kill``)."""
        self.proc = _spawn([*self.args, "--port", str(self.port)])[0]


def _spawn(args: Sequence[str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    line = proc.stdout.readline()  # "ready <port>"
    if not line.startswith("ready") or time.monotonic() > deadline:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        raise RuntimeError(f"mock upstream did not start: {line!r}")
    return proc, int(line.split()[1])


@contextlib.contextmanager
def upstreams(
    count: int, *args: str, only: dict[int, Sequence[str]] | None = None
) -> Iterator[list[Upstream]]:
    """``count`` mock upstreams, each its own process (``only`` adds arguments for some of them); every
    one is killed (by PID) at the end."""
    started: list[Upstream] = []
    try:
        for index in range(count):
            full = (*args, *(only or {}).get(index, ()), "--name", f"u{index}")
            proc, port = _spawn(full)
            started.append(Upstream(proc, port, full))
        yield started
    finally:
        for upstream in started:
            with contextlib.suppress(Exception):
                upstream.kill()


def remote_config(urls: Sequence[str], *, deployment: dict[str, Any] | None = None, **model: Any) -> Any:
    """One logical model ``chat`` with one tier of remote_openai deployments, one per URL."""
    deployments = [
        {
            "name": f"up{i}",
            "backend": "remote_openai",
            "options": {"base_url": url, "model": "mock"},
            **(deployment or {}),
        }
        for i, url in enumerate(urls)
    ]
    tier = {"name": "default", "deployments": [d["name"] for d in deployments]}
    return parse_config({"deployments": deployments, "models": [{"name": "chat", "tiers": [tier], **model}]})


def chat_call(text: str = "hi", **kw: Any) -> InferenceCall:
    return InferenceCall(
        model="chat",
        kind=RequestKind.CHAT,
        payload=[{"role": "user", "content": text}],
        params=GenerationParams(max_tokens=8),
        **kw,
    )
