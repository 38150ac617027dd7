"""The remote_openai backend against scripted aiohttp servers and a real llama.cpp server, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest
from aiohttp import web

from xpuflow.backends.base import BatchMode, GenerationParams, ModelConfig
from xpuflow.backends.remote.openai import RemoteOpenAIPlugin, RemoteOpenAISession, RemoteSettings
from xpuflow.backends.remote.openai_wire import parse_retry_after
from xpuflow.clock import FakeClock
from xpuflow.errors import ConfigError, RemoteError, SessionError
from xpuflow.types import Resource, ResourceType

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HI = [{"role": "user", "content": "hi"}]
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
SHORT = GenerationParams(max_tokens=8)


@contextlib.asynccontextmanager
async def serve(routes: Mapping[tuple[str, str], Handler]) -> AsyncIterator[str]:
    """A tiny aiohttp server on 127.0.0.1 with the given (method, path) handlers; yields its root URL."""
    app = web.Application()
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def session_for(url: str, **options: Any) -> RemoteOpenAISession:
    config = ModelConfig("remote-chat", options={"base_url": url, "model": "srv-model", **options})
    return await RemoteOpenAIPlugin().create_session([], config, {})


def chat_body(text: str, finish: str = "stop") -> dict[str, Any]:
    return {
        "model": "srv-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def sse(event: Mapping[str, Any] | str) -> bytes:
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()


def delta(text: str | None, finish: str | None = None) -> dict[str, Any]:
    content = {} if text is None else {"content": text}
    return {"choices": [{"index": 0, "delta": content, "finish_reason": finish}]}


def closed_port() -> int:
    """A loopback port that was free a moment ago: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


# -- options, probe, capability --------------------------------------------------------------------


def test_settings_validate_and_normalise(monkeypatch: pytest.MonkeyPatch) -> None:
    def settings(**options: Any) -> RemoteSettings:
        return RemoteSettings.from_config(ModelConfig("dep", options=options))

    assert settings(base_url="https://api.example.com/v1/").base_url == "https://api.example.com"
    assert settings(base_url="http://h:8000/proxy").base_url == "http://h:8000/proxy"
    assert settings(base_url="http://h").model == "dep"  # defaults to the deployment name
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "options.base_url"),
        ({"base_url": "ftp://h"}, "options.base_url"),
        ({"base_url": "http://"}, "options.base_url"),
        ({"base_url": "http://h", "timeout_s": 0}, "options.timeout_s"),
        ({"base_url": "http://h", "max_connections": 0}, "options.max_connections"),
        ({"base_url": "http://h", "headers": {"X": 1}}, "options.headers"),
        ({"base_url": "http://h", "api_kee": "k"}, "options.api_kee"),
        ({"base_url": "http://h", "api_key": "a", "api_key_env": "B"}, "options.api_key"),
        ({"base_url": "http://h", "api_key_env": "XPUFLOW_TEST_UNSET_KEY"}, "options.api_key_env"),
        ({"base_url": "http://h", "stream_usage": "yes"}, "options.stream_usage"),
    ]
    for bad, field in cases:
        with pytest.raises(ConfigError) as info:
            settings(**bad)
        assert info.value.field == field, bad
    monkeypatch.setenv("XPUFLOW_TEST_KEY", "sekret")
    assert settings(base_url="http://h", api_key_env="XPUFLOW_TEST_KEY").api_key == "sekret"


def test_plugin_probe_capability_and_availability() -> None:
    plugin = RemoteOpenAIPlugin()
    remote = Resource("remote:vllm-a", ResourceType.REMOTE)
    assert plugin.probe([Resource("cpu", ResourceType.CPU), remote]) == [remote]
    assert plugin.probe([]) == []
    assert plugin.availability().available
    config = ModelConfig("dep", max_batch_size=4, options={"base_url": "http://h"})
    assert plugin.required_build_profiles([], config) == []
    capability = plugin.get_capability([], config, {})
    assert capability.max_batch_size == 4
    assert capability.supports_streaming
    assert capability.supports_embeddings
    assert "tensor" in capability.unsupported


