"""Managed engines: model servers xpuflow starts, watches and restarts itself (a deployment's ``managed:``).

A deployment on ``remote_openai`` or ``kserve_v2`` may ask xpuflow to run its server. Each replica gets a
``ManagedEngine``: its argv (from a template in ``managed_templates`` or the deployment's own list, never
a shell string), a free port on 127.0.0.1, its stdout and stderr in a log file, a readiness probe, a
restart with exponential backoff after a crash, and a graceful stop (SIGTERM, then SIGKILL)::

    engine = ManagedEngine("chat/0", ["python", "-m", "llama_cpp.server", "--model", "m.gguf",
                                      "--port", "8081"], port=8081, ready_path="/v1/models",
                           log_path=Path("chat-0.log"))
    await engine.start()          # spawns, waits until GET /v1/models answers 200
    engine.status()               # {"state": "running", "pid": 1234, "restarts": 0, ...}
    await engine.stop()

The state machine: ``starting`` -> ``running``; a crash -> ``restarting`` (after 1 s, 2 s, 4 s ... up to
``max_backoff_s``, on the same port, so the session's URL stays valid) -> ``running``; more than
``max_restarts`` crashes within ``crash_window_s`` -> ``failed`` (it gives up and says so in the status
and the log); ``stop()`` -> ``stopped``. While the server is down, the session's health checks fail,
the worker leaves rotation and requests are retried on other workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any

from xpuflow.backends.remote.managed_templates import TEMPLATES, render_argv
from xpuflow.errors import BackendError, ConfigError

__all__ = ["EngineState", "ManagedEngine", "free_port", "start_managed"]

log = logging.getLogger(__name__)

#: How often readiness is probed while a server starts.
_PROBE_INTERVAL_S = 0.2
_LOG_TAIL_BYTES = 2000
_MANAGED_BACKENDS = ("remote_openai", "kserve_v2")


class EngineState(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - _LOG_TAIL_BYTES))
            return file.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


class ManagedEngine:
    """One supervised server process. Use it from one event loop."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        ready_path: str,
        log_path: Path,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 300.0,
        restart_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_restarts: int = 5,
        crash_window_s: float = 300.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.host = host
        self.port = port
        self.ready_path = ready_path if ready_path.startswith("/") else "/" + ready_path
        self.log_path = log_path
        self.env = dict(env or {})
        self.ready_timeout_s = ready_timeout_s
        self.restart_backoff_s = restart_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_restarts = max_restarts
        self.crash_window_s = crash_window_s
        self.stop_timeout_s = stop_timeout_s
        self.state = EngineState.STOPPED
        self.restarts = 0
        self.last_exit_code: int | None = None
        self.last_error: str | None = None
        self.started_at_s: float | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._crashes: deque[float] = deque()
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def status(self) -> dict[str, Any]:
        """What the admin API and dashboard show: state, pid, restarts, port, log file, last error."""
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": self.pid,
            "restarts": self.restarts,
            "port": self.port,
            "base_url": self.base_url,
            "last_exit_code": self.last_exit_code,
            "last_error": self.last_error,
            "log_file": str(self.log_path),
            "argv": list(self.argv),
            "uptime_s": round(time.monotonic() - self.started_at_s, 1)
            if self.started_at_s is not None and self.state is EngineState.RUNNING
            else None,
        }

    # -- process ------------------------------------------------------------------------------------

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            out.write(f"\n=== xpuflow starts {self.name}: {self.argv!r} ===\n".encode())
            out.flush()
            try:
                self._process = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**os.environ, **self.env},
                    start_new_session=True,  # its own process group: a stop reaches its children too
                )
            except OSError as exc:
                raise BackendError(
                    f"managed engine {self.name}: cannot start {self.argv[0]!r}: {exc.strerror or exc}; "
                    "check managed.executable or managed.argv, and that the server is installed"
                ) from exc
        log.info("managed engine %s started, pid %s: %s", self.name, self._process.pid, self.argv)

    async def _wait_ready(self) -> None:
        import aiohttp

        process = self._process
        assert process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        url = self.base_url + self.ready_path
        timeout = aiohttp.ClientTimeout(total=2.0, sock_connect=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                if process.returncode is not None:
                    raise BackendError(
                        f"managed engine {self.name} exited with code {process.returncode} before it was "
                        f"ready; its log ({self.log_path}) ends with:\n{_tail(self.log_path)}"
                    )
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    async with http.get(url) as response:
                        await response.read()
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"managed engine {self.name} did not answer 200 on {url} within ready_timeout_s "
                        f"{self.ready_timeout_s:g}; raise managed.ready_timeout_s or check its log "
                        f"({self.log_path}):\n{_tail(self.log_path)}"
                    )
                await asyncio.sleep(_PROBE_INTERVAL_S)

    async def _terminate(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``stop_timeout_s``."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.stop_timeout_s)
        except asyncio.TimeoutError:
            log.warning(
                "managed engine %s ignored SIGTERM for %g s; killing it", self.name, self.stop_timeout_s
            )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    # -- lifetime -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the server and wait until it is ready; BackendError (with its log's tail) otherwise."""
        self._stopping = False
        self.state = EngineState.STARTING
        try:
            await self._spawn()
            await self._wait_ready()
        except BaseException as exc:
            self.state = EngineState.FAILED
            self.last_error = str(exc)
            await self._terminate()
            raise
        self.state = EngineState.RUNNING
        self.started_at_s = time.monotonic()
        self._watcher = asyncio.create_task(self._watch(), name=f"managed-{self.name}")

    def _backoff_s(self) -> float:
        return float(min(self.restart_backoff_s * 2 ** max(0, len(self._crashes) - 1), self.max_backoff_s))

    async def _watch(self) -> None:
        while not self._stopping:
            process = self._process
            assert process is not None
            code = await process.wait()
            if self._stopping:
                return
            now = time.monotonic()
            self.last_exit_code = code
            self._crashes.append(now)
            while self._crashes and now - self._crashes[0] > self.crash_window_s:
                self._crashes.popleft()
            if len(self._crashes) > self.max_restarts:
                self.state = EngineState.FAILED
                self.last_error = (
                    f"crashed {len(self._crashes)} times within {self.crash_window_s:g} s (last exit code "
                    f"{code}); gave up after {self.max_restarts} restarts; fix the cause (see "
                    f"{self.log_path}) and reload, or raise managed.max_restarts"
                )
                log.error("managed engine %s: %s", self.name, self.last_error)
                return
            self.state = EngineState.RESTARTING
            delay = self._backoff_s()
            log.warning("managed engine %s exited with code %s; restarting in %.1f s", self.name, code, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn()
                await self._wait_ready()
            except BackendError as exc:
                self.last_error = str(exc)
                log.warning("managed engine %s: restart failed: %s", self.name, exc)
                await self._terminate()  # a hung start counts as a crash on the next turn
                continue
            self.restarts += 1
            self.state = EngineState.RUNNING
            self.started_at_s = time.monotonic()
            log.info("managed engine %s serves again (pid %s)", self.name, self.pid)

    async def stop(self) -> None:
        """Stop watching and stop the server gracefully. Safe to call twice."""
        self._stopping = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self._terminate()
        self.state = EngineState.STOPPED


def _model_argument(model: str | None, base_dir: Path) -> str:
    if model is None:
        return ""
    path = Path(model).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return str(path) if path.exists() else model  # a hub id such as Qwen/Qwen2.5-7B stays as written


def _log_path(managed: Any, name: str, base_dir: Path, state_dir: Path) -> Path:
    if managed.log_file:  # relative to the config file, like model paths
        path = Path(managed.log_file).expanduser()
        if managed.log_file and "{replica}" in managed.log_file:
            path = Path(managed.log_file.replace("{replica}", name.rsplit("/", 1)[1])).expanduser()
        return path if path.is_absolute() else base_dir / path
    return state_dir / "managed" / f"{name.replace('/', '-')}.log"


async def start_managed(
    deployment: Any, replica: int, model_config: Any, *, base_dir: Path, state_dir: Path
) -> tuple[ManagedEngine, Any]:
    """Start replica ``replica`` of a managed deployment; returns its engine and the ``ModelConfig``
    whose ``options.base_url`` points at it. ConfigError for a deployment that cannot be managed."""
    managed = deployment.managed
    if deployment.backend not in _MANAGED_BACKENDS:
        raise ConfigError(
            f"deployment '{deployment.name}': managed engines serve through remote_openai or kserve_v2, not "
            f"'{deployment.backend}'; set backend to one of them",
            field="managed",
        )
    template = TEMPLATES.get(managed.template) if managed.template else None
    argv = list(managed.argv) if managed.argv else list(template.argv if template else ())
    if managed.executable:
        argv[0] = managed.executable
    argv += list(managed.extra_args)
    ready_path = managed.ready_path or (template.ready_path if template else "/health")
    host = managed.host
    port = managed.port or free_port(host)
    if managed.port is not None and replica > 0:
        port = managed.port + replica  # replicas of a fixed port take the next ones
    values = {
        "python": sys.executable,
        "model": _model_argument(deployment.model, base_dir),
        "model_name": str(deployment.options.get("model") or deployment.name),
        "host": host,
        "port": str(port),
        "grpc_port": str(free_port(host)),
    }
    name = f"{deployment.name}/{replica}"
    engine = ManagedEngine(
        name,
        render_argv(argv, values),
        host=host,
        port=port,
        ready_path=ready_path,
        log_path=_log_path(managed, name, base_dir, state_dir),
        env=managed.env,
        ready_timeout_s=managed.ready_timeout_s,
        restart_backoff_s=managed.restart_backoff_s,
        max_backoff_s=managed.max_backoff_s,
        max_restarts=managed.max_restarts,
        crash_window_s=managed.crash_window_s,
        stop_timeout_s=managed.stop_timeout_s,
    )
    await engine.start()
    options = dict(model_config.options)
    if deployment.backend == "kserve_v2" and options.get("protocol") == "grpc":
        options["base_url"] = f"{host}:{values['grpc_port']}"
    else:
        options["base_url"] = engine.base_url
    return engine, replace(model_config, options=options)
