"""A gateway on 127.0.0.1 faces browsers: content types, Host allowlist, redirects, leaked addresses, CORS."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from dashboard_helpers import asgi_get
from test_app import ADMIN_AUTH, AUTH, CHAT, error_of, gateway, sse_data

from xpuflow.backends.base import StreamChunk
from xpuflow.engine import InferenceCall, StreamEvent
from xpuflow.errors import ConfigError, RemoteError, RoutingError, XpuflowError
from xpuflow.serving.app import create_app
from xpuflow.serving.hosts import host_name, is_loopback_address
from xpuflow.serving.redact import redact
from xpuflow.serving.settings import LOOPBACK_HOSTS, CorsPolicy
from xpuflow.testing.fake_engine import FakeEngine
from xpuflow.testing.run_async import run_async

UPSTREAM = "POST http://10.1.2.3:9201/v1/chat/completions"

# -- content types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "application/jsonx",
        "text/json",
    ],
)
@run_async
async def test_inference_bodies_must_be_sent_as_json(content_type: str | None) -> None:
    headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", content=json.dumps(CHAT), headers=headers)
    assert response.status_code == 415
    error = error_of(response)
    assert error["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in error["message"]


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        'application/json;charset="UTF-8"',
        "application/merge-patch+json",
        "application/vnd.api+json",
    ],
)
@run_async
async def test_json_content_types_are_accepted(content_type: str) -> None:
    async with gateway() as client:
        response = await client.post(
            "/v1/chat/completions", content=json.dumps(CHAT), headers={**AUTH, "content-type": content_type}
        )
    assert response.status_code == 200, response.text


@run_async
async def test_admin_posts_take_no_body_or_a_json_one() -> None:
    async with gateway() as client:
        bare = await client.post("/admin/reload", headers=ADMIN_AUTH)
        as_json = await client.post("/admin/reload", json={}, headers=ADMIN_AUTH)
        as_text = await client.post(
            "/admin/workers/chat/tier_low/0/drain",
            content="x",
            headers={**ADMIN_AUTH, "content-type": "text/plain"},
        )
    assert bare.status_code == 200
    assert as_json.status_code == 200
    assert as_text.status_code == 415
    assert error_of(as_text)["code"] == "unsupported_media_type"


# -- Host allowlist ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("localhost:8000", True),
        ("LOCALHOST.", True),
        ("127.0.0.1:1", True),
        ("[::1]:8000", True),
        ("[::1]", True),
        ("attacker.example", False),
        ("attacker.example:8000", False),
        ("localhost.attacker.example", False),
        ("127.0.0.1.nip.io", False),
        ("", False),
    ],
)
@run_async
async def test_a_loopback_gateway_answers_only_its_own_names(host: str, allowed: bool) -> None:
    async with gateway(allowed_hosts=LOOPBACK_HOSTS) as client:
        response = await client.get("/v1/models", headers={**AUTH, "host": host})
    if allowed:
        assert response.status_code == 200
    else:
        assert response.status_code == 400
        error = error_of(response)
        assert error["code"] == "host_not_allowed"
        assert "gateway.allowed_hosts" in error["message"]


@pytest.mark.parametrize("host", ["localhost:8000", "attacker.example"])
@run_async
async def test_the_inference_posts_check_the_host_too(host: str) -> None:
    # they skip Starlette's middleware (serving.app.GatewayApp) but not its Host check
    async with gateway(allowed_hosts=LOOPBACK_HOSTS) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers={**AUTH, "host": host})
    if host.startswith("localhost"):
        assert response.status_code == 200
    else:
        assert response.status_code == 400
        assert error_of(response)["code"] == "host_not_allowed"


@run_async
async def test_host_suffix_patterns_and_star() -> None:
    async with gateway(allowed_hosts=("api.example.com", "*.internal.example")) as client:
        ok = await client.get("/health", headers={"host": "a.b.internal.example:443"})
        exact = await client.get("/health", headers={"host": "API.example.com"})
        bare = await client.get("/health", headers={"host": "internal.example"})
    assert (ok.status_code, exact.status_code, bare.status_code) == (200, 200, 400)
    async with gateway(allowed_hosts=("*",)) as client:
        assert (await client.get("/health", headers={"host": "anything.example"})).status_code == 200


def test_the_host_filter_answers_a_host_it_has_seen_as_it_did_the_first_time() -> None:
    from xpuflow.serving.hosts import _SEEN_MAX, HostFilter

    hosts = HostFilter(None, LOOPBACK_HOSTS)  # type: ignore[arg-type]  # allows() alone wraps nothing
    asked = ["localhost:8000", "attacker.example", "LOCALHOST", "127.0.0.1.nip.io", "[::1]:1"]
    first = [hosts.allows(h) for h in asked]
    assert first == [True, False, True, False, True]
    assert [hosts.allows(h) for h in asked] == first  # a refused one is never remembered as allowed
    for port in range(2 * _SEEN_MAX):
        assert hosts.allows(f"localhost:{port}")
    assert len(hosts._seen) <= _SEEN_MAX


def test_host_helpers() -> None:
    assert host_name("[::1]:8000") == "[::1]"
    assert host_name("Example.COM:80") == "example.com"
    assert [is_loopback_address(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "localhost")] == [True] * 4
    assert [is_loopback_address(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com")] == [False] * 4


# -- the trailing-slash redirect ------------------------------------------------------------------


@run_async
async def test_the_slash_redirect_is_relative_and_ignores_the_host_header() -> None:
    async with gateway() as client:
        response = await client.get("/metrics/?x=1", headers={"host": "attacker.example"})
        post = await client.post(
            "/v1/chat/completions/", json=CHAT, headers={**AUTH, "host": "attacker.example"}
        )
    assert response.status_code == 307
    assert response.headers["location"] == "/metrics?x=1"
    assert post.status_code == 307  # the client repeats the POST, body and all, at the location
    assert post.headers["location"] == "/v1/chat/completions"
    status, headers, _ = await asgi_get(create_app(FakeEngine()), "//attacker.example/health/")
    assert status == 404  # never a protocol-relative Location
    assert "location" not in headers


# -- upstream addresses stay in the log -------------------------------------------------------------


def test_redact_removes_urls_and_socket_addresses() -> None:
    text = (
        f"{UPSTREAM} failed: ClientConnectorError: Cannot connect to host upstream-a:9201 ssl:default "
        "[Connect call failed ('10.1.2.3', 9201)]; also [::1]:8000, 192.168.0.7 and localhost:5000"
    )
    out = redact(text)
    for leak in ("10.1.2.3", "9201", "upstream-a", "::1", "8000", "192.168.0.7", "localhost", "http"):
        assert leak not in out, out
    assert out.startswith("POST [upstream] failed: ClientConnectorError: Cannot connect to host [upstream]")
    assert (
        redact("model 'x' needs 14.2 GiB; use precision int8")
        == "model 'x' needs 14.2 GiB; use precision int8"
    )


@pytest.mark.parametrize(
    "error",
    [
        RemoteError(f"{UPSTREAM} failed: ClientOSError: reset by 10.1.2.3:9201", retryable=True),
        RemoteError("http://10.1.2.3:9201 answered 400 to POST /v1/chat/completions: too long", status=400),
        RoutingError(f"request x failed on every worker tried: chat/remote/0: {UPSTREAM} timed out"),
    ],
)
@run_async
async def test_error_bodies_do_not_carry_upstream_addresses(error: XpuflowError, caplog: Any) -> None:
    engine = FakeEngine()
    engine.fail_next(error)
    async with gateway(engine) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code >= 400
    message = error_of(response)["message"]
    assert "10.1.2.3" not in message
    assert "9201" not in message
    assert "[upstream]" in message
    assert "10.1.2.3" in caplog.text  # the operator keeps the detail


class LeakyStream(FakeEngine):
    async def stream(self, call: InferenceCall) -> AsyncIterator[StreamEvent]:
        events = super().stream(call)
        first = await events.__anext__()
        yield first
        yield StreamEvent(chunk=StreamChunk(text="partial "))
        yield StreamEvent(error=f"{UPSTREAM} failed mid-stream: reset by peer")


@run_async
async def test_stream_error_events_name_the_worker_not_the_upstream(caplog: Any) -> None:
    async with gateway(LeakyStream()) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    [*_, last] = sse_data(response.text)
    error = json.loads(last)["error"]
    assert error["code"] == "stream_interrupted"
    assert "on worker 'chat/" in error["message"]
    assert "10.1.2.3" not in error["message"]
    assert "10.1.2.3" in caplog.text


# -- CORS -----------------------------------------------------------------------------------------


@run_async
async def test_cors_is_off_unless_configured() -> None:
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    async with gateway() as client:
        response = await client.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in response.headers


@run_async
async def test_cors_policy_answers_preflights_for_its_origins_only() -> None:
    cors = CorsPolicy(allow_origins=("https://app.example",), allow_credentials=True, max_age_s=120)
    request = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
    async with gateway(cors=cors) as client:
        ok = await client.options(
            "/v1/chat/completions", headers={"origin": "https://app.example", **request}
        )
        other = await client.options(
            "/v1/chat/completions", headers={"origin": "https://evil.example", **request}
        )
        call = await client.post(
            "/v1/chat/completions", json=CHAT, headers={**AUTH, "origin": "https://app.example"}
        )
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert ok.headers["access-control-allow-credentials"] == "true"
    assert ok.headers["access-control-max-age"] == "120"
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    assert "x-xpuflow-worker" in call.headers["access-control-expose-headers"]


def test_cors_policy_refuses_credentials_for_every_origin() -> None:
    with pytest.raises(ConfigError, match="list the origins"):
        CorsPolicy(allow_origins=("*",), allow_credentials=True)
    with pytest.raises(ConfigError, match="allow_origins is empty"):
        CorsPolicy()
