"""Shared backend fixtures: a real llama.cpp OpenAI-compatible server on loopback.

``llama_server_url`` starts ``python -m llama_cpp.server`` once per test session, serving the bundled
SmolLM2-135M-Instruct GGUF on 127.0.0.1 and a free port, and yields its root URL
(``http://127.0.0.1:PORT``; the API is under ``/v1``). ``llama_server_model`` is the model name it
lists in ``/v1/models``; it answers every model name with its one model. It skips when
llama-cpp-python's server extra is missing and is killed by its PID at the end of the session.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

LLAMA_SERVER_MODEL = "smollm2"
LLAMA_SERVER_START_TIMEOUT_S = 60.0
_SERVER_MODULES = (
    "llama_cpp",
    "fastapi",
    "sse_starlette",
    "starlette_context",
    "pydantic_settings",
    "uvicorn",
)


@pytest.fixture(scope="session")
def llama_server_model() -> str:
    return LLAMA_SERVER_MODEL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=2.0) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def llama_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    missing = [name for name in _SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"llama_cpp.server needs {', '.join(missing)}: install llama-cpp-python[server] "
            "(xpuflow's 'llamacpp' extra)"
        )
    from xpuflow.bundled import smollm2_gguf_path

    try:
        model = smollm2_gguf_path()
    except Exception as exc:
        pytest.skip(f"the bundled SmolLM2 model is not installed: {exc}")
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _attempt in range(3):  # another process may take the free port before the server binds it
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(model), "--model_alias", LLAMA_SERVER_MODEL,
            "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", "1024", "--n_threads", "1", "--verbose", "false",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + LLAMA_SERVER_START_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline and not _answers(url):
            time.sleep(0.2)
        if process.poll() is None and _answers(url):
            break
        _stop(process)
        if "address already in use" not in _tail(log_path).lower():
            seconds = LLAMA_SERVER_START_TIMEOUT_S
            pytest.fail(f"llama_cpp.server did not start within {seconds:g} s:\n{_tail(log_path)}")
    else:
        pytest.fail(f"llama_cpp.server found no free port:\n{_tail(log_path)}")
    try:
        yield url
    finally:
        _stop(process)
