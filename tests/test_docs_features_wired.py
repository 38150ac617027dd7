"""Every feature docs/ promises a user is reached from ``xpuflow serve`` (issue 13, "wire or remove").

One case per feature: the docs file it comes from and a phrase of it (checked to still be there), a small
config that uses the feature, and a check that exercises it through the gateway as ``xpuflow serve``
builds it (``cli/serve.py``: ``_settings`` -> ``Orchestrator(config, config_path=...)`` -> ``start()`` ->
``dashboard_routes`` -> ``create_app``), in-process over an ASGI transport, on the fake backend and a
fixed CPU inventory. Each check asserts something a user can see: a header, a status, a metric line, a
row of ``/admin/workers``, a refusal.

A documented feature that ``xpuflow serve`` does not reach is marked ``xfail(strict=True)`` with the gap
in its reason: the case documents the defect and turns red once someone wires it without removing the
mark. A last check fails when docs/ name a module (``xpuflow.x.y``) or a source path that does not exist.
The harness (``served``, the registry, an upstream server) is tests/docs_features_support.py.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

try:  # the maintained fork the openai client depends on here; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from docs_features_support import (  # tests/docs_features_support.py
    ADMIN,
    CASE_TIMEOUT_S,
    DOCS,
    FEATURES,
    GIB,
    HOST,
    INVENTORY,
    KEY_ENV,
    KEYS,
    MOCK_UPSTREAM,
    ROOT,
    USER,
    Check,
    Feature,
    Served,
    bearer,
    custom,
    fake,
    feature,
    metric,
    one,
    openai_upstream,
    queued_on,
    reachable,
    remote_deployment,
    running_on,
    served,
    two_tiers,
    until,
)
from xpuflow.cli import serve as serve_cli
from xpuflow.config import load_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.orchestrator import Orchestrator
from xpuflow.serving.app import create_app

# ---- HTTP endpoints (docs/api.md) --------------------------------------------------------------------


@feature("POST /v1/chat/completions", "api.md", "`POST /v1/chat/completions`")
async def _chat(s: Served) -> None:
    answer = await s.chat(text="one two three")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "three two one"  # the fake session's answer
    assert answer.headers["x-request-id"] == body["id"]


@feature("chat streaming (SSE, include_usage)", "api.md", "`stream_options.include_usage`")
async def _chat_stream(s: Served) -> None:
    answer = await s.chat(text="a b", stream=True, stream_options={"include_usage": True})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == []
    assert "usage" in chunks[-1]
    assert answer.headers["x-xpuflow-worker"] == "chat/0"  # routing headers come with the stream


@feature("POST /v1/completions", "api.md", "`POST /v1/completions`")
async def _completions(s: Served) -> None:
    answer = await s.client.post("/v1/completions", json={"model": "chat", "prompt": "x y", "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == "y x"


@feature(
    "POST /v1/embeddings (float, base64)",
    "api.md",
    "`POST /v1/embeddings`",
    one(fake("emb", task="embedding")),
)
async def _embeddings(s: Served) -> None:
    plain = await s.client.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b"]})
    assert plain.status_code == 200, plain.text
    vectors = [d["embedding"] for d in plain.json()["data"]]
    assert [len(v) for v in vectors] == [8, 8]  # the fake session's vectors
    packed = await s.client.post(
        "/v1/embeddings", json={"model": "emb", "input": "a", "encoding_format": "base64"}
    )
    assert len(base64.b64decode(packed.json()["data"][0]["embedding"])) == 8 * 4
    wrong = await s.chat(model="emb")
    assert wrong.status_code == 400
    assert wrong.json()["error"]["code"] == "model_task_mismatch"


@feature("GET /v1/models and /v1/models/{model}", "api.md", "`GET /v1/models/{model}`", two_tiers())
async def _models(s: Served) -> None:
    listed = (await s.client.get("/v1/models")).json()["data"]
    assert [(m["id"], m["task"], m["tiers"]) for m in listed] == [("chat", "chat", ["tier_high", "tier_low"])]
    assert (await s.client.get("/v1/models/chat")).json()["id"] == "chat"
    missing = await s.client.get("/v1/models/nope")
    assert missing.status_code == 404


@feature("GET /health and GET /ready", "api.md", "`GET /ready`")
async def _health(s: Served) -> None:
    assert (await s.client.get("/health")).json() == {"status": "ok"}
    assert (await s.client.get("/ready")).json() == {"status": "ready"}


@feature("graceful drain: /ready 503 draining, new requests 503", "api.md", "`shutting_down`")
async def _drain(s: Served) -> None:
    s.app.state.gateway.drain.begin()  # what GatewayServer does on SIGTERM (gateway.drain_timeout_s)
    ready = await s.client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["status"] == "draining"
    refused = await s.chat()
    assert refused.status_code == 503
    assert refused.headers["retry-after"]
    assert (await s.client.get("/health")).status_code == 200


@feature("GET /openapi.json", "api.md", "`GET /openapi.json`")
async def _openapi(s: Served) -> None:
    document = (await s.client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    assert "/v1/chat/completions" in document["paths"]
    enums = re.findall(r'"enum": \[([^\]]*)\]', json.dumps(document))
    assert any('"chat"' in e for e in enums)  # the served models are the model enum


@feature("trailing-slash redirect", "api.md", "redirected with 307")
async def _slash(s: Served) -> None:
    answer = await s.client.get("/health/", follow_redirects=False)
    assert answer.status_code == 307
    assert answer.headers["location"] == "/health"


@feature("JSON bodies only (415)", "api.md", "refused with 415")
async def _media_type(s: Served) -> None:
    answer = await s.client.post(
        "/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"}
    )
    assert answer.status_code == 415
    assert answer.json()["error"]["code"] == "unsupported_media_type"


@feature("field validation (422 with param)", "api.md", "a refusal names the field in `param`")
async def _validation(s: Served) -> None:
    too_many = await s.chat(max_tokens=40000)
    assert too_many.status_code == 422  # max_tokens_limit
    answer = await s.chat(temperature=5)
    assert answer.status_code == 422
    assert answer.json()["error"]["param"] == "temperature"
    refused = await s.chat(tools=[{"type": "function", "function": {"name": "f"}}])
    assert refused.status_code == 422


@feature("unknown model 404 listing the served ones", "api.md", "`model_not_found`")
async def _unknown_model(s: Served) -> None:
    answer = await s.chat(model="nope")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "model_not_found"
    assert "chat" in answer.json()["error"]["message"]


@feature("405 on a wrong method", "api.md", "`method_not_allowed`")
async def _method(s: Served) -> None:
    answer = await s.client.get("/v1/chat/completions")
    assert answer.status_code == 405


# ---- request headers (docs/api.md) -----------------------------------------------------------------


@feature(
    "response headers x-xpuflow-tier/worker/device/route-reason",
    "api.md",
    "`x-xpuflow-route-reason`",
    two_tiers(),
)
async def _response_headers(s: Served) -> None:
    answer = await s.chat()
    assert answer.headers["x-xpuflow-tier"] in ("tier_high", "tier_low")
    assert answer.headers["x-xpuflow-worker"] in ("big/0", "small/0")
    assert answer.headers["x-xpuflow-device"] == "cpu"
    assert answer.headers["x-xpuflow-route-reason"]


@feature("x-xpuflow-tier override", "api.md", "Override the router's tier choice", two_tiers())
async def _tier_override(s: Served) -> None:
    for tier, worker in (("tier_low", "small/0"), ("tier_high", "big/0")):
        answer = await s.chat(headers={"x-xpuflow-tier": tier})
        assert answer.headers["x-xpuflow-tier"] == tier
        assert answer.headers["x-xpuflow-worker"] == worker


async def _priority_order(s: Served) -> list[str]:
    """One busy worker; two low requests queue, then a high one: the order in which they finish."""
    order: list[str] = []

    async def send(tag: str, priority: str) -> None:
        answer = await s.chat(text=tag, headers={"x-priority": priority})
        assert answer.status_code == 200, answer.text
        order.append(tag)

    first = asyncio.ensure_future(send("first", "normal"))
    await until(lambda: running_on(s.orch, "chat/0") == 1, "the first request runs")
    lows = [asyncio.ensure_future(send(f"low{i}", "low")) for i in range(2)]
    await until(lambda: queued_on(s.orch, "chat/0") == 2, "two low requests queued")
    high = asyncio.ensure_future(send("high", "high"))
    await until(lambda: queued_on(s.orch, "chat/0") == 3, "the high request queued")
    await asyncio.gather(first, *lows, high)
    return order


SLOW_ONE = fake(max_batch_size=1, options={"service_time_s": 0.15})


@feature("x-priority orders the worker queue", "api.md", "`x-priority`", one(SLOW_ONE))
async def _priority(s: Served) -> None:
    order = await _priority_order(s)
    assert order.index("high") < min(order.index("low0"), order.index("low1")), order


@feature(
    "batching.queue_policy: fifo",
    "config.md",
    "`queue_policy`",
    one({**SLOW_ONE, "batching": {"queue_policy": "fifo"}}),
)
async def _fifo(s: Served) -> None:
    order = await _priority_order(s)
    assert order.index("high") > order.index("low1"), order  # arrival order, priority ignored


SESSIONS = one(fake(replicas=3))


async def _favoured(s: Served, **request: Any) -> list[str]:
    """Route reasons of eight requests of one session. The favourite gets the affinity bonus and is drawn
    about nine times in ten (the draw among the top 3 is random by design), so one in eight suffices."""
    reasons = []
    for _ in range(8):
        answer = await s.chat(**request)
        assert answer.status_code == 200, answer.text
        reasons.append(answer.headers["x-xpuflow-route-reason"])
    return reasons


@feature("x-xpuflow-session affinity", "api.md", "`x-xpuflow-session`", SESSIONS)
async def _session_header(s: Served) -> None:
    assert any("affinity 1.00" in r for r in await _favoured(s, headers={"x-xpuflow-session": "alice"}))
    assert not any("affinity" in r for r in await _favoured(s))


@feature("OpenAI `user` field as the session key", "api.md", "else the body's OpenAI `user` field", SESSIONS)
async def _session_user(s: Served) -> None:
    assert any("affinity 1.00" in r for r in await _favoured(s, user="bob"))


# ---- API keys (docs/api.md, docs/config.md) -----------------------------------------------------------


@feature("api_keys: infer key required (401/403)", "config.md", "`api_keys[]`", one(**KEYS))
async def _keys(s: Served) -> None:
    missing = await s.chat()
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    wrong = await s.chat(headers=bearer("sk-nope"))
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert (await s.chat(headers=bearer(USER))).status_code == 200
    admin_on_v1 = await s.chat(headers=bearer(ADMIN))
    assert admin_on_v1.status_code == 403
    user_on_admin = await s.client.get("/admin/workers", headers=bearer(USER))
    assert user_on_admin.status_code == 403


@feature(
    "api_keys[].key_env",
    "config.md",
    "Environment variable that holds the token.",
    one(api_keys=[{"name": "env", "key_env": KEY_ENV}]),
)
async def _key_env(s: Served) -> None:
    assert (await s.chat()).status_code == 401
    assert (await s.chat(headers=bearer("sk-from-the-environment"))).status_code == 200


@feature("no admin key: admin API 403 admin_disabled", "api.md", "`admin_disabled`")
async def _admin_disabled(s: Served) -> None:
    answer = await s.client.get("/admin/workers")
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "admin_disabled"


@feature(
    "api_keys[].name shown in metrics",
    "config.md",
    "Who holds the key (shown in metrics, never the key).",
    one(api_keys=[{"name": "team-zebra", "key": USER}]),
)
async def _key_name_in_metrics(s: Served) -> None:
    assert (await s.chat(headers=bearer(USER))).status_code == 200
    text = await s.metrics()
    assert "team-zebra" in text
    assert USER not in text


# ---- gateway section (docs/config.md) ---------------------------------------------------------------


@feature(
    "gateway.max_body_bytes (413)",
    "config.md",
    "Larger request bodies get 413.",
    one(gateway={"max_body_bytes": 2048}),
)
async def _max_body(s: Served) -> None:
    answer = await s.chat(text="x" * 4096)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"
    assert (await s.chat(text="small")).status_code == 200


@feature(
    "gateway.metrics_require_key + the metrics right",
    "config.md",
    "Require a key with the metrics right for /metrics",
    one(gateway={"metrics_require_key": True}, **KEYS),
)
async def _metrics_key(s: Served) -> None:
    assert (await s.client.get("/metrics")).status_code == 401
    assert (await s.client.get("/metrics", headers=bearer(USER))).status_code == 403
    assert "xpuflow_requests_in_flight" in await s.metrics(headers=bearer(ADMIN))


@feature(
    "gateway.dashboard_require_key + the dashboard right",
    "dashboard.md",
    "`gateway.dashboard_require_key: true`",
    one(gateway={"dashboard_require_key": True}, **KEYS),
)
async def _dashboard_key(s: Served) -> None:
    assert (await s.client.get("/dashboard/snapshot")).status_code == 401
    assert (await s.client.get("/dashboard/snapshot", headers=bearer(USER))).status_code == 403
    assert (await s.client.get("/dashboard/snapshot", headers=bearer(ADMIN))).status_code == 200
    assert (await s.client.get("/dashboard")).status_code == 200  # the page holds no data: open


@feature("loopback Host check (host_not_allowed)", "config.md", "`localhost`, `127.0.0.1` or `[::1]`")
async def _loopback_hosts(s: Served) -> None:
    rebound = await s.client.get("/health", headers={"host": "attacker.example"})
    assert rebound.status_code == 400
    assert rebound.json()["error"]["code"] == "host_not_allowed"
    assert (await s.client.get("/health", headers={"host": "localhost:8000"})).status_code == 200


@feature(
    "gateway.allowed_hosts",
    "config.md",
    "Host header values answered",
    one(gateway={"allowed_hosts": ["*.example.com", "127.0.0.1"]}),
)
async def _allowed_hosts(s: Served) -> None:
    assert (await s.client.get("/health", headers={"host": "api.example.com"})).status_code == 200
    assert (await s.client.get("/health", headers={"host": "localhost"})).status_code == 400


@feature(
    "gateway.cors",
    "config.md",
    "Which browser origins may call the gateway",
    one(gateway={"cors": {"allow_origins": ["https://chat.example.com"], "max_age_s": 600}}),
)
async def _cors(s: Served) -> None:
    preflight = await s.client.options(
        "/v1/chat/completions",
        headers={
            "origin": "https://chat.example.com",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )
    assert preflight.headers["access-control-allow-origin"] == "https://chat.example.com"
    assert preflight.headers["access-control-max-age"] == "600"
    answer = await s.chat(headers={"origin": "https://chat.example.com"})
    assert "x-xpuflow-worker" in answer.headers["access-control-expose-headers"].lower()


@custom(
    "gateway.host / gateway.port (where serve listens)",
    "config.md",
    "--host and --port of `xpuflow serve` win",
)
async def _listen(tmp: Path) -> None:
    path = tmp / "listen.yaml"
    path.write_text(yaml.safe_dump(one(gateway={"host": "127.0.0.2", "port": 8123})))
    config = load_config(path)
    assert serve_cli.listen_address(config, None, None) == ("127.0.0.2", 8123)
    assert serve_cli.listen_address(config, "127.0.0.1", 0) == ("127.0.0.1", 0)


# ---- deployments (docs/config.md, docs/scheduling.md) -------------------------------------------------


@feature(
    "deployments[].replicas",
    "config.md",
    "Workers to start for this deployment.",
    one(fake(replicas=3), **KEYS),
)
async def _replicas(s: Served) -> None:
    assert sorted(await s.workers()) == ["chat/0", "chat/1", "chat/2"]


@feature(
    "deployments[].max_batch_size",
    "config.md",
    "Largest batch the session runs at once.",
    one(fake(max_batch_size=2, options={"service_time_s": 0.1}), **KEYS),
)
async def _max_batch(s: Served) -> None:
    answers = await asyncio.gather(*(s.chat(headers=bearer(USER)) for _ in range(6)))
    assert all(a.status_code == 200 for a in answers)
    worker = (await s.workers())["chat/0"]
    assert worker["max_batch_size"] == 2
    assert max(int(size) for size in worker["batch_sizes"]) <= 2


@feature(
    "deployments[].max_seq_len (a prompt too long for every worker: 400)",
    "worker_choice.md",
    "one too long for every worker",
    one(fake(max_seq_len=300)),
)
async def _max_seq_len(s: Served) -> None:
    answer = await s.chat(text="word " * 600)  # at least 500 tokens by the 6-characters-a-token bound
    assert answer.status_code in (400, 422), answer.text
    assert "300" in answer.json()["error"]["message"]
    assert (await s.chat()).status_code == 200


@feature(
    "a prompt too long for every worker is refused with 422 naming the largest context",
    "worker_choice.md",
    "is refused with 422 (`invalid_value`, param `messages` or `prompt`) naming the largest context",
    one(fake(max_seq_len=300)),
)
async def _max_seq_len_status(s: Served) -> None:
    answer = await s.chat(text="word " * 600)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["param"] == "messages"
    assert "more than the context of every worker" in answer.json()["error"]["message"]


@feature(
    "deployments[].timeout_s (attempt timeout)",
    "config.md",
    "Longest one attempt of a request may take.",
    {
        "deployments": [fake(timeout_s=0.2, options={"service_time_s": 2.0})],
        "models": [
            {
                "name": "chat",
                "tiers": [{"name": "t", "deployments": ["chat"]}],
                "max_retries": 0,
                "outage_retry_s": 0,
            }
        ],
    },
)
async def _timeout(s: Served) -> None:
    answer = await s.chat()  # without the 0.2 s attempt timeout the session would answer after 2 s
    assert answer.status_code in (503, 504), answer.text
    assert "0.2 s" in answer.json()["error"]["message"]


@custom(
    "deployments[].max_in_flight refused for a batching backend",
    "config.md",
    "Other backends batch with `batching` and refuse it.",
)
async def _max_in_flight(tmp: Path) -> None:
    with pytest.raises(Exception, match="max_in_flight"):
        async with served(one(fake(max_in_flight=4)), tmp):
            pass


@feature(
    "deployments[].batching.queue_capacity (429 Retry-After)",
    "config.md",
    "Requests a worker holds queued before 429.",
    one(fake(max_batch_size=1, batching={"queue_capacity": 2}, options={"service_time_s": 0.3})),
)
async def _queue_capacity(s: Served) -> None:
    answers = await asyncio.gather(*(s.chat() for _ in range(6)))
    refused = [a for a in answers if a.status_code == 429]
    assert refused
    assert all(int(a.headers["retry-after"]) >= 1 for a in refused)
    assert any(a.status_code == 200 for a in answers)


@feature(
    "deployments[].batching.policy",
    "config.md",
    "Batch policy: adaptive wait window, dispatch at once, or a fixed window.",
    one(fake(batching={"policy": "fixed_window", "max_wait_ms": 5, "aging_s": 2}), **KEYS),
)
async def _batch_policy(s: Served) -> None:
    worker = s.orch.workers["chat/0"].to_dict()
    assert worker["batching"]["policy"] == "fixed_window", worker["batching"]


@custom(
    "deployments[].precision checked against the backend's capability",
    "backends.md",
    "a precision it does not run there fails",
)
async def _capability_precision(tmp: Path) -> None:
    with pytest.raises(Exception, match=r"precision int4: the backend runs fp32"):
        async with served(one(fake(precision="int4")), tmp):
            pass  # the fake backend's Capability runs fp32 only


@feature(
    "deployments[].options reach the backend",
    "config.md",
    "Backend-specific settings.",
    one(
        fake(options={"fail_next": 1}),
        models=[{"name": "chat", "tiers": [{"name": "t", "deployments": ["chat"]}], "outage_retry_s": 0}],
    ),
)
async def _options(s: Served) -> None:
    first = await s.chat()  # options.fail_next: the session fails its first batch
    assert first.status_code == 503, first.text
    assert (await s.chat()).status_code == 200


# ---- logical models and routing (docs/config.md, docs/routing.md, docs/worker_choice.md) --------------


@feature(
    "models[].routing.complexity_threshold",
    "routing.md",
    "score from which a request wants the first (strongest) tier",
    two_tiers({"complexity_threshold": 1.0}),
)
async def _threshold(s: Served) -> None:
    for _ in range(3):
        answer = await s.chat(text="Prove that there are infinitely many primes, step by step.")
        assert answer.headers["x-xpuflow-tier"] == "tier_low"  # no score reaches 1.0


@feature(
    "models[].tiers[].latency_sla_ms (SLA circuit diverts)",
    "routing.md",
    "the wanted tier's circuit is open",
    {
        **two_tiers({"complexity_threshold": 0.0, "sla_cooldown_s": 600}, latency_sla_ms=1),
        "deployments": [fake("big", options={"service_time_s": 0.05}), fake("small")],
    },
)
async def _sla(s: Served) -> None:
    first = await s.chat()
    assert first.headers["x-xpuflow-tier"] == "tier_high"  # everything wants it (threshold 0)
    second = await s.chat()
    assert second.headers["x-xpuflow-tier"] == "tier_low", second.headers["x-xpuflow-route-reason"]


@feature(
    "models[].tiers[].min_score (middle tiers)",
    "config.md",
    "Middle tiers: lowest score taken.",
    {
        "deployments": [fake("a"), fake("b"), fake("c")],
        "models": [
            {
                "name": "chat",
                "routing": {"complexity_threshold": 0.999},
                "tiers": [
                    {"name": "top", "deployments": ["a"]},
                    {"name": "mid", "deployments": ["b"], "min_score": 0.0},
                    {"name": "low", "deployments": ["c"]},
                ],
            }
        ],
    },
)
async def _min_score(s: Served) -> None:
    answer = await s.chat()
    assert answer.headers["x-xpuflow-tier"] == "mid"


def _failing_tier(max_retries: int, outage_retry_s: float) -> dict[str, Any]:
    return {
        "deployments": [fake("a", options={"fail_next": 1}), fake("b", options={"fail_next": 1})],
        "models": [
            {
                "name": "chat",
                "tiers": [{"name": "t", "deployments": ["a", "b"]}],
                "max_retries": max_retries,
                "outage_retry_s": outage_retry_s,
            }
        ],
    }


@feature("models[].max_retries", "config.md", "Retries on other workers of a tier", _failing_tier(1, 0))
async def _max_retries(s: Served) -> None:
    answer = await s.chat()  # each worker fails its first batch: one try and one retry, both named
    assert answer.status_code == 503, answer.text
    message = answer.json()["error"]["message"]
    assert {"t/a/0", "t/b/0"} <= set(re.findall(r"t/[ab]/0", message)), message


@feature("models[].max_retries: 0", "config.md", "Retries on other workers of a tier", _failing_tier(0, 0))
async def _no_retries(s: Served) -> None:
    answer = await s.chat()
    assert answer.status_code == 503, answer.text
    message = answer.json()["error"]["message"]
    assert ("t/a/0" in message) != ("t/b/0" in message), message  # one try, no retry


@feature(
    "models[].outage_retry_s",
    "config.md",
    "how long a request keeps going round them",
    one(
        fake(options={"fail_next": 1}),
        models=[
            {
                "name": "chat",
                "tiers": [{"name": "t", "deployments": ["chat"]}],
                "max_retries": 0,
                "outage_retry_s": 5,
            }
        ],
    ),
)
async def _outage(s: Served) -> None:
    answer = await s.chat()  # its only worker failed: a second round after the backoff serves it
    assert answer.status_code == 200, answer.text


@feature(
    "models[].routing.vram_source / vram_poll_interval_ms",
    "config.md",
    "accepts every\nfield of `RoutingConfig`",
    two_tiers({"vram_source": "none", "vram_poll_interval_ms": 200}),
)
async def _vram_source(s: Served) -> None:
    from xpuflow.routing.adaptive import AdaptiveRouter

    routers = reachable(s.orch, AdaptiveRouter)
    assert routers, "no tier router found"
    for router in routers:
        stats = router.monitor.stats().to_dict()
        assert (stats["source"], stats["poll_interval_ms"]) == ("none", 200), stats


# ---- admin actions (docs/api.md, docs/residency.md) ---------------------------------------------------


@feature("GET /admin/workers", "api.md", "`GET /admin/workers`", one(fake(replicas=2), **KEYS))
async def _admin_workers(s: Served) -> None:
    status = (await s.admin("GET", "/admin/workers")).json()
    assert {w["worker_id"] for w in status["workers"]} == {"chat/0", "chat/1"}
    assert status["placements"]["chat"]["devices"] == ["cpu"]


@feature(
    "POST /admin/workers/{id}/drain|undrain",
    "api.md",
    "`POST /admin/workers/{id}/drain`",
    one(fake(replicas=2), **KEYS),
)
async def _admin_drain(s: Served) -> None:
    assert (await s.admin("POST", "/admin/workers/chat/0/drain")).status_code == 200
    served_by = {(await s.chat(headers=bearer(USER))).headers["x-xpuflow-worker"] for _ in range(6)}
    assert served_by == {"chat/1"}
    assert metric(await s.metrics(), "xpuflow_worker_draining", worker="chat/0") == [1.0]
    assert (await s.admin("POST", "/admin/workers/chat/0/undrain")).status_code == 200
    assert metric(await s.metrics(), "xpuflow_worker_draining", worker="chat/0") == [0.0]
    unknown = await s.admin("POST", "/admin/workers/nope/drain")
    assert unknown.status_code in (404, 422)


@feature("POST /admin/reload", "config.md", "`POST /admin/reload` re-reads the file", one(fake("a"), **KEYS))
async def _admin_reload(s: Served) -> None:
    data = yaml.safe_load(s.path.read_text())
    data["deployments"].append(fake("b"))
    s.path.write_text(yaml.safe_dump(data))
    answer = await s.admin("POST", "/admin/reload")
    assert answer.status_code == 200, answer.text
    assert answer.json()["changes"]["added"] == ["b"]
    assert answer.json()["changes"]["kept"] == ["a"]
    assert (await s.chat(model="b", headers=bearer(USER))).status_code == 200


ON_DEMAND = {
    "deployments": [
        fake("a", load="on_demand", memory_gb=0.3, keep_alive_s=600),
        fake("b", load="on_demand", memory_gb=0.3),
    ],
    "residency": {"budget_gb": {"cpu": 0.5}},
    **KEYS,
}


@feature("POST /admin/workers/{id}/load|unload", "residency.md", "`POST /admin/workers/{id}/load`", ON_DEMAND)
async def _admin_load(s: Served) -> None:
    loaded = await s.admin("POST", "/admin/workers/a/0/load")
    assert loaded.status_code == 200
    assert loaded.json()["resident"] is True
    answer = await s.chat(model="a", headers=bearer(USER))
    assert "x-xpuflow-cold-start" not in answer.headers
    unloaded = await s.admin("POST", "/admin/workers/a/0/unload")
    assert unloaded.json() == {"worker": "a/0", "resident": False, "unloaded": True}


# ---- residency (docs/residency.md) --------------------------------------------------------------------


@feature(
    "load: on_demand (x-xpuflow-cold-start, LRU eviction, 503 model_does_not_fit)",
    "residency.md",
    "the answer carries `x-xpuflow-cold-start: true`",
    ON_DEMAND,
)
async def _on_demand(s: Served) -> None:
    first = await s.chat(model="a", headers=bearer(USER))
    assert first.headers["x-xpuflow-cold-start"] == "true"
    assert "x-xpuflow-cold-start" not in (await s.chat(model="a", headers=bearer(USER))).headers
    assert (await s.chat(model="b", headers=bearer(USER))).headers["x-xpuflow-cold-start"] == "true"
    rows = {
        m["name"]: m
        for r in (await s.admin("GET", "/admin/workers")).json()["residency"]
        for m in r["models"]
    }
    assert rows["b/0"]["resident"]
    assert not rows["a/0"]["resident"]
    assert rows["a/0"]["evictions"] == 1


@feature(
    "deployments[].keep_alive_s + residency.check_interval_s",
    "residency.md",
    "on_demand replicas unused for `keep_alive_s` are",
    {
        "deployments": [fake("a", load="on_demand", memory_gb=0.1, keep_alive_s=0.1)],
        "residency": {"budget_gb": {"cpu": 1.0}, "check_interval_s": 0.05},
    },
)
async def _keep_alive(s: Served) -> None:
    assert (await s.chat(model="a")).headers["x-xpuflow-cold-start"] == "true"
    await until(lambda: s.orch.status()["residency"][0]["idle_unloads"] == 1, "idled out")
    assert (await s.chat(model="a")).headers["x-xpuflow-cold-start"] == "true"


@custom(
    "a replica larger than its device's budget fails start-up",
    "residency.md",
    "A replica larger than its device's\nbudget fails start-up naming both sizes.",
)
async def _too_large(tmp: Path) -> None:
    data = one(fake("big", load="on_demand", memory_gb=2.0), residency={"budget_gb": {"cpu": 1.0}})
    with pytest.raises(Exception, match=r"2\.00 GiB, more than the residency budget of 'cpu' \(1\.00 GiB\)"):
        async with served(data, tmp):
            pass


@feature(
    "pinned replicas count in a device's budget",
    "residency.md",
    "Pinned replicas on a device with a budget are counted in it",
    {"deployments": [fake("p", memory_gb=0.25)], "residency": {"budget_gb": {"cpu": 1.0}}, **KEYS},
)
async def _pinned_counted(s: Served) -> None:
    device = (await s.admin("GET", "/admin/workers")).json()["residency"][0]
    assert device["budget_bytes"] == GIB
    assert device["resident_bytes"] == GIB // 4


RESIDENCY_METRICS = [
    "xpuflow_residency_budget_bytes",
    "xpuflow_residency_resident_bytes",
    "xpuflow_residency_unaccounted_bytes",
    "xpuflow_model_resident",
    "xpuflow_model_loads_total",
    "xpuflow_model_unloads_total",
]

for _name in RESIDENCY_METRICS:

    def _residency_metric(name: str) -> Check:
        async def check(s: Served) -> None:
            await s.chat(model="a", headers=bearer(USER))
            await s.admin("POST", "/admin/workers/a/0/unload")
            assert metric(await s.metrics(), name), f"{name} missing from /metrics"

        return check

    feature(f"metric {_name}", "residency.md", f"`{_name.removesuffix('_total')}", ON_DEMAND)(
        _residency_metric(_name)
    )


@feature(
    "dashboard 'Model residency' table",
    "residency.md",
    'The dashboard shows a "Model residency" table.',
    ON_DEMAND,
)
async def _dashboard_residency(s: Served) -> None:
    await s.chat(model="a", headers=bearer(USER))
    snapshot = (await s.client.get("/dashboard/snapshot")).json()
    assert snapshot.get("residency"), sorted(snapshot)
    assert "Model residency" in (await s.client.get("/dashboard")).text


# ---- QoS (docs/qos.md, docs/config.md) ----------------------------------------------------------------

QOS = {
    "deployments": [fake(options={"service_time_s": 0.3})],
    "api_keys": [
        {"name": "app", "key": USER},
        {"name": "batch", "key": "sk-batch-docs", "qos_class": "batch"},
        {"name": "ops", "key": ADMIN, "rights": ["admin", "metrics", "dashboard"]},
    ],
    "qos": {
        "default_context": "interactive",
        "contexts": [
            {
                "name": "interactive",
                "device": "cpu",
                "max_vram_gb": 1,
                "qos": "guaranteed",
                "request_vram_mb": 64,
            },
            {
                "name": "batch",
                "device": "cpu",
                "max_vram_gb": 0.1,
                "qos": "best_effort",
                "request_vram_mb": 64,
                "admission_timeout_s": 0.05,
            },
        ],
    },
}


@feature(
    "qos.contexts + x-qos-class (400 unknown, 429 Retry-After)",
    "qos.md",
    "a refusal is a 429 with `Retry-After`",
    QOS,
)
async def _qos_header(s: Served) -> None:
    unknown = await s.chat(headers={**bearer(USER), "x-qos-class": "gold"})
    assert unknown.status_code == 400
    assert "interactive" in unknown.json()["error"]["message"]
    both = await asyncio.gather(*(s.chat(headers={**bearer(USER), "x-qos-class": "batch"}) for _ in range(2)))
    refused = [a for a in both if a.status_code == 429]  # one 64 MiB request fits its 0.1 GiB at a time
    assert len(refused) == 1
    assert int(refused[0].headers["retry-after"]) >= 1
    assert (await s.chat(headers={**bearer(USER), "x-qos-class": "guaranteed"})).status_code == 200


@feature("api_keys[].qos_class wins over x-qos-class", "api.md", "A key's `qos_class` takes precedence", QOS)
async def _qos_key(s: Served) -> None:
    headers = {**bearer("sk-batch-docs"), "x-qos-class": "interactive"}
    both = await asyncio.gather(*(s.chat(headers=headers) for _ in range(2)))
    assert sorted(a.status_code for a in both) == [200, 429]  # the key's class (batch), not the header's


@feature("qos.default_context", "config.md", "Context for requests that name none", QOS)
async def _qos_default(s: Served) -> None:
    assert (await s.chat(headers=bearer(USER))).status_code == 200
    admitted = metric(await s.metrics(bearer(ADMIN)), "xpuflow_qos_admissions_total", context="interactive")
    assert sum(admitted) >= 1


for _name in (
    "xpuflow_qos_context_used_bytes",
    "xpuflow_qos_context_max_bytes",
    "xpuflow_qos_admissions_total",
):

    def _qos_metric(name: str) -> Check:
        async def check(s: Served) -> None:
            await s.chat(headers=bearer(USER))
            assert metric(await s.metrics(bearer(ADMIN)), name, context="interactive"), name

        return check

    feature(f"metric {_name}", "qos.md", f"`{_name}", QOS)(_qos_metric(_name))


@feature("dashboard 'QoS contexts' table", "qos.md", 'the dashboard shows a "QoS contexts" table', QOS)
async def _dashboard_qos(s: Served) -> None:
    snapshot = (await s.client.get("/dashboard/snapshot")).json()
    assert [c["name"] for c in snapshot["qos"]] == ["interactive", "batch"]
    assert "QoS contexts" in (await s.client.get("/dashboard")).text


@feature(
    "qos.partitions + qos.compute_tokens",
    "config.md",
    '`status()["partitions"]` shows each partition',
    {
        "deployments": [fake("a"), fake("b")],
        "qos": {
            "compute_tokens": 1,
            "partitions": [
                {"name": "pa", "device": "cpu", "compute_share": 0.75, "deployments": ["a"]},
                {"name": "pb", "device": "cpu", "compute_share": 0.25, "deployments": ["b"]},
            ],
        },
        **KEYS,
    },
)
async def _partitions(s: Served) -> None:
    await s.chat(model="a", headers=bearer(USER))
    rows = {p["name"]: p for p in (await s.admin("GET", "/admin/workers")).json()["partitions"]}
    assert rows["pa"]["compute_share"] == 0.75
    assert rows["pa"]["granted"] >= 1
    assert rows["pa"]["device_tokens"] == 1
    assert rows["pb"]["granted"] == 0


@custom(
    "qos.partitions[].memory_gb must fit the device",
    "config.md",
    "the `memory_gb` of a device's\npartitions must fit its memory (checked at start-up)",
)
async def _partition_memory(tmp: Path) -> None:
    part = {"name": "p", "device": "cpu", "compute_share": 0.5, "memory_gb": 64, "deployments": ["chat"]}
    with pytest.raises(Exception, match=r"add up to 64\.00 GiB, more than its 16\.00 GiB"):
        async with served(one(qos={"partitions": [part]}), tmp):
            pass


# ---- metrics families (docs/api.md) -------------------------------------------------------------------

API_METRICS = {
    "xpuflow_requests_total": {"model": "chat", "status": "200"},
    "xpuflow_request_duration_seconds_count": {"model": "chat"},
    "xpuflow_time_to_first_token_seconds_count": {"model": "chat"},
    "xpuflow_queue_time_seconds_count": {"model": "chat"},
    "xpuflow_tokens_total": {"model": "chat", "kind": "completion"},
    "xpuflow_route_decisions_total": {"model": "chat"},
    "xpuflow_requests_in_flight": {},
    "xpuflow_worker_healthy": {"worker": "chat/0", "device": "cpu"},
    "xpuflow_worker_draining": {"worker": "chat/0"},
    "xpuflow_worker_queue_depth": {"worker": "chat/0"},
    "xpuflow_worker_in_flight": {"worker": "chat/0"},
    "xpuflow_batch_size_count": {"worker": "chat/0"},
    "xpuflow_device_memory_free_bytes": {"device": "cpu"},
    "xpuflow_device_memory_total_bytes": {"device": "cpu"},
}


async def _traffic(s: Served) -> str:
    assert (await s.chat()).status_code == 200
    streamed = await s.chat(stream=True)
    assert streamed.status_code == 200
    return await s.metrics()


for _name, _labels in API_METRICS.items():

    def _api_metric(name: str, labels: dict[str, str]) -> Check:
        async def check(s: Served) -> None:
            values = metric(await _traffic(s), name, **labels)
            assert values, f"{name}{labels} missing from /metrics"

        return check

    _family = re.sub(r"_(count)$", "", _name)
    feature(f"metric {_family}", "api.md", f"`{_family}`")(_api_metric(_name, _labels))


@feature(
    "metric xpuflow_queue_time_seconds measures the queue",
    "api.md",
    "Time in a worker queue (as the engine reports it)",
    one(SLOW_ONE),
)
async def _queue_time(s: Served) -> None:
    answers = await asyncio.gather(*(s.chat() for _ in range(3)))  # one at a time: two of them queue
    assert all(a.status_code == 200 for a in answers)
    assert metric(await s.metrics(), "xpuflow_queue_time_seconds_sum", model="chat")[0] > 0


# ---- dashboard (docs/dashboard.md) --------------------------------------------------------------------


@feature("GET /dashboard (page, CSP, static files)", "dashboard.md", "`GET /dashboard/static/{file}`")
async def _dashboard_page(s: Served) -> None:
    page = await s.client.get("/dashboard")
    assert page.status_code == 200
    assert "content-security-policy" in page.headers
    for name in (
        "dashboard.js",
        "dashboard.css",
        "vendor/uPlot-1.6.32.iife.min.js",
        "vendor/uPlot-LICENSE.txt",
    ):
        assert (await s.client.get(f"/dashboard/static/{name}")).status_code == 200, name
    assert (await s.client.get("/dashboard/static/../app.py")).status_code in (400, 404)


@feature("GET /dashboard/snapshot", "dashboard.md", "`GET /dashboard/snapshot`", one(fake(replicas=2)))
async def _dashboard_snapshot(s: Served) -> None:
    await s.chat()
    snapshot = (await s.client.get("/dashboard/snapshot")).json()
    assert snapshot["error"] is None
    assert [d["device"] for d in snapshot["devices"]] == ["cpu"]
    assert {w["worker_id"] for w in snapshot["devices"][0]["workers"]} == {"chat/0", "chat/1"}
    assert snapshot["decisions"]
    assert snapshot["totals"]["requests_total"] >= 1


@feature("GET /dashboard/events?max_events=N", "dashboard.md", "`?max_events=N` ends the stream")
async def _dashboard_events(s: Served) -> None:
    answer = await s.client.get("/dashboard/events?max_events=1")
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert "event: snapshot" in answer.text


# ---- Open Inference Protocol (docs/oip.md) -----------------------------------------------------------

EMBED = one(fake("emb", task="embedding"), fake("chat"))


@feature(
    "OIP REST /v2 health, server and model metadata", "oip.md", "`GET /v2/models/{model}[/versions/1]`", EMBED
)
async def _oip_meta(s: Served) -> None:
    assert (await s.client.get("/v2/health/live")).json() == {"live": True}
    assert (await s.client.get("/v2/health/ready")).json() == {"ready": True}
    assert (await s.client.get("/v2")).json()["name"] == "xpuflow"
    meta = (await s.client.get("/v2/models/emb")).json()
    assert [i["name"] for i in meta["inputs"]] == ["text"]
    assert [o["name"] for o in meta["outputs"]] == ["embedding"]
    assert (await s.client.get("/v2/models/emb/ready")).status_code == 200
    assert (await s.client.get("/v2/models/nope/ready")).status_code == 404


@feature(
    "OIP REST infer (embeddings; chat refused)",
    "oip.md",
    "`POST /v2/models/{model}[/versions/1]/infer`",
    EMBED,
)
async def _oip_infer(s: Served) -> None:
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}
    answer = await s.client.post("/v2/models/emb/infer", json=body)
    assert answer.status_code == 200, answer.text
    output = answer.json()["outputs"][0]
    assert output["name"] == "embedding"
    assert output["shape"] == [2, 8]
    chat = await s.client.post("/v2/models/chat/infer", json=body)
    assert chat.status_code == 404
    assert "/v1/chat/completions" in chat.text
    assert metric(await s.metrics(), "xpuflow_requests_total", model="emb", status="200")


@custom(
    "gateway.grpc_port (OIP gRPC) and the kserve_v2 backend over gRPC",
    "oip.md",
    "`xpuflow serve` starts `inference.GRPCInferenceService`",
)
async def _grpc_and_kserve(tmp: Path) -> None:
    from rich.console import Console

    front = tmp / "front"
    front.mkdir()
    async with served({**EMBED, "gateway": {"grpc_port": 0}}, tmp) as upstream:
        console = Console(file=io.StringIO())
        grpc_server = await serve_cli._start_grpc(upstream.orch.config, upstream.app, HOST, console)
        assert grpc_server is not None
        assert grpc_server.port > 0
        assert f"{HOST}:{grpc_server.port}" in console.file.getvalue()  # type: ignore[attr-defined]
        try:
            options = {"base_url": f"{HOST}:{grpc_server.port}", "protocol": "grpc", "model": "emb"}
            remote = {"name": "emb2", "backend": "kserve_v2", "task": "embedding", "options": options}
            async with served(one(remote), front) as gateway:
                answer = await gateway.client.post(
                    "/v1/embeddings", json={"model": "emb2", "input": ["a", "b"]}
                )
                assert answer.status_code == 200, answer.text
                direct = await upstream.client.post(
                    "/v1/embeddings", json={"model": "emb", "input": ["a", "b"]}
                )
                for got, want in zip(answer.json()["data"], direct.json()["data"], strict=True):
                    assert got["embedding"] == pytest.approx(
                        want["embedding"], rel=1e-6
                    )  # float32 on the wire
                assert answer.headers["x-xpuflow-worker"] == "emb2/0"
        finally:
            await grpc_server.stop(grace_s=0.5)


@custom(
    "backend binary (the reference NPU stack) serving a tensor model over OIP",
    "binary_backends.md",
    "At start-up the backend asks the compiler for its version, builds the engine",
)
async def _binary(tmp: Path) -> None:
    import numpy as np

    from xpuflow.vendor_ref import build_reference_stack, export_mlp, find_c_compiler

    if find_c_compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang) to build the reference NPU stack")
    stack = await asyncio.to_thread(build_reference_stack, tmp / "refnpu")
    rng = np.random.default_rng(3)
    layers = [(rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32))]
    export_mlp(layers, tmp / "mlp.xpfmlp")
    dep = {
        "name": "mlp",
        "backend": "binary",
        "model": "mlp.xpfmlp",
        "task": "tensor",
        "device": "cpu",  # the reference "NPU" is emulated on the host
        "options": {"spec": str(stack.spec)},
    }
    models = [{"name": "mlp", "tiers": [{"name": "t", "deployments": ["mlp"]}], "outage_retry_s": 0}]
    async with served(one(dep, models=models), tmp) as s:
        assert any((tmp / "artifacts").rglob("manifest.json"))  # the engine was built into artifact_dir
        x = rng.standard_normal((2, 4)).astype(np.float32)
        meta = await s.client.get("/v2/models/mlp")  # the input's name, where the backend declares one
        name = (
            meta.json()["inputs"][0]["name"] if meta.status_code == 200 and meta.json().get("inputs") else "x"
        )
        body = {"inputs": [{"name": name, "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
        answer = await s.client.post("/v2/models/mlp/infer", json=body)
        assert answer.status_code == 200, answer.text
        output = answer.json()["outputs"][0]
        assert output["shape"] == [2, 3]
        want = x @ layers[0][0] + layers[0][1]
        assert np.asarray(output["data"], dtype=np.float32).reshape(2, 3) == pytest.approx(
            want, rel=1e-4, abs=1e-5
        )


@custom("backend kserve_v2 over REST", "oip.md", "`rest` (aiohttp, pooled keep-alive connections)")
async def _kserve_rest(tmp: Path) -> None:
    import uvicorn

    from xpuflow.serving.server import listen_socket

    front = tmp / "front"
    front.mkdir()
    async with served(EMBED, tmp) as upstream:
        sock = listen_socket(HOST, 0)
        server = uvicorn.Server(
            uvicorn.Config(upstream.app, log_level="warning", lifespan="off", access_log=False)
        )
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await until(lambda: server.started, "the upstream gateway listens")
            options = {"base_url": f"http://{HOST}:{sock.getsockname()[1]}", "model": "emb"}
            remote = {"name": "emb2", "backend": "kserve_v2", "task": "embedding", "options": options}
            async with served(one(remote), front) as gateway:
                body = {"model": "emb2", "input": ["a", "b"]}
                answer = await gateway.client.post("/v1/embeddings", json=body)
                assert answer.status_code == 200, answer.text
                direct = await upstream.client.post("/v1/embeddings", json={**body, "model": "emb"})
                for got, want in zip(answer.json()["data"], direct.json()["data"], strict=True):
                    assert got["embedding"] == pytest.approx(want["embedding"], rel=1e-6)
        finally:
            server.should_exit = True
            await task
            sock.close()


# ---- remote servers (docs/backends.md, docs/worker_choice.md) -----------------------------------------


@custom(
    "backend remote_openai + active health checks",
    "worker_choice.md",
    "`xpuflow serve` checks every remote worker actively",
)
async def _remote_openai(tmp: Path) -> None:
    async with openai_upstream() as (url, hits), served(one(remote_deployment(url)), tmp) as s:
        answer = await s.chat()
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"] == "from upstream"
        assert answer.headers["x-xpuflow-device"].startswith("remote:")
        await until(lambda: hits["health"] >= 2, "health checks")


@custom(
    "upstream addresses redacted from errors",
    "api.md",
    "URLs and socket\naddresses",
)
async def _redacted(tmp: Path) -> None:
    async with openai_upstream() as (url, _hits):
        pass  # closed again: nothing listens on its port now
    dep = remote_deployment(url, health_interval_s=0)
    data = one(
        dep, models=[{"name": "chat", "tiers": [{"name": "t", "deployments": ["chat"]}], "outage_retry_s": 0}]
    )
    async with served(data, tmp) as s:
        answer = await s.chat()
        assert answer.status_code in (502, 503), answer.text
        message = answer.json()["error"]["message"]
        assert "[upstream]" in message, message
        assert url.split("//")[1] not in message, message


@custom(
    "upstream 429: upstream_rate_limited with its Retry-After",
    "api.md",
    "`upstream_rate_limited`",
)
async def _upstream_429(tmp: Path) -> None:
    models = [{"name": "chat", "tiers": [{"name": "t", "deployments": ["chat"]}], "outage_retry_s": 0}]
    async with (
        openai_upstream(status=429) as (url, _hits),
        served(one(remote_deployment(url), models=models), tmp) as s,
    ):
        answer = await s.chat()
        assert answer.status_code == 429, answer.text
        assert answer.json()["error"]["code"] == "upstream_rate_limited"
        assert answer.headers["retry-after"] == "7"


@custom(
    "upstream 5xx: 502 upstream_error",
    "api.md",
    "a remote server failed (`RemoteError`)",
)
async def _upstream_500(tmp: Path) -> None:
    models = [{"name": "chat", "tiers": [{"name": "t", "deployments": ["chat"]}], "outage_retry_s": 0}]
    async with (
        openai_upstream(status=500) as (url, _hits),
        served(one(remote_deployment(url), models=models), tmp) as s,
    ):
        answer = await s.chat()
        assert answer.status_code == 502, answer.text
        assert answer.json()["error"]["code"] == "upstream_error"


@custom("an upstream's own 400/413/422 reaches the client", "api.md", "reaches the client with that status")
async def _upstream_422(tmp: Path) -> None:
    async with openai_upstream(status=422) as (url, hits), served(one(remote_deployment(url)), tmp) as s:
        answer = await s.chat()
        assert answer.status_code == 422, answer.text
        assert hits["chat"] == 1  # not retried: every worker would refuse it


@custom(
    "options.server_metrics: the server's own load",
    "worker_choice.md",
    "`options.server_metrics: false` turns it off",
)
async def _server_metrics(tmp: Path) -> None:
    async with openai_upstream() as (url, hits), served(one(remote_deployment(url)), tmp) as s:
        await until(lambda: hits["metrics"] >= 1, "the server's /metrics read")
        from xpuflow.routing.remote_state import RemoteStatePoller

        pollers = reachable(s.orch, RemoteStatePoller)
        assert pollers, "no remote state poller found"
        await until(lambda: all(p.has_load for p in pollers), "its load reaches the scorer")
    off = tmp / "off"
    off.mkdir()
    async with openai_upstream() as (url, hits):
        quiet = one(remote_deployment(url, server_metrics=False))
        async with served(quiet, off) as s:
            await until(lambda: hits["health"] >= 3, "health checks")
            assert hits["metrics"] == 0


@custom("resources[]: a declared remote device", "config.md", "A device the probes cannot find by themselves")
async def _declared(tmp: Path) -> None:
    async with openai_upstream() as (url, _hits):
        dep = {**remote_deployment(url), "device": "remote:vllm-a"}
        data = one(
            dep, resources=[{"id": "remote:vllm-a", "type": "remote", "name": "vLLM", "memory_bytes": GIB}]
        )
        data = {"artifact_dir": str(tmp / "artifacts"), **data}
        path = tmp / "declared.yaml"
        path.write_text(yaml.safe_dump(data))
        config = load_config(path)
        # the declared resource joins the inventory serve detects (a fixed inventory would leave it out)
        from xpuflow.discovery.declared import DeclaredProbe

        found = Inventory.detect([DeclaredProbe(config.declared_resources())], torch=False)
        inventory = Inventory.of([*INVENTORY.resources, *found.resources])
        async with Orchestrator(config, config_path=path, inventory=inventory) as orch:
            app = create_app(orch, serve_cli._settings(config, HOST))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=f"http://{HOST}") as client:
                body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
                answer = await client.post("/v1/chat/completions", json=body)
                assert answer.headers["x-xpuflow-device"] == "remote:vllm-a", answer.headers


@custom(
    "managed: engines (start, supervise, status)",
    "managed_engines.md",
    "With a\n`managed:` block, xpuflow also runs that server",
)
async def _managed(tmp: Path) -> None:
    argv = [sys.executable, str(MOCK_UPSTREAM), "--port", "{port}", "--delay-ms", "1"]
    dep = {
        "name": "chat",
        "backend": "remote_openai",
        "options": {"model": "mock", "health_interval_s": 0.2},
        "managed": {
            "argv": argv,
            "ready_path": "/health",
            "ready_timeout_s": 20,
        },
    }
    async with served(one(dep, **KEYS), tmp) as s:
        answer = await s.chat(headers=bearer(USER))
        assert answer.status_code == 200, answer.text
        managed = (await s.workers())["chat/0"]["managed"]
        assert managed["state"] == "running"
        assert managed["pid"] > 0
        snapshot = (await s.client.get("/dashboard/snapshot", headers=bearer(ADMIN))).json()
        shown = snapshot["devices"][0]["workers"][0]["managed"]
        assert shown["state"] == "running"
        assert "argv" not in shown
        # its log goes to managed/<deployment>-<replica>.log under the config's artifact_dir
        assert (tmp / "artifacts" / "managed" / "chat-0.log").is_file()


def _device_model_file(tmp: Path) -> Path:
    model = {
        "format_version": 1,
        "name": "sim",
        "max_batch_size": 4,
        "overhead_s": 0.001,
        "prefill_tokens_per_s": {1: 100000},
        "decode_tokens_per_s": {1: 10000},
        "continuous": True,
    }
    path = tmp / "sim.yaml"
    path.write_text(yaml.safe_dump(model))
    return path


@custom(
    "options.device_model (simulated service times); max_in_flight on a continuous session",
    "simulate.md",
    "so `xpuflow serve` on this file is a gateway with the simulated service times",
)
async def _device_model(tmp: Path) -> None:
    dep = fake(max_in_flight=3, options={"device_model": str(_device_model_file(tmp))})
    async with served(one(dep, **KEYS), tmp) as s:
        assert (await s.chat(headers=bearer(USER))).status_code == 200
        batching = s.orch.workers["chat/0"].to_dict()["batching"]
        assert batching["policy"] == "continuous"
        assert batching["max_in_flight"] == 3


@custom(
    "options.device_model relative to the config file",
    "simulate.md",
    "names a device model in `options.device_model`, relative to the config",
)
async def _device_model_relative(tmp: Path) -> None:
    _device_model_file(tmp)
    async with served(one(fake(options={"device_model": "sim.yaml"})), tmp) as s:
        assert (await s.chat()).status_code == 200


# ---- backends (docs/backends.md, docs/oip.md, docs/binary_backends.md) --------------------------------

DOCUMENTED_BACKENDS = {
    "llamacpp": ("backends.md", "`llamacpp`"),
    "transformers": ("backends.md", "`transformers`"),
    "onnxruntime": ("backends.md", "`onnxruntime`"),
    "openvino": ("backends.md", "`openvino`"),
    "remote_openai": ("backends.md", "`remote_openai`"),
    "kserve_v2": ("oip.md", "`kserve_v2`"),
    "binary": ("binary_backends.md", "`binary`"),
    "fake": ("simulate.md", "backend: fake"),
}

for _backend, (_doc, _quote) in DOCUMENTED_BACKENDS.items():

    def _backend_case(name: str) -> Callable[[Path], Awaitable[None]]:
        async def run(tmp: Path) -> None:
            from xpuflow.backends.registry import get_backend

            plugin = get_backend(name)  # what Orchestrator.place resolves a deployment's backend with
            assert plugin.availability().reason  # usable or not, it says why

        return run

    custom(f"backend {_backend} in the registry serve uses", _doc, _quote)(_backend_case(_backend))


# ---- CLI commands (docs/cli.md and the pages it points to) -------------------------------------------

CLI_COMMANDS = {
    ("info",): "cli.md",
    ("info", "--cluster"): "cluster.md",
    ("advise",): "cli.md",
    ("serve",): "cli.md",
    ("check",): "cli.md",
    ("build",): "artifacts.md",
    ("artifacts", "ls"): "artifacts.md",
    ("artifacts", "gc"): "artifacts.md",
    ("score",): "routing.md",
    ("bench",): "bench.md",
    ("simulate",): "simulate.md",
    ("simulate-fit",): "simulate.md",
}

for _words, _doc in CLI_COMMANDS.items():

    def _cli_case(words: tuple[str, ...]) -> Callable[[Path], Awaitable[None]]:
        async def run(tmp: Path) -> None:
            from typer.testing import CliRunner

            from xpuflow.cli.main import app

            command = [w for w in words if not w.startswith("--")]
            result = CliRunner().invoke(app, [*command, "--help"])
            assert result.exit_code == 0, result.output
            for flag in (w for w in words if w.startswith("--")):
                assert flag in result.output, result.output

        return run

    custom(f"CLI xpuflow {' '.join(_words)}", _doc, f"xpuflow {' '.join(_words)}")(_cli_case(_words))


@custom("xpuflow check CONFIG", "config.md", "`xpuflow check CONFIG` validates one")
async def _check(tmp: Path) -> None:
    from typer.testing import CliRunner

    from xpuflow.cli.main import app

    good, bad = tmp / "good.yaml", tmp / "bad.yaml"
    good.write_text(yaml.safe_dump(one()))
    bad.write_text(yaml.safe_dump({"deployments": [{**fake(), "precision": "fp12"}]}))
    assert CliRunner().invoke(app, ["check", str(good)]).exit_code == 0
    refused = CliRunner().invoke(app, ["check", str(bad)])
    assert refused.exit_code == 2
    assert "precision" in refused.output


# -- the tests --------------------------------------------------------------------------------------------


def _param(f: Feature) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=f.gap)] if f.gap else []
    return pytest.param(f, id=f"{f.doc}: {f.id}", marks=marks)


def _doc_text(name: str) -> str:
    return (DOCS / name).read_text()


@pytest.mark.parametrize("feat", [_param(f) for f in FEATURES])
def test_documented_feature_is_reached_from_serve(
    feat: Feature, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = " ".join(_doc_text(feat.doc).split())
    assert " ".join(feat.quote.split()) in text, f"docs/{feat.doc} no longer says {feat.quote!r}"
    monkeypatch.setenv(KEY_ENV, "sk-from-the-environment")
    asyncio.run(asyncio.wait_for(feat.run(tmp_path), timeout=CASE_TIMEOUT_S))


def test_feature_ids_are_unique() -> None:
    ids = Counter((f.doc, f.id) for f in FEATURES)
    assert [k for k, n in ids.items() if n > 1] == []


# ---- docs name only modules and source files that exist ----------------------------------------------

_MODULE = re.compile(r"(?<![\w./-])xpuflow(?:\.[A-Za-z_]\w*)+")
_PATH = re.compile(r"`((?:src/)?(?:xpuflow/)?[\w.-]+(?:/[\w.-]+)*/[\w.-]*)`")
_FILE_SUFFIXES = (".yaml", ".yml", ".json", ".md", ".log", ".txt", ".spec")


def _module_exists(dotted: str) -> bool:
    """``xpuflow.a.b[.attr]`` names an importable module, optionally followed by one of its attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        relative = Path("src", *parts[:cut])
        if (
            not (ROOT / relative.with_suffix(".py")).is_file()
            and not (ROOT / relative / "__init__.py").is_file()
        ):
            continue
        rest = parts[cut:]
        if not rest:
            return True
        module = importlib.import_module(name)
        return hasattr(module, rest[0])
    return False


def _missing_references(name: str) -> list[str]:
    missing = []
    for number, line in enumerate(_doc_text(name).splitlines(), start=1):
        for match in _MODULE.finditer(line):
            dotted = match.group(0).rstrip(".")
            if dotted.endswith(_FILE_SUFFIXES) or line[match.end() : match.end() + 1] == "[":
                continue  # a file name (xpuflow.yaml) or an extra (xpuflow[oip])
            if not _module_exists(dotted):
                missing.append(f"docs/{name}:{number}: {dotted}")
        for match in _PATH.finditer(line):
            path = match.group(1)
            if "/" not in path or "{" in path or "<" in path or path.startswith(("http", "/")):
                continue
            if not (path.startswith(("src/xpuflow/", "xpuflow/")) or path.endswith(".py")):
                continue
            candidates = [ROOT / path, ROOT / "src" / path, ROOT / "src" / "xpuflow" / path]
            if not any(c.exists() for c in candidates):
                missing.append(f"docs/{name}:{number}: {path}")
    return missing


@pytest.mark.parametrize("name", sorted(p.name for p in DOCS.glob("*.md")))
def test_docs_name_only_modules_and_paths_that_exist(name: str) -> None:
    assert _missing_references(name) == []