# -- requests against a scripted server ------------------------------------------------------------


def test_chat_sends_openai_json_with_auth_and_parses_the_reply() -> None:
    seen: dict[str, Any] = {}

    async def chat(request: web.Request) -> web.Response:
        seen["body"] = await request.json()
        seen["auth"] = request.headers.get("Authorization")
        seen["custom"] = request.headers.get("X-Team")
        return web.json_response(chat_body("Paris"))

    async def run() -> Any:
        async with (
            serve({("POST", "/v1/chat/completions"): chat}) as url,
            await session_for(url + "/v1", api_key="k1", headers={"X-Team": "ml"}) as session,
        ):
            return await session.chat(HI, SHORT)

    reply = asyncio.run(run())
    assert (reply.text, reply.prompt_tokens, reply.completion_tokens, reply.model) == (
        "Paris",
        3,
        2,
        "srv-model",
    )
    assert seen["body"]["model"] == "srv-model"
    assert seen["body"]["messages"] == HI
    assert seen["body"]["max_tokens"] == 8
    assert seen["body"]["temperature"] == 0.0
    assert not seen["body"]["stream"]
    assert seen["auth"] == "Bearer k1"
    assert seen["custom"] == "ml"


def test_completions_and_embeddings() -> None:
    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        text = body["prompt"][::-1]
        return web.json_response({"choices": [{"text": text, "finish_reason": "length"}], "usage": {}})

    async def embeddings(request: web.Request) -> web.Response:
        inputs = (await request.json())["input"]
        data = [{"index": i, "embedding": [float(len(t)), 1.0]} for i, t in enumerate(inputs)][::-1]
        return web.json_response({"data": data})

    async def run() -> tuple[Any, list[list[float]], list[list[list[float]]]]:
        routes = {("POST", "/v1/completions"): completions, ("POST", "/v1/embeddings"): embeddings}
        async with serve(routes) as url, await session_for(url) as session:
            done = await session.generate("abc", SHORT)
            vectors = await session.embed(["a", "bbb"])
            batches = await session.embed_batch([["cc"], ["d", "eeee"]])
            return done, vectors, batches

    done, vectors, batches = asyncio.run(run())
    assert (done.text, done.finish_reason) == ("cba", "length")
    assert vectors == [[1.0, 1.0], [3.0, 1.0]]
    assert batches == [[[2.0, 1.0]], [[1.0, 1.0], [4.0, 1.0]]]


def test_stream_yields_each_delta_before_the_server_sends_the_next() -> None:
    first_seen = asyncio.Event()
    released_by_client: list[bool] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        response = await open_stream(request)
        await response.write(sse(delta(None)) + sse(delta("Hel")))
        # The rest is sent only once the client has yielded the first delta: a buffering client would hang.
        try:
            await asyncio.wait_for(first_seen.wait(), timeout=5.0)
            released_by_client.append(True)
        except asyncio.TimeoutError:
            released_by_client.append(False)
        await response.write(sse(delta("lo")))
        await response.write(sse(delta(None, "length")) + sse("[DONE]"))
        await response.write_eof()
        return response

    async def run() -> list[Any]:
        async with serve({("POST", "/v1/chat/completions"): chat}) as url, await session_for(url) as session:
            chunks = []
            async for chunk in session.stream_chat(HI, SHORT):
                chunks.append(chunk)
                first_seen.set()
            return chunks

    chunks = asyncio.run(run())
    assert released_by_client == [True]
    assert [(c.text, c.finish_reason) for c in chunks] == [("Hel", None), ("lo", None), ("", "length")]


def test_stream_reassembles_events_split_across_reads() -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        response = await open_stream(request)
        payload = (
            b": ping\r\n\r\n"
            + sse({"choices": [{"text": "caf\u00e9"}]}).replace(b"\n", b"\r\n")
            + sse("[DONE]")
        )
        for index in range(len(payload)):  # one byte per write: splits CRLF and the UTF-8 of "é"
            await response.write(payload[index : index + 1])
        await response.write_eof()
        return response

    async def run() -> list[Any]:
        async with (
            serve({("POST", "/v1/completions"): completions}) as url,
            await session_for(url) as session,
        ):
            return [c async for c in session.stream_generate("x", SHORT)]

    chunks = asyncio.run(run())
    assert [(c.text, c.finish_reason) for c in chunks] == [("café", None), ("", "stop")]


