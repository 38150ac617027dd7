"""A managed llama.cpp server for real: ``xpuflow serve`` starts ``python -m llama_cpp.server`` with the
bundled SmolLM2 GGUF, serves chat through it, shows the process in /admin/workers, restarts it after
kill -9 and stops it with the gateway."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oip"))
from oip_serve import xpuflow_serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]

ADMIN = "sk-managed-admin-0001"


def _get(url: str, key: str | None = None) -> Any:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
        return json.loads(response.read())


def _chat(url: str) -> dict[str, Any]:
    body = {"model": "chat", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return dict(json.loads(response.read()))


def test_managed_llamacpp_serves_restarts_and_stops(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'xpuflow[llamacpp]')")
    from xpuflow.bundled import smollm2_gguf_path

    config = {
        "api_keys": [{"name": "ops", "key": ADMIN, "rights": ["admin"]}],
        "deployments": [
            {
                "name": "chat",
                "backend": "remote_openai",
                "model": str(smollm2_gguf_path()),
                "options": {"health_interval_s": 0.5},
                "managed": {"template": "llamacpp", "restart_backoff_s": 0.5, "log_file": "llama.log"},
            }
        ],
    }
    with xpuflow_serve(tmp_path, config, timeout_s=120) as served:
        assert _chat(served.url)["choices"][0]["message"]["content"]
        managed = _get(served.url + "/admin/workers", ADMIN)["workers"][0]["managed"]
        assert managed["state"] == "running"
        assert managed["restarts"] == 0
        pid = managed["pid"]
        assert "llama_cpp.server" in managed["argv"]
        assert (tmp_path / "llama.log").stat().st_size > 0

        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            managed = _get(served.url + "/admin/workers", ADMIN)["workers"][0]["managed"]
            if managed["restarts"] == 1 and managed["state"] == "running":
                break
            time.sleep(0.2)
        assert managed["state"] == "running"
        assert managed["pid"] != pid
        assert managed["last_exit_code"] == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while True:  # the worker comes back once its health check passes
            try:
                assert _chat(served.url)["choices"][0]["message"]["content"]
                break
            except urllib.error.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        new_pid = managed["pid"]
    # the gateway stopped the server with itself
    with pytest.raises(ProcessLookupError):
        os.kill(new_pid, 0)
