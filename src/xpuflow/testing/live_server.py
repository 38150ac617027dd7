"""A real uvicorn server on 127.0.0.1 in a background thread, for tests that need a socket.

Example::

    with live_server(create_app(FakeEngine())) as url:
        requests_to(url + "/v1/models")
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["live_server"]


@contextmanager
def live_server(
    app: Any,
    *,
    start_timeout_s: float = 15.0,
    grace_s: int = 1,
    http: type[asyncio.Protocol] | None = None,
    **options: Any,
) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port, bound before the thread starts) and yield its base URL.

    ``http`` is the protocol class, by default the one ``xpuflow serve`` runs
    (``serving.http_protocol.GatewayHttpProtocol``). A short graceful-shutdown window ends open event
    streams (dashboards) instead of waiting on them. ``options`` go to ``uvicorn.Config`` (e.g.
    ``timeout_keep_alive``).
    """
    import uvicorn

    from xpuflow.serving.http_protocol import GatewayHttpProtocol

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http=http or GatewayHttpProtocol,
        ws="none",
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=grace_s,
        **options,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="live-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server did not start within {start_timeout_s} s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