def test_stream_from_a_server_that_ignores_stream_true() -> None:
    async def chat(request: web.Request) -> web.Response:
        return web.json_response(chat_body("whole", "length"))

    async def run() -> list[Any]:
        async with serve({("POST", "/v1/chat/completions"): chat}) as url, await session_for(url) as session:
            return [c async for c in session.stream_chat(HI, SHORT)]

    assert [(c.text, c.finish_reason) for c in asyncio.run(run())] == [("whole", "length")]


def test_error_event_inside_a_stream_is_a_remote_error() -> None:
    async def chat(request: web.Request) -> web.StreamResponse:
        response = await open_stream(request)
        await response.write(sse(delta("a")) + sse({"error": {"message": "engine died", "code": 500}}))
        await response.write_eof()
        return response

    async def run() -> list[str]:
        got = []
        async with serve({("POST", "/v1/chat/completions"): chat}) as url, await session_for(url) as session:
            async for chunk in session.stream_chat(HI, SHORT):
                got.append(chunk.text)
        return got

    with pytest.raises(RemoteError, match="engine died") as info:
        asyncio.run(run())
    assert info.value.retryable
    assert info.value.status == 500


# -- error classification --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "retryable", "message"),
    [
        (429, {"error": {"message": "Rate limit reached"}}, True, "Rate limit reached.*retry later"),
        (500, {"error": {"message": "CUDA out of memory"}}, True, "CUDA out of memory"),
        (503, "upstream unavailable", True, "upstream unavailable"),
        (
            404,
            {"error": {"message": "The model `nope` does not exist.", "code": "model_not_found"}},
            False,
            "does not exist.*check options base_url and model",
        ),
        (401, {"error": {"message": "Invalid API key"}}, False, "Invalid API key.*api_key"),
        (400, {"detail": "max_tokens too large"}, False, "max_tokens too large"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_http_errors_are_classified(
    status: int, body: Any, retryable: bool, message: str, streaming: bool
) -> None:
    async def chat(request: web.Request) -> web.Response:
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)

    async def run() -> None:
        async with serve({("POST", "/v1/chat/completions"): chat}) as url, await session_for(url) as session:
            if streaming:
                async for _chunk in session.stream_chat(HI, SHORT):
                    pass
            else:
                await session.chat(HI, SHORT)

    with pytest.raises(RemoteError, match=message) as info:
        asyncio.run(run())
    assert info.value.status == status
    assert info.value.retryable is retryable


@pytest.mark.parametrize("streaming", [False, True])
def test_a_rate_limit_carries_the_servers_retry_after(streaming: bool) -> None:
    async def chat(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "7"}
        )

    async def run() -> None:
        async with serve({("POST", "/v1/chat/completions"): chat}) as url, await session_for(url) as session:
            if streaming:
                async for _chunk in session.stream_chat(HI, SHORT):
                    pass
            else:
                await session.chat(HI, SHORT)

    with pytest.raises(RemoteError, match="slow down") as info:
        asyncio.run(run())
    assert (info.value.status, info.value.retryable, info.value.retry_after_s) == (429, True, 7.0)


def test_retry_after_reads_seconds_and_http_dates_and_ignores_junk() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412500.0) == 10.0
    for junk in (None, "", "soon", "nan", "inf", "Wed, 99 Foo 2015"):
        assert parse_retry_after(junk) is None


