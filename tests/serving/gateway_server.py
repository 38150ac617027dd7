"""A real gateway on 127.0.0.1 for tests: uvicorn (uvloop) with the gateway's own HTTP protocol, as
``xpuflow serve`` runs it, in a thread, stopped by the test."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from xpuflow.serving.app import create_app
from xpuflow.serving.http_protocol import GatewayHttpProtocol
from xpuflow.serving.settings import GatewaySettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """uvicorn in a background thread; ``stop()`` asks it to exit and waits (bounded)."""

    def __init__(self, engine: Any, settings: GatewaySettings | None = None) -> None:
        self.engine = engine
        self.port = _free_port()
        app = create_app(engine, settings)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            loop="uvloop",
            http=GatewayHttpProtocol,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="gateway-under-test", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start within 15 s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the gateway did not stop within 10 s"
