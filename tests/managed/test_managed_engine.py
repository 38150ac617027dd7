"""Managed engines with a stand-in server executable: each template's argv, placeholders, readiness,
logs, restart with backoff after kill -9, a crash loop that gives up, and a graceful stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from xpuflow.backends.base import ModelConfig
from xpuflow.backends.remote.managed_engine import EngineState, ManagedEngine, start_managed
from xpuflow.backends.remote.managed_templates import TEMPLATES, render_argv
from xpuflow.config import DeploymentConfig
from xpuflow.errors import BackendError, ConfigError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

STAND_IN = Path(__file__).with_name("stand_in_server.py")


@pytest.fixture
def executable(tmp_path: Path) -> Path:
    """An executable file that runs the stand-in server with this interpreter, whatever argv it gets."""
    path = tmp_path / "stand-in"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {STAND_IN} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _deployment(tmp_path: Path, template: str, executable: Path, **managed: Any) -> DeploymentConfig:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    backend = TEMPLATES[template].backend
    return DeploymentConfig.model_validate(
        {
            "name": "m",
            "backend": backend,
            "task": "tensor" if backend == "kserve_v2" else "chat",
            "model": str(model),
            "options": {"model": "served-name"},
            "managed": {
                "template": template,
                "executable": str(executable),
                "log_file": str(tmp_path / "m.log"),
                "restart_backoff_s": 0.2,
                **managed,
            },
        }
    )


EXPECTED = {
    "llamacpp": ["-m", "llama_cpp.server", "--model", "{model}", "--model_alias", "served-name", "--host",
                 "127.0.0.1", "--port", "{port}"],
    "vllm": ["serve", "{model}", "--served-model-name", "served-name", "--host", "127.0.0.1", "--port",
             "{port}"],
    "sglang": ["-m", "sglang.launch_server", "--model-path", "{model}", "--served-model-name", "served-name",
               "--host", "127.0.0.1", "--port", "{port}"],
    "tgi": ["--model-id", "{model}", "--hostname", "127.0.0.1", "--port", "{port}"],
    "ovms": ["--model_name", "served-name", "--model_path", "{model}", "--rest_bind_address", "127.0.0.1",
             "--rest_port", "{port}", "--port", "{grpc}"],
}  # fmt: skip


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_template_argv_and_readiness(
    tmp_path: Path, executable: Path, template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "argv.jsonl"
    monkeypatch.setenv("STAND_IN_ARGV_FILE", str(record))
    dep = _deployment(tmp_path, template, executable)
    config = ModelConfig(model_id="m", task=dep.task, options=dep.options)

    async def main() -> None:
        engine, session_config = await start_managed(dep, 0, config, base_dir=tmp_path, state_dir=tmp_path)
        try:
            assert engine.state is EngineState.RUNNING
            assert engine.pid is not None
            argv = json.loads(record.read_text().splitlines()[0])
            expected = [
                part.replace("{model}", str(tmp_path / "model.gguf")).replace("{port}", str(engine.port))
                for part in EXPECTED[template]
            ]
            if template == "ovms":
                assert argv[:-1] == expected[:-1]
                assert argv[-1].isdigit()  # the second free port, for its gRPC
            else:
                assert argv == expected
            assert session_config.options["base_url"] == f"http://127.0.0.1:{engine.port}"
            assert "stand-in: serving" in (tmp_path / "m.log").read_text()
        finally:
            await engine.stop()
        assert engine.state is EngineState.STOPPED
        assert engine.pid is None

    asyncio.run(main())


def test_placeholders_are_checked_and_never_split() -> None:
    assert render_argv(["x", "--name", "{model_name}"], {"model_name": "a b; rm -rf /"}) == [
        "x",
        "--name",
        "a b; rm -rf /",
    ]
    with pytest.raises(ConfigError) as info:
        render_argv(["x", "{colour}"], {})
    assert "unknown placeholder(s) {colour}" in str(info.value)


def test_config_needs_template_or_argv() -> None:
    with pytest.raises(ValueError, match="exactly one of template"):
        DeploymentConfig.model_validate({"name": "m", "backend": "remote_openai", "managed": {}})


def test_managed_needs_a_remote_backend(tmp_path: Path, executable: Path) -> None:
    dep = DeploymentConfig.model_validate(
        {"name": "m", "backend": "fake", "managed": {"argv": [str(executable), "--port", "{port}"]}}
    )
    with pytest.raises(ConfigError, match="through remote_openai or kserve_v2"):
        asyncio.run(start_managed(dep, 0, ModelConfig(model_id="m"), base_dir=tmp_path, state_dir=tmp_path))


def test_restart_after_kill_and_graceful_stop(tmp_path: Path, executable: Path) -> None:
    async def main() -> None:
        engine = ManagedEngine(
            "m/0",
            [str(executable), "--port", "{port}"],
            port=0,
            ready_path="/health",
            log_path=tmp_path / "m.log",
            restart_backoff_s=0.2,
        )
        from xpuflow.backends.remote.managed_engine import free_port

        engine.port = free_port()
        engine.argv = render_argv(engine.argv, {"port": str(engine.port)})
        await engine.start()
        try:
            first = engine.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while engine.restarts < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert engine.state is EngineState.RUNNING
            assert engine.restarts == 1
            assert engine.pid not in (None, first)
            assert engine.last_exit_code == -signal.SIGKILL
            assert engine.status()["restarts"] == 1
        finally:
            await engine.stop()

    asyncio.run(main())


def test_a_crash_loop_gives_up_with_a_clear_status(
    tmp_path: Path, executable: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        from xpuflow.backends.remote.managed_engine import free_port

        port = free_port()
        engine = ManagedEngine(
            "m/0",
            [str(executable), "--port", str(port)],
            port=port,
            ready_path="/health",
            log_path=tmp_path / "m.log",
            restart_backoff_s=0.05,
            max_restarts=2,
        )
        await engine.start()
        monkeypatch.setenv("STAND_IN_CRASH", "1")  # every restart from now on crashes at once
        os.kill(engine.pid or 0, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while engine.state is not EngineState.FAILED and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        status = engine.status()
        assert status["state"] == "failed"
        assert "gave up after 2 restarts" in status["last_error"]
        assert "crashing on purpose" in (tmp_path / "m.log").read_text()
        await engine.stop()

    asyncio.run(main())


def test_a_server_that_never_starts_says_why(tmp_path: Path) -> None:
    async def main() -> None:
        engine = ManagedEngine(
            "m/0", ["/nonexistent/server"], port=1, ready_path="/health", log_path=tmp_path / "m.log"
        )
        with pytest.raises(BackendError, match="cannot start '/nonexistent/server'"):
            await engine.start()
        engine2 = ManagedEngine(
            "m/0",
            [sys.executable, "-c", "import sys; print('bad flag'); sys.exit(2)"],
            port=1,
            ready_path="/health",
            log_path=tmp_path / "m2.log",
        )
        with pytest.raises(BackendError, match="exited with code 2 before it was ready") as info:
            await engine2.start()
        assert "bad flag" in str(info.value)

    asyncio.run(main())
