"""The gateway in-process (ASGI transport): endpoints, headers, auth, admin, limits, errors, metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

try:  # the maintained fork the openai client depends on here; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]
import pytest

from xpuflow.engine import InferenceCall, ModelInfo
from xpuflow.errors import (
    AdmissionRejected,
    CapabilityError,
    ConfigError,
    RemoteError,
    RoutingError,
    SessionError,
    XpuflowError,
)
from xpuflow.scheduling.request import Priority, RequestKind
from xpuflow.serving.app import create_app
from xpuflow.serving.auth import bearer_token
from xpuflow.serving.metrics import GatewayMetrics, reason_label
from xpuflow.serving.settings import ApiKey, GatewaySettings
from xpuflow.testing.fake_engine import FakeEngine
from xpuflow.testing.run_async import run_async
from xpuflow.types import RoutingDecision

KEY = "sk-test-0123456789"
ADMIN = "adm-test-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}
JSON = {"content-type": "application/json"}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8}


def settings(**overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {"api_keys": {KEY: "team-a"}, "admin_keys": {ADMIN: "ops"}}
    return GatewaySettings(**{**values, **overrides})


@asynccontextmanager
async def gateway(engine: Any = None, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(engine if engine is not None else FakeEngine(), settings(**overrides))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


def sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# -- inference --------------------------------------------------------------------------------------


@run_async
async def test_chat_completion_answers_in_openai_shape_with_routing_headers() -> None:
    engine = FakeEngine()
    async with gateway(engine) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "chat"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "three two one"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    headers = response.headers
    assert headers["x-xpuflow-tier"] == "tier_high"
    assert headers["x-xpuflow-worker"] == "chat/tier_high/0"
    assert headers["x-xpuflow-device"] == "cuda:0"
    assert headers["x-xpuflow-route-reason"].startswith("default:")
    assert headers["x-request-id"] == body["id"]
    call = engine.calls[-1]
    assert call.kind is RequestKind.CHAT
    assert call.api_key_name == "team-a"
    assert call.params.max_tokens == 8
    assert call.payload == [{"role": "user", "content": "one two three"}]


@run_async
async def test_request_headers_reach_the_engine() -> None:
    engine = FakeEngine()
    headers = {**AUTH, "x-priority": "HIGH", "x-qos-class": "interactive", "x-xpuflow-tier": "tier_low"}
    async with gateway(engine) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 200
    assert response.headers["x-xpuflow-tier"] == "tier_low"
    assert response.headers["x-xpuflow-device"] == "cpu"
    call = engine.calls[-1]
    assert (call.priority, call.qos_class, call.tier_override) == (Priority.HIGH, "interactive", "tier_low")


@run_async
async def test_sampling_fields_and_content_parts_are_parsed() -> None:
    engine = FakeEngine()
    body = {
        "model": "chat",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a b"}, {"type": "text", "text": "c"}]},
        ],
        "max_completion_tokens": 5,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n", "END"],
        "seed": 42,
        "n": 1,
        "user": "someone",
        "frequency_penalty": 0.1,
    }
    async with gateway(engine) as client:
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    call = engine.calls[-1]
    assert call.payload == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b\nc"}]
    params = call.params
    assert (params.max_tokens, params.temperature, params.top_p, params.stop, params.seed) == (
        5,
        0.7,
        0.9,
        ("\n", "END"),
        42,
    )


@run_async
async def test_chat_stream_sends_role_deltas_finish_usage_and_done() -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-xpuflow-tier"] == "tier_high"
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == "three two one"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == []
    # the session's own counts on its last chunk, as a non-streamed call reports them
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


@run_async
async def test_stream_without_include_usage_has_no_usage_chunk() -> None:
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    events = [json.loads(d) for d in sse_data(response.text)[:-1]]
    assert all("usage" not in e for e in events)


@run_async
async def test_stream_that_fails_after_it_started_ends_with_an_error_event() -> None:
    engine = FakeEngine(stream_error_after=1)
    async with gateway(engine) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert response.status_code == 200
    data = sse_data(response.text)
    assert "[DONE]" not in data
    error = json.loads(data[-1])["error"]
    assert "failed after 1 chunks" in error["message"]
    assert error["code"] == "stream_interrupted"


@run_async
async def test_completions_plain_and_streamed() -> None:
    body = {"model": "chat", "prompt": "alpha beta", "max_tokens": 4}
    async with gateway() as client:
        plain = await client.post("/v1/completions", json=body, headers=AUTH)
        streamed = await client.post("/v1/completions", json={**body, "stream": True}, headers=AUTH)
    assert plain.status_code == 200
    assert plain.json()["object"] == "text_completion"
    assert plain.json()["choices"][0]["text"] == "beta alpha"
    events = [json.loads(d) for d in sse_data(streamed.text)[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == "beta alpha"


@run_async
async def test_embeddings_as_floats_and_base64() -> None:
    async with gateway() as client:
        floats = await client.post(
            "/v1/embeddings", json={"model": "embed", "input": ["a", "b c"]}, headers=AUTH
        )
        packed = await client.post(
            "/v1/embeddings", json={"model": "embed", "input": "a", "encoding_format": "base64"}, headers=AUTH
        )
    assert floats.status_code == 200
    data = floats.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert len(data[0]["embedding"]) == 8
    assert floats.json()["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    assert list(struct.unpack("<8f", raw)) == pytest.approx(data[0]["embedding"], rel=1e-6)


@run_async
async def test_embedding_dimensions_must_match_the_model() -> None:
    async with gateway() as client:
        ok = await client.post(
            "/v1/embeddings", json={"model": "embed", "input": "a", "dimensions": 8}, headers=AUTH
        )
        bad = await client.post(
            "/v1/embeddings", json={"model": "embed", "input": "a", "dimensions": 4}, headers=AUTH
        )
    assert ok.status_code == 200
    assert bad.status_code == 422
    assert error_of(bad)["param"] == "dimensions"


@run_async
async def test_models_listing_and_lookup() -> None:
    async with gateway() as client:
        listing = await client.get("/v1/models", headers=AUTH)
        one = await client.get("/v1/models/embed", headers=AUTH)
        missing = await client.get("/v1/models/nope", headers=AUTH)
    assert listing.status_code == 200
    assert [m["id"] for m in listing.json()["data"]] == ["chat", "embed"]
    assert listing.json()["data"][0]["object"] == "model"
    assert listing.json()["data"][0]["tiers"] == [
        "tier_high",
        "tier_low",
    ]
    assert one.json()["id"] == "embed"
    assert one.json()["task"] == "embedding"
    assert missing.status_code == 404
    assert "chat, embed" in error_of(missing)["message"]


# -- client mistakes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "messages": CHAT["messages"]}, 404, "model"),
        ({"messages": CHAT["messages"]}, 422, "model"),
        ({"model": "chat"}, 422, "messages"),
        ({"model": "chat", "messages": "hi"}, 422, "messages"),
        ({"model": "chat", "messages": [{"role": "wizard", "content": "x"}]}, 422, "messages[0].role"),
        ({"model": "chat", "messages": [{"role": "user"}]}, 422, "messages[0].content"),
        ({"model": "chat", "messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content"),
        (
            {"model": "chat", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            422,
            "messages[0].content[0].type",
        ),
        ({**CHAT, "n": 2}, 422, "n"),
        ({**CHAT, "max_tokens": 0}, 422, "max_tokens"),
        ({**CHAT, "max_tokens": 10**9}, 422, "max_tokens"),
        ({**CHAT, "max_tokens": "8"}, 422, "max_tokens"),
        ({**CHAT, "temperature": 3}, 422, "temperature"),
        ({**CHAT, "top_p": 0}, 422, "top_p"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        ({**CHAT, "stop": [""]}, 422, "stop[0]"),
        ({**CHAT, "stream": "yes"}, 422, "stream"),
        ({**CHAT, "stream_options": {"include_usage": 1}}, 422, "include_usage"),
        ({**CHAT, "tools": [{"type": "function"}]}, 422, "tools"),
        ({**CHAT, "response_format": {"type": "json_object"}}, 422, "response_format"),
        ({"model": "embed", "messages": CHAT["messages"]}, 400, "model"),
    ],
)
@run_async
async def test_bad_chat_bodies_get_4xx_naming_the_field(
    body: Mapping[str, Any], status: int, param: str
) -> None:
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == status, response.text
    assert error_of(response)["param"] == param


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "chat", "prompt": [1, 2, 3]}, "prompt"),
        ("/v1/completions", {"model": "chat", "prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"model": "chat", "prompt": "a", "echo": True}, "echo"),
        ("/v1/completions", {"model": "chat", "prompt": "a", "best_of": 3}, "best_of"),
        ("/v1/embeddings", {"model": "embed", "input": []}, "input"),
        ("/v1/embeddings", {"model": "embed", "input": [1, 2]}, "input[0]"),
        ("/v1/embeddings", {"model": "embed", "input": "a", "encoding_format": "int8"}, "encoding_format"),
        ("/v1/embeddings", {"model": "chat", "input": "a"}, "model"),
    ],
)
@run_async
async def test_bad_completion_and_embedding_bodies(path: str, body: Mapping[str, Any], param: str) -> None:
    async with gateway() as client:
        response = await client.post(path, json=body, headers=AUTH)
    assert 400 <= response.status_code < 500, response.text
    assert error_of(response)["param"] == param


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b'{"model": "chat", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    ],
)
@run_async
async def test_malformed_bodies_get_400(content: bytes, why: str) -> None:
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", content=content, headers={**AUTH, **JSON})
    assert response.status_code == 400
    assert why in error_of(response)["message"]


@pytest.mark.parametrize(
    ("headers", "param"),
    [
        ({"x-priority": "urgent"}, "x-priority"),
        ({"x-xpuflow-tier": "tier_gold"}, "x-xpuflow-tier"),
        ({"x-qos-class": "a b"}, "x-qos-class"),
        ({"x-qos-class": "x" * 65}, "x-qos-class"),
    ],
)
@run_async
async def test_bad_hint_headers_get_400(headers: dict[str, str], param: str) -> None:
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers={**AUTH, **headers})
    assert response.status_code == 400
    assert error_of(response)["param"] == param


@run_async
async def test_body_over_the_limit_gets_413_declared_or_streamed() -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000  # no content-length: the limit is enforced while reading

    async with gateway(max_body_bytes=4096) as client:
        declared = await client.post("/v1/chat/completions", json=big, headers=AUTH)
        streamed = await client.post("/v1/chat/completions", content=chunks(), headers={**AUTH, **JSON})
        small = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert declared.status_code == 413
    assert error_of(declared)["code"] == "request_too_large"
    assert streamed.status_code == 413
    assert small.status_code == 200


@run_async
async def test_unknown_path_and_wrong_method_are_json_errors() -> None:
    async with gateway() as client:
        missing = await client.get("/v2/nothing")
        wrong = await client.get("/v1/chat/completions", headers=AUTH)
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "not_found"
    assert wrong.status_code == 405
    assert error_of(wrong)["code"] == "method_not_allowed"


# -- engine errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (AdmissionRejected("queue full for qos class batch", retry_after_s=2.2), 429, "3"),
        (RoutingError("no healthy worker", reasons=["w1: unhealthy"]), 503, "1"),
        (SessionError("llama.cpp session failed"), 503, "1"),
        (RemoteError("upstream answered 500", status=500, retryable=True), 502, None),
        (RemoteError("upstream answered 429", status=429, retryable=True), 429, "1"),
        (RemoteError("upstream 429", status=429, retryable=True, retry_after_s=7.2), 429, "8"),
        (RemoteError("prompt is too long", status=400), 400, None),
        (CapabilityError("no worker streams"), 400, None),
        (ConfigError("tier is draining", field="x-xpuflow-tier"), 400, None),
        (ConfigError("prompt too long for max_seq_len 2048", field="messages"), 422, None),
        (XpuflowError("a bug"), 500, None),
    ],
)
@run_async
async def test_engine_errors_map_to_statuses(
    error: XpuflowError, status: int, retry_after: str | None
) -> None:
    engine = FakeEngine()
    engine.fail_next(error)
    async with gateway(engine) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        after = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == status
    assert str(error) in error_of(response)["message"]
    assert response.headers.get("retry-after") == retry_after
    assert after.status_code == 200


@run_async
async def test_streams_map_errors_before_the_first_event_to_statuses() -> None:
    engine = FakeEngine()
    engine.fail_next(AdmissionRejected("busy", retry_after_s=1))
    async with gateway(engine) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"


class _BrokenEngine(FakeEngine):
    async def complete(self, call: InferenceCall) -> Any:
        raise RuntimeError("bug in the engine")


@run_async
async def test_an_unexpected_engine_exception_is_a_json_500(caplog: pytest.LogCaptureFixture) -> None:
    async with gateway(_BrokenEngine()) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 500
    assert error_of(response)["code"] == "internal_error"
    assert "bug in the engine" in caplog.text


@run_async
async def test_request_timeout_gives_504() -> None:
    engine = FakeEngine(service_time_s=5.0)
    async with gateway(engine, request_timeout_s=0.05) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 504
    assert "request_timeout_s" in error_of(response)["message"]


@run_async
async def test_the_request_timeout_is_promised_to_the_engine_for_a_whole_answer_only() -> None:
    """A whole answer's cancel signal carries the time the gateway's timeout sets it by
    (``CancelSignal.set_by_s``: a worker then arms no timer of its own for it); a stream's does not, since
    its timeout ends at its first event."""
    engine = FakeEngine()
    async with gateway(engine, request_timeout_s=30) as client:
        before = asyncio.get_running_loop().time()
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)).status_code == 200
        after = asyncio.get_running_loop().time()
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
        assert response.status_code == 200
    whole, stream = engine.calls[-2].cancelled, engine.calls[-1].cancelled
    assert before + 30 <= whole.set_by_s <= after + 30  # type: ignore[attr-defined]
    assert stream.set_by_s is None  # type: ignore[attr-defined]


class _SilentStreamEngine(FakeEngine):
    async def stream(self, call: InferenceCall) -> AsyncIterator[Any]:
        self.calls.append(call)
        await asyncio.sleep(5.0)
        yield  # never reached: the gateway gives up first


@run_async
async def test_a_stream_without_a_first_event_in_time_gives_504() -> None:
    engine = _SilentStreamEngine()
    async with gateway(engine, request_timeout_s=0.05) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert response.status_code == 504
    assert engine.calls[-1].cancelled.is_set()


# -- auth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_api_key"),
        ({"authorization": "Basic abc"}, 401, "missing_api_key"),
        ({"authorization": "Bearer sk-wrong"}, 401, "invalid_api_key"),
        ({"authorization": f"Bearer {KEY}x"}, 401, "invalid_api_key"),
        (ADMIN_AUTH, 403, "insufficient_permissions"),
        ({"authorization": "Bearer sk-metrics-only-0123"}, 403, "insufficient_permissions"),
    ],
)
@run_async
async def test_inference_keys(headers: dict[str, str], status: int, code: str) -> None:
    keys = {KEY: "team-a", "sk-metrics-only-0123": ApiKey("scraper", frozenset({"metrics"}))}
    async with gateway(api_keys=keys) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        models = await client.get("/v1/models", headers=headers)
    assert response.status_code == status
    assert error_of(response)["code"] == code
    assert models.status_code == status


@run_async
async def test_a_keys_qos_class_wins_over_the_header() -> None:
    engine = FakeEngine()
    keys = {KEY: "team-a", "sk-batch-0123": ApiKey("jobs", qos_class="batch")}
    async with gateway(engine, api_keys=keys) as client:
        headers = {"authorization": "Bearer sk-batch-0123", "x-qos-class": "interactive"}
        await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        await client.post("/v1/chat/completions", json=CHAT, headers={**AUTH, "x-qos-class": "interactive"})
    assert [(c.api_key_name, c.qos_class) for c in engine.calls] == [
        ("jobs", "batch"),
        ("team-a", "interactive"),
    ]


@run_async
async def test_without_api_keys_inference_is_open() -> None:
    async with gateway(api_keys={}) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200


def test_bearer_token_parsing() -> None:
    assert bearer_token(b"Bearer abc") == b"abc"
    assert bearer_token(b"bearer   abc  ") == b"abc"
    assert bearer_token(b"Bearer ") is None
    assert bearer_token(b"Token abc") is None
    assert bearer_token(None) is None


def test_settings_validate_keys_and_limits() -> None:
    with pytest.raises(ConfigError, match="separate key"):
        GatewaySettings(api_keys={"same-key-123": "a"}, admin_keys={"same-key-123": "ops"})
    with pytest.raises(ConfigError, match="unknown right"):
        GatewaySettings(api_keys={"k-123456": {"name": "a", "rights": ["infer", "root"]}})
    with pytest.raises(ConfigError) as info:
        GatewaySettings(max_body_bytes=0)
    assert info.value.field == "max_body_bytes"
    with pytest.raises(ConfigError):
        GatewaySettings(api_keys={" padded ": "a"})
    with pytest.raises(ConfigError, match="separate key"):
        GatewaySettings(api_keys={"k-123456": ApiKey("both", frozenset({"infer", "admin"}))})
    parsed = GatewaySettings(api_keys={"k-1": "a", "k-2": {"name": "b", "rights": ["metrics"]}})
    assert parsed.api_keys["k-1"] == ApiKey("a")
    assert parsed.api_keys["k-2"].rights == {"metrics"}


# -- health, admin, metrics -------------------------------------------------------------------------


class _MinimalEngine:
    """An engine with only the Engine contract: no is_ready, no admin control."""

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("m", "chat")]

    async def complete(self, call: InferenceCall) -> Any:
        raise NotImplementedError

    def stream(self, call: InferenceCall) -> Any:
        raise NotImplementedError

    def status(self) -> Mapping[str, Any]:
        return {}


@run_async
async def test_health_and_readiness() -> None:
    engine = FakeEngine(ready=False)
    async with gateway(engine) as client:
        health = await client.get("/health")
        not_ready = await client.get("/ready")
        engine.ready = True
        ready = await client.get("/ready")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert not_ready.status_code == 503
    assert ready.status_code == 200
    async with gateway(_MinimalEngine()) as client:
        assert (await client.get("/ready")).status_code == 200


@run_async
async def test_admin_api_lists_drains_undrains_and_reloads() -> None:
    engine = FakeEngine()
    async with gateway(engine) as client:
        workers = await client.get("/admin/workers", headers=ADMIN_AUTH)
        drained = await client.post("/admin/workers/chat/tier_high/0/drain", headers=ADMIN_AUTH)
        moved = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        undrained = await client.post("/admin/workers/chat/tier_high/0/undrain", headers=ADMIN_AUTH)
        back = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        unknown = await client.post("/admin/workers/nope/drain", headers=ADMIN_AUTH)
        reload = await client.post("/admin/reload", headers=ADMIN_AUTH)
    assert workers.status_code == 200
    assert {w["worker_id"] for w in workers.json()["workers"]} == set(engine.workers)
    assert drained.json() == {"worker": "chat/tier_high/0", "draining": True}
    assert moved.headers["x-xpuflow-worker"] == "chat/tier_low/0"
    assert undrained.status_code == 200
    assert back.headers["x-xpuflow-worker"] == "chat/tier_high/0"
    assert unknown.status_code == 404
    assert error_of(unknown)["param"] == "worker"
    assert reload.status_code == 200
    assert reload.json()["changes"]["reloads"] == 1
    assert engine.reloads == 1


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"authorization": "Bearer adm-wrong"}, 401), (AUTH, 403)],
)
@run_async
async def test_admin_api_needs_the_admin_key(headers: dict[str, str], status: int) -> None:
    async with gateway() as client:
        listing = await client.get("/admin/workers", headers=headers)
        drain = await client.post("/admin/workers/chat/tier_high/0/drain", headers=headers)
    assert listing.status_code == status
    assert drain.status_code == status


@run_async
async def test_admin_api_is_off_without_admin_keys_and_501_without_admin_control() -> None:
    async with gateway(admin_keys={}) as client:
        off = await client.get("/admin/workers", headers=ADMIN_AUTH)
    assert off.status_code == 403
    assert error_of(off)["code"] == "admin_disabled"
    async with gateway(_MinimalEngine()) as client:
        unsupported = await client.post("/admin/reload", headers=ADMIN_AUTH)
    assert unsupported.status_code == 501


@run_async
async def test_metrics_count_requests_tokens_decisions_and_engine_state() -> None:
    engine = FakeEngine()
    engine.workers["chat/tier_low/0"].healthy = False
    async with gateway(engine) as client:
        await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
        await client.post("/v1/chat/completions", json=CHAT, headers={**AUTH, "x-xpuflow-tier": "tier_high"})
        await client.post("/v1/chat/completions", json={"model": "chat"}, headers=AUTH)
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in [
        'xpuflow_requests_total{device="cuda:0",model="chat",status="200",tier="tier_high"} 3.0',
        'xpuflow_requests_total{device="",model="",status="422",tier=""} 1.0',
        'xpuflow_request_duration_seconds_count{device="cuda:0",model="chat",tier="tier_high"} 3.0',
        'xpuflow_time_to_first_token_seconds_count{device="cuda:0",model="chat",tier="tier_high"} 1.0',
        'xpuflow_queue_time_seconds_count{device="cuda:0",model="chat",tier="tier_high"} 2.0',
        'xpuflow_tokens_total{kind="completion",model="chat"} 9.0',
        'xpuflow_tokens_total{kind="prompt",model="chat"} 9.0',  # the stream's too
        'xpuflow_route_decisions_total{model="chat",reason="default",tier="tier_high"} 2.0',
        'xpuflow_route_decisions_total{model="chat",reason="override",tier="tier_high"} 1.0',
        'xpuflow_worker_healthy{device="cpu",worker="chat/tier_low/0"} 0.0',
        'xpuflow_worker_healthy{device="cuda:0",worker="chat/tier_high/0"} 1.0',
        'xpuflow_device_memory_free_bytes{device="cuda:0"} 6.442450944e+09',
        'xpuflow_batch_size_count{model="chat",worker="chat/tier_high/0"} 3.0',
        "xpuflow_requests_in_flight 0.0",
    ]:
        assert line in text, line


@run_async
async def test_metrics_can_require_a_key() -> None:
    keys = {KEY: "team-a", "sk-scrape-0123": ApiKey("prom", frozenset({"metrics"}))}
    async with gateway(api_keys=keys, metrics_require_key=True) as client:
        anonymous = await client.get("/metrics")
        infer_only = await client.get("/metrics", headers=AUTH)
        scraper = await client.get("/metrics", headers={"authorization": "Bearer sk-scrape-0123"})
    assert (anonymous.status_code, infer_only.status_code, scraper.status_code) == (401, 403, 200)


def test_each_app_has_its_own_registry() -> None:
    first, second = create_app(FakeEngine()), create_app(FakeEngine())
    assert first.state.gateway.metrics.registry is not second.state.gateway.metrics.registry


def test_metrics_survive_a_broken_status() -> None:
    def broken() -> Mapping[str, Any]:
        raise RuntimeError("status failed")

    metrics = GatewayMetrics(broken)
    metrics.observe_request("m", "t", "d", 200, 0.01)
    body, _ = metrics.render()
    assert b'xpuflow_requests_total{device="d",model="m",status="200",tier="t"} 1.0' in body


@pytest.mark.parametrize(
    ("reason", "details", "label"),
    [
        ("default: no rule objected", {}, "default"),
        ("tier tier_high: complexity 0.81 >= 0.6; worker best of 2", {}, "complexity"),
        ("whatever text", {"rule": "VRAM Headroom"}, "vram_headroom"),
        ("", {}, "unknown"),
    ],
)
def test_reason_labels_stay_low_cardinality(reason: str, details: dict[str, Any], label: str) -> None:
    decision = RoutingDecision(device="cpu", reason=reason, confidence=1.0, details=details)
    assert reason_label(decision) == label


# -- client disconnects -----------------------------------------------------------------------------


@run_async
async def test_a_client_that_leaves_cancels_its_call() -> None:
    engine = FakeEngine(service_time_s=10.0)
    app = create_app(engine, settings())
    body = json.dumps(CHAT).encode()
    left = asyncio.Event()
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"authorization", AUTH["authorization"].encode()),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    handler = asyncio.ensure_future(app(scope, receive, send))
    while not engine.calls:
        await asyncio.sleep(0.005)
    left.set()
    await asyncio.wait_for(handler, timeout=2)  # returns at once instead of after 10 s
    assert engine.calls[-1].cancelled.is_set()
    assert sent == []  # nobody to answer
