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


def _readme_question_20_times(base: str) -> list[tuple[str, str]]:
    """The README's curl, exactly: 10 one after another, then 10 at once. (worker, answer) each."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    body = json.dumps(
        {"model": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    ).encode()

    def ask(_: int) -> tuple[str, str]:
        request = urllib.request.Request(
            f"{base}/v1/chat/completions", body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            worker = response.headers.get("x-xpuflow-worker", "")
            return worker, json.loads(response.read())["choices"][0]["message"]["content"]

    sequential = [ask(i) for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        concurrent = list(pool.map(ask, range(10)))
    return sequential + concurrent


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
        answers = _readme_question_20_times(f"http://127.0.0.1:{port}")
        wrong = [(worker, text[:80]) for worker, text in answers if "Paris" not in text]
        assert not wrong, f"{len(wrong)} of 20 answers missed Paris: {wrong}"
        banner = (tmp_path / "serve.log").read_text()
        assert f"http://127.0.0.1:{port}" in banner
        assert "curl" in banner
        # a newcomer's console: no library warnings or progress bars per request or at start
        assert "Warning" not in banner, banner[-2000:]
        assert "Loading weights" not in banner
        assert "converting to f16" not in banner  # llama.cpp's per-tensor log of the first build
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
    assert proc.returncode in (0, -signal.SIGINT, 130)
