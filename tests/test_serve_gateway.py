"""``xpuflow serve CONFIG`` in its own process in front of a local OpenAI-compatible upstream: where it
listens, keep-alive latency, the Host allowlist, redacted errors and the graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Upstream:
    """An OpenAI-compatible server on 127.0.0.1 (aiohttp, in a thread): completions after ``delay_s``."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="upstream", daemon=True)

    def _run(self) -> None:
        from aiohttp import web

        async def chat(request: web.Request) -> web.Response:
            await request.read()
            await asyncio.sleep(self.delay_s)
            if request.path.endswith("/chat/completions"):
                choice: dict[str, Any] = {"message": {"role": "assistant", "content": "ok"}}
            else:
                choice = {"text": "ok"}
            return web.json_response(
                {
                    "id": "cmpl-up",
                    "object": "chat.completion",
                    "model": "up",
                    "choices": [{"index": 0, **choice, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", chat)
            app.router.add_post("/v1/completions", chat)
            app.router.add_get("/health", health)
            app.router.add_get("/v1/models", health)
            runner = web.AppRunner(app, shutdown_timeout=0.5)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
            return runner

        asyncio.set_event_loop(self._loop)
        runner = self._loop.run_until_complete(start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def __enter__(self) -> Upstream:
        self._thread.start()
        assert self._started.wait(10), "the upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


def _config(tmp_path: Path, upstream: Upstream, gateway: str) -> Path:
    dead = _free_port()  # nothing listens there: requests to that model fail
    config = tmp_path / "xpuflow.yaml"
    config.write_text(
        f"""
deployments:
  - {{name: up, backend: remote_openai, task: chat,
     options: {{base_url: "http://127.0.0.1:{upstream.port}", model: up}}}}
  - {{name: gone, backend: remote_openai, task: chat, max_seq_len: 512,
     options: {{base_url: "http://127.0.0.1:{dead}", model: gone, health_interval_s: 0}}}}
models:
  - {{name: chat, tiers: [{{name: main, deployments: [up]}}]}}
  - {{name: dead, tiers: [{{name: main, deployments: [gone]}}]}}
gateway: {gateway}
"""
    )
    return config


@contextmanager
def serve(tmp_path: Path, config: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    env = {**os.environ, "XPUFLOW_CACHE_DIR": str(tmp_path / "store"), "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xpuflow.cli.main", "serve", str(config), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            yield proc, log_path
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.send_signal(signal.SIGINT)  # the second one: no drain
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def _get(port: int, path: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers={"Host": host} if host else {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _post(
    port: int, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, port: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if _get(port, "/ready")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"not ready within {timeout_s} s: {log.read_text()[-3000:]}"
        time.sleep(0.2)


def test_config_port_is_used_and_the_flag_wins_over_it(tmp_path: Path, upstream: Upstream) -> None:
    port = _free_port()
    with serve(tmp_path, _config(tmp_path, upstream, f"{{port: {port}}}")) as (proc, log):
        _wait_ready(proc, log, port)
        assert f"127.0.0.1:{port}" in log.read_text()
    # the config names a port that is taken; --port names a free one, and wins
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        flag = _free_port()
        config = _config(tmp_path, upstream, f"{{host: 127.0.0.1, port: {busy}}}")
        with serve(tmp_path, config, "--port", str(flag)) as (proc, log):
            _wait_ready(proc, log, flag)


def _keep_alive_posts(port: int, count: int) -> list[float]:
    """Wall times of ``count`` POSTs sent one after another on one keep-alive connection, each written
    in a single send() with Nagle off, so only the server's writes can wait for a delayed ACK."""
    body = json.dumps(CHAT).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(request)
            status = reader.readline()
            assert b" 200 " in status, status
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            reader.read(length)
            times.append(time.perf_counter() - start)
    return times


def test_keep_alive_hosts_and_redacted_errors(tmp_path: Path, upstream: Upstream) -> None:
    port = _free_port()
    with serve(tmp_path, _config(tmp_path, upstream, "{}"), "--port", str(port)) as (proc, log):
        _wait_ready(proc, log, port)
        # Nagle's algorithm on the accepted socket would hold each response's body ~40 ms for the
        # client's delayed ACK; a loaded 2-core machine still answers well under that
        times = _keep_alive_posts(port, 25)
        assert statistics.median(times[5:]) < 0.030, [round(t * 1000, 1) for t in times]

        # bound to 127.0.0.1: a page whose domain was rebound to 127.0.0.1 cannot read it
        status, _, body = _get(port, "/dashboard/snapshot", host="attacker.example")
        assert status == 400
        assert json.loads(body)["error"]["code"] == "host_not_allowed"
        assert _get(port, "/dashboard/snapshot", host=f"localhost:{port}")[0] == 200

        # the dead upstream's address stays in the server log
        status, _, body = _post(port, {**CHAT, "model": "dead"})
        assert status >= 500
        message = json.loads(body)["error"]["message"]
        assert "127.0.0.1" not in message, message
        assert "http://" not in message, message


def test_sigterm_drains_requests_in_flight(tmp_path: Path, upstream: Upstream) -> None:
    upstream.delay_s = 4.0  # longer than the 3 s the server used to allow before cutting requests off
    port = _free_port()
    config = _config(tmp_path, upstream, "{drain_timeout_s: 60}")
    with serve(tmp_path, config, "--port", str(port)) as (proc, log), ThreadPoolExecutor(8) as pool:
        _wait_ready(proc, log, port)
        in_flight = [pool.submit(_post, port, CHAT) for _ in range(4)]
        deadline = time.monotonic() + 10
        while b"xpuflow_requests_in_flight 4.0" not in _get(port, "/metrics")[2]:
            assert time.monotonic() < deadline, "the requests did not reach the gateway"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while (ready := _get(port, "/ready"))[0] != 503:
            assert time.monotonic() < deadline, "/ready did not turn 503"
            time.sleep(0.05)
        assert json.loads(ready[2]) == {"status": "draining"}
        status, headers, body = _post(port, CHAT)
        assert status == 503
        assert int(headers["retry-after"]) >= 1
        error = json.loads(body)["error"]
        assert error["code"] == "shutting_down"
        assert "shutting down" in error["message"]
        assert _get(port, "/health")[0] == 200
        assert proc.poll() is None  # still draining
        results = [f.result(timeout=30) for f in in_flight]
        assert [r[0] for r in results] == [200] * 4, results
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "shutting down" in text
    assert "Traceback" not in text
    with pytest.raises(OSError):
        _get(port, "/health")  # the listener is closed
