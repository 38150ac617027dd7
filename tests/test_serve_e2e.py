"""The README's main command as a user runs it: `xpuflow serve` on the embedded default, real models,
the official openai client, then Ctrl+C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.e2e
def test_xpuflow_serve_embedded_default_with_the_openai_client(tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    port = _free_port()
    env = {**os.environ, "XPUFLOW_CACHE_DIR": str(tmp_path / "store"), "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "xpuflow.cli.main", "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 300
        while not _ready(f"http://127.0.0.1:{port}/ready"):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "xpuflow serve was not ready within 300 s"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"chat", "embed"}
        question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        reply = client.chat.completions.create(model="chat", messages=question, max_tokens=16)
        assert "Paris" in (reply.choices[0].message.content or "")
        stream = client.chat.completions.create(model="chat", messages=question, max_tokens=16, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert "Paris" in streamed
        vectors = client.embeddings.create(model="embed", input=["hello", "world"])
        assert len(vectors.data) == 2
        assert len(vectors.data[0].embedding) == 384
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-9", messages=question)
        banner = (tmp_path / "serve.log").read_text()
        assert f"http://127.0.0.1:{port}" in banner
        assert "curl" in banner
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    assert proc.returncode in (0, -signal.SIGINT, 130)
