"""The pure-gateway mode: ``RemoteEngine`` forwards to an OpenAI-compatible server through the
``remote_openai`` backend. The upstream here is a real xpuflow gateway over the fake engine on
127.0.0.1; the gateway under test runs in-process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

try:  # the maintained fork the openai client depends on here; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]
import pytest
from gateway_server import Server

from xpuflow.errors import AdmissionRejected
from xpuflow.serving.app import create_app
from xpuflow.serving.remote_engine import RemoteEngine
from xpuflow.serving.settings import GatewaySettings
from xpuflow.testing.fake_engine import FakeEngine
from xpuflow.testing.run_async import run_async

pytestmark = pytest.mark.e2e

UPSTREAM_KEY = "sk-upstream-0123456789"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def upstream() -> Iterator[Server]:
    server = Server(FakeEngine(), GatewaySettings(api_keys={UPSTREAM_KEY: "gateway"}))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _engine(upstream: Server, key: str = UPSTREAM_KEY) -> RemoteEngine:
    url = f"http://127.0.0.1:{upstream.port}"
    return RemoteEngine.from_urls(
        {"chat": (url, "chat"), "embed": (url, "embed"), "alias": (url, "missing-upstream-model")},
        options={"api_key": key, "timeout_s": 10},
    )


async def _post(app: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return await client.post(path, json=body)


@run_async
async def test_chat_completion_and_stream_pass_through(upstream: Server) -> None:
    engine = _engine(upstream)
    app = create_app(engine, GatewaySettings())
    try:
        plain = await _post(app, "/v1/chat/completions", CHAT)
        streamed = await _post(app, "/v1/chat/completions", {**CHAT, "stream": True})
        completion = await _post(app, "/v1/completions", {"model": "chat", "prompt": "a b", "max_tokens": 4})
    finally:
        await engine.aclose()
    assert plain.status_code == 200
    assert plain.json()["choices"][0]["message"]["content"] == "three two one"
    assert plain.json()["usage"]["completion_tokens"] == 3
    assert plain.headers["x-xpuflow-device"] == f"remote:127.0.0.1:{upstream.port}"
    assert plain.headers["x-xpuflow-tier"] == "remote"
    data = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    deltas = [json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1]]
    assert "".join(deltas) == "three two one"
    assert completion.json()["choices"][0]["text"] == "b a"


@run_async
async def test_embeddings_pass_through(upstream: Server) -> None:
    engine = _engine(upstream)
    app = create_app(engine, GatewaySettings())
    try:
        response = await _post(app, "/v1/embeddings", {"model": "embed", "input": ["x", "y"]})
    finally:
        await engine.aclose()
    assert response.status_code == 200
    assert [len(d["embedding"]) for d in response.json()["data"]] == [8, 8]


@run_async
async def test_upstream_failures_become_gateway_errors(upstream: Server) -> None:
    engine = _engine(upstream)
    app = create_app(engine, GatewaySettings())
    try:
        missing = await _post(app, "/v1/chat/completions", {**CHAT, "model": "alias"})
        upstream.engine.fail_next(AdmissionRejected("upstream busy", retry_after_s=1))
        limited = await _post(app, "/v1/chat/completions", CHAT)
        upstream.engine.fail_next(AdmissionRejected("upstream busy", retry_after_s=1))
        limited_stream = await _post(app, "/v1/chat/completions", {**CHAT, "stream": True})
    finally:
        await engine.aclose()
    assert missing.status_code == 502  # the upstream does not know the model it was configured with
    assert "missing-upstream-model" in missing.json()["error"]["message"]
    assert limited.status_code == 429
    assert limited_stream.status_code == 429
    status = engine.status()
    assert {w["model"] for w in status["workers"]} == {"chat", "embed", "alias"}


@run_async
async def test_a_wrong_upstream_key_is_a_502_not_the_clients_fault(upstream: Server) -> None:
    engine = _engine(upstream, key="sk-wrong")
    app = create_app(engine, GatewaySettings())
    try:
        response = await _post(app, "/v1/chat/completions", CHAT)
    finally:
        await engine.aclose()
    assert response.status_code == 502
    assert "api_key" in response.json()["error"]["message"]


def test_models_and_tasks() -> None:
    engine = RemoteEngine.from_urls({"chat": "http://127.0.0.1:9", "embed-small": "http://127.0.0.1:9/v1"})
    assert [(m.name, m.task, m.tiers) for m in engine.models()] == [
        ("chat", "chat", ("remote",)),
        ("embed-small", "embedding", ("remote",)),
    ]