@pytest.mark.parametrize("ask", [False, True])
def test_stream_usage_asks_for_the_usage_event_and_passes_it_on(ask: bool) -> None:
    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        response = await open_stream(request)
        await response.write(sse(delta("Hi")))
        await response.write(sse(delta(None, "stop")))
        if body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
            await response.write(sse({"choices": [], "usage": usage}))
        await response.write(sse("[DONE]"))
        return response

    async def run() -> list[Any]:
        routes = {("POST", "/v1/chat/completions"): chat}
        async with serve(routes) as url, await session_for(url, stream_usage=ask) as session:
            return [c async for c in session.stream_chat(HI, SHORT)]

    chunks = asyncio.run(run())
    assert "".join(c.text for c in chunks) == "Hi"
    assert ("stream_options" in seen[0]) is ask
    counted = [c for c in chunks if c.prompt_tokens is not None]
    assert [(c.prompt_tokens, c.completion_tokens) for c in counted] == ([(9, 1)] if ask else [])


def test_a_stalled_server_times_out_as_retryable() -> None:
    release = asyncio.Event()

    async def chat(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), timeout=10.0)
        return web.json_response(chat_body("late"))

    async def run() -> None:
        async with serve({("POST", "/v1/chat/completions"): chat}) as url:
            try:
                async with await session_for(url, timeout_s=0.3) as session:
                    await session.chat(HI, SHORT)
            finally:
                release.set()

    start = time.monotonic()
    with pytest.raises(RemoteError, match="timed out") as info:
        asyncio.run(run())
    assert info.value.retryable
    assert info.value.status is None
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("sends_headers", [True, False])
def test_a_stream_that_stalls_ends_after_first_byte_timeout_not_the_whole_timeout(
    sends_headers: bool,
) -> None:
    release = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        if sends_headers:
            response = await open_stream(request)
            await response.write(sse(delta("one")))
        await asyncio.wait_for(release.wait(), timeout=10.0)
        return web.json_response(chat_body("late"))

    async def run() -> list[str]:
        seen: list[str] = []
        async with serve({("POST", "/v1/chat/completions"): chat}) as url:
            try:
                async with await session_for(url, first_byte_timeout_s=0.3) as session:
                    assert session.settings.timeout_s == 120.0
                    async for chunk in session.stream_chat(HI, SHORT):
                        seen.append(chunk.text)
            finally:
                release.set()
        return seen

    start = time.monotonic()
    with pytest.raises(RemoteError, match=r"first_byte_timeout_s 0\.3") as info:
        asyncio.run(run())
    assert info.value.retryable
    assert time.monotonic() - start < 3.0


def test_timeouts_have_short_connect_and_first_byte_defaults() -> None:
    settings = RemoteSettings.from_config(ModelConfig("dep", options={"base_url": "http://h"}))
    assert (settings.connect_timeout_s, settings.first_byte_timeout_s, settings.timeout_s) == (
        2.0,
        10.0,
        120.0,
    )
    assert (settings.health_timeout_s, settings.health_interval_s) == (1.0, 1.0)
    off = RemoteSettings.from_config(
        ModelConfig("dep", options={"base_url": "http://h", "health_interval_s": 0})
    )
    assert off.health_interval_s == 0.0
    with pytest.raises(ConfigError) as info:
        RemoteSettings.from_config(
            ModelConfig("dep", options={"base_url": "http://h", "health_interval_s": -1})
        )
    assert info.value.field == "options.health_interval_s"


def test_connection_refused_is_retryable_and_unhealthy() -> None:
    url = f"http://127.0.0.1:{closed_port()}"

    async def run() -> bool:
        session = await session_for(url, connect_timeout_s=2.0)
        async with session:
            healthy = await session.health()
            with pytest.raises(RemoteError, match=r"could not connect.*is the server running") as info:
                await session.chat(HI, SHORT)
            assert info.value.retryable
            assert info.value.status is None
            metrics = session.metrics()
            assert (metrics.failures, metrics.consecutive_failures, metrics.successes) == (1, 1, 0)
            return healthy

    assert asyncio.run(run()) is False


def test_malformed_reply_is_not_retryable() -> None:
    async def chat(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    async def run() -> None:
        async with serve({("POST", "/v1/chat/completions"): chat}) as url, await session_for(url) as session:
            await session.chat(HI, SHORT)

    with pytest.raises(RemoteError, match="malformed") as info:
        asyncio.run(run())
    assert not info.value.retryable


# -- health, metrics, batches, lifetime ------------------------------------------------------------


def test_health_prefers_health_and_falls_back_to_models() -> None:
    hits: list[str] = []
    health_status = [200]

    async def health(request: web.Request) -> web.Response:
        hits.append("/health")
        return web.Response(status=health_status[0])

    async def models(request: web.Request) -> web.Response:
        hits.append("/v1/models")
        return web.json_response({"data": [{"id": "srv-model"}]})

    async def run() -> list[bool]:
        results = []
        async with serve({("GET", "/health"): health}) as url:
            session = await session_for(url)
            async with session:
                results.append(await session.health())
                health_status[0] = 503
                results.append(await session.health())
        async with serve({("GET", "/v1/models"): models}) as url:
            session = await session_for(url)
            async with session:
                results += [await session.health(), await session.health()]
        return results

    assert asyncio.run(run()) == [True, False, True, True]
    # the second server has no /health: asked once, then /v1/models is remembered
    assert hits == ["/health", "/health", "/v1/models", "/v1/models"]


def test_metrics_track_latency_ema_and_failures() -> None:
    clock = FakeClock()
    plan = [(0.5, 200), (1.5, 200), (0.0, 500), (1.0, 200)]

    async def chat(request: web.Request) -> web.Response:
        seconds, status = plan.pop(0)
        clock.advance(seconds)
        return web.json_response(
            chat_body("x") if status == 200 else {"error": {"message": "boom"}}, status=status
        )

    async def run() -> list[Any]:
        snapshots = []
        async with serve({("POST", "/v1/chat/completions"): chat}) as url:
            settings = RemoteSettings.from_config(ModelConfig("m", options={"base_url": url}))
            session = RemoteOpenAISession("m", [], settings, clock=clock)
            async with session:
                assert session.metrics().latency_ema_s is None
                for _ in range(4):
                    with contextlib.suppress(RemoteError):
                        await session.chat(HI, SHORT)
                    snapshots.append(session.metrics())
        return snapshots

    first, second, failed, recovered = asyncio.run(run())
    assert first.latency_ema_s == pytest.approx(0.5)
    assert second.latency_ema_s == pytest.approx(0.2 * 1.5 + 0.8 * 0.5)
    assert (failed.failures, failed.consecutive_failures) == (1, 1)
    assert failed.latency_ema_s == second.latency_ema_s
    assert "boom" in (failed.last_error or "")
    assert (recovered.successes, recovered.failures, recovered.consecutive_failures) == (3, 1, 0)


def test_batches_are_concurrent_requests_bounded_by_max_connections() -> None:
    in_flight = [0]
    most = [0]

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        await asyncio.sleep(0.05)
        in_flight[0] -= 1
        return web.json_response(chat_body(body["messages"][0]["content"].upper()))

    async def run() -> list[str]:
        conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
        async with (
            serve({("POST", "/v1/chat/completions"): chat}) as url,
            await session_for(url, max_connections=2) as session,
        ):
            assert session.batch_mode is BatchMode.CONTINUOUS  # the server batches; workers send at once
            assert session.max_in_flight == 2
            return [c.text for c in await session.chat_batch(conversations, SHORT)]

    assert asyncio.run(run()) == [f"Q{i}" for i in range(6)]
    assert most[0] == 2


def test_a_failed_batch_item_raises_after_the_others_finish() -> None:
    finished: list[str] = []

    async def completions(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        if prompt == "bad":
            return web.json_response({"error": {"message": "bad prompt"}}, status=400)
        await asyncio.sleep(0.05)
        finished.append(prompt)
        return web.json_response({"choices": [{"text": prompt, "finish_reason": "stop"}]})

    async def run() -> None:
        async with (
            serve({("POST", "/v1/completions"): completions}) as url,
            await session_for(url) as session,
        ):
            await session.generate_batch(["a", "bad", "c"], SHORT)

    with pytest.raises(RemoteError, match="bad prompt"):
        asyncio.run(run())
    assert sorted(finished) == ["a", "c"]


def test_closed_session_refuses_requests() -> None:
    async def run() -> None:
        session = await session_for("http://127.0.0.1:9")
        await session.close()
        await session.close()
        await session.chat(HI, SHORT)

    with pytest.raises(SessionError, match="closed"):
        asyncio.run(run())


def test_a_session_used_from_a_second_event_loop_says_so() -> None:
    """A session belongs to the loop of its first use: from another it refuses with that reason (not a
    transport error), on the lean client's pooled connections as on aiohttp's."""
    import threading

    async def chat(request: web.Request) -> web.Response:
        return web.json_response(chat_body("Paris"))

    ready: list[str] = []
    stop = threading.Event()

    async def host() -> None:  # the server lives on a loop of its own, across the client's two loops
        async with serve({("POST", "/v1/chat/completions"): chat}) as url:
            ready.append(url)
            while not stop.is_set():
                await asyncio.sleep(0.02)

    server = threading.Thread(target=asyncio.run, args=(host(),), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 10
        while not ready and time.monotonic() < deadline:
            time.sleep(0.01)
        loop = asyncio.new_event_loop()
        try:
            session = loop.run_until_complete(_first_use(ready[0]))
            with pytest.raises(SessionError, match="bound to the event loop that first used it"):
                asyncio.run(session.chat(HI, SHORT))
            loop.run_until_complete(session.close())
        finally:
            loop.close()
    finally:
        stop.set()
        server.join(10)


async def _first_use(url: str) -> RemoteOpenAISession:
    session = await session_for(url)
    assert (await session.chat(HI, SHORT)).text == "Paris"
    return session


# -- a real llama.cpp server -----------------------------------------------------------------------


async def real_session(url: str, model: str) -> RemoteOpenAISession:
    config = ModelConfig("chat-remote", options={"base_url": url, "model": model, "timeout_s": 60})
    return await RemoteOpenAIPlugin().create_session([], config, {})


@pytest.mark.slow
@pytest.mark.e2e
def test_real_server_chat_stream_completion_and_health(
    llama_server_url: str, llama_server_model: str
) -> None:
    async def run() -> tuple[Any, list[Any], Any, bool]:
        session = await real_session(llama_server_url, llama_server_model)
        async with session:
            healthy = await session.health()
            reply = await session.chat(PARIS, GenerationParams(max_tokens=16))
            chunks = [c async for c in session.stream_chat(PARIS, GenerationParams(max_tokens=16))]
            done = await session.generate("Once upon a time", GenerationParams(max_tokens=4))
            return reply, chunks, done, healthy

    reply, chunks, done, healthy = asyncio.run(run())
    assert healthy
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop"
    assert reply.completion_tokens > 0
    before_end = [c for c in chunks if c.finish_reason is None and c.text]
    assert len(before_end) >= 2, "the stream must arrive in pieces, not as one buffered reply"
    assert chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == reply.text
    assert done.finish_reason == "length"
    assert done.completion_tokens == 4
    assert done.text


@pytest.mark.slow
@pytest.mark.e2e
def test_real_server_batch_and_not_found(llama_server_url: str, llama_server_model: str) -> None:
    async def run() -> list[str]:
        session = await real_session(llama_server_url, llama_server_model)
        async with session:
            replies = await session.chat_batch([PARIS, HI], GenerationParams(max_tokens=4))
        assert session.metrics().successes == 2
        # llama.cpp's server answers any model name, so a wrong path gives the 404 here
        wrong = await real_session(llama_server_url + "/nope", llama_server_model)
        async with wrong:
            with pytest.raises(RemoteError, match="404") as info:
                await wrong.chat(HI, SHORT)
            assert not info.value.retryable
            assert info.value.status == 404
            assert wrong.metrics().failures == 1
        return [r.text for r in replies]

    texts = asyncio.run(run())
    assert len(texts) == 2
    assert all(texts)
