"""The ``remote_openai`` backend: any OpenAI-compatible server (vLLM, TGI, SGLang, llama.cpp, OpenAI).

A session holds one pooled aiohttp client (created lazily inside the running event loop) and speaks
``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``; its requests and streams to an
``http://`` server take the lean HTTP/1.1 client of ``backends.remote.http1`` instead (a third of the
gateway's CPU per request went to aiohttp's request machinery). Streams pass the server's SSE
events through as they arrive. Failures become ``RemoteError`` with ``retryable`` set for connect
errors, timeouts, 408, 429 and 5xx, so the router knows when another try may succeed::

    config = ModelConfig(model_id="chat-big", options={"base_url": "http://10.0.0.5:8000",
                                                       "model": "Qwen/Qwen2.5-7B-Instruct"})
    session = await RemoteOpenAIPlugin().create_session([], config, artifacts={})
    async with session:
        reply = await session.chat([{"role": "user", "content": "Hi"}], GenerationParams(max_tokens=16))
        healthy = await session.health()        # GET /health or /v1/models: costs no tokens

The server batches by itself (continuous batching in vLLM, TGI, SGLang), so the session is
``BatchMode.CONTINUOUS``: a worker sends each request at once, up to ``max_in_flight`` (by default
``max_connections``) of them, instead of forming batches. The batch forms still work: they send their
requests concurrently, at most ``max_connections`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

from xpuflow import jsonio
from xpuflow.artifacts.profile import BuildArtifact, BuildProfile
from xpuflow.backends.base import (
    Availability,
    BatchMode,
    ChatMessage,
    Completion,
    GenerationParams,
    ModelConfig,
    Session,
    StreamChunk,
)
from xpuflow.backends.remote import http1
from xpuflow.backends.remote.http1 import Http1Pool
from xpuflow.backends.remote.http_transport import transport_error
from xpuflow.backends.remote.openai_wire import (
    _MAPPING,
    DONE,
    SSEDecoder,
    chat_request,
    completion_from_response,
    completion_request,
    embedding_request,
    embeddings_from_response,
    error_message,
    parse_retry_after,
    stream_chunk,
)
from xpuflow.clock import Clock, SystemClock
from xpuflow.errors import ConfigError, RemoteError, SessionError
from xpuflow.types import Capability, OptimizedFor, Resource, ResourceType

__all__ = [
    "REMOTE_OPTIONS",
    "RemoteMetrics",
    "RemoteOpenAIPlugin",
    "RemoteOpenAISession",
    "RemoteSettings",
    "is_retryable_status",
]

T = TypeVar("T")

#: option name -> what it does; anything else in ``ModelConfig.options`` is a ConfigError.
REMOTE_OPTIONS: dict[str, str] = {
    "base_url": "server root, http:// or https:// (required); a trailing /v1 is accepted",
    "model": "the model name the server knows (default: the deployment name)",
    "api_key": "bearer token sent as 'Authorization: Bearer ...'",
    "api_key_env": "name of an environment variable holding the bearer token, read at session creation",
    "timeout_s": "total seconds for one request, streams included (default 120)",
    "connect_timeout_s": "seconds to open a TCP/TLS connection (default 2)",
    "first_byte_timeout_s": "seconds a stream may wait for the server's first byte, and then between "
    "two of its reads (default 10)",
    "health_timeout_s": "total seconds for one health check (default 1)",
    "health_interval_s": "seconds between active health checks while they pass; 0 turns them off (default 1)",
    "max_connections": "pooled connections, and so concurrent requests, to the server (default 64)",
    "headers": "extra HTTP headers sent with every request (a mapping of strings)",
    "stream_usage": "ask for token counts on streams (stream_options.include_usage; default false: "
    "some servers refuse the field)",
    "server_metrics": "read the server's own load (requests waiting and running, KV-cache use) from its "
    "Prometheus /metrics at each health check, for worker choice (vLLM, SGLang, TGI, llama.cpp's server; "
    "default true; a server without /metrics is asked once)",
}

#: Weight of the newest sample in the latency EMA.
LATENCY_EMA_ALPHA = 0.2
_SSE_ACCEPT = {"Accept": "text/event-stream"}

_INSTALL_HINT = "pip install aiohttp"


_StreamSource = tuple[int, Mapping[str, str], Callable[[], Awaitable[bytes]]]
"""A streamed answer: its status, its headers (read with lower-case names) and a read of the bytes that
arrived since the last one (``b""`` at the end)."""


async def _read_all(read: Callable[[], Awaitable[bytes]]) -> bytes:
    parts = []
    while data := await read():
        parts.append(data)
    return b"".join(parts)


def _decompress(raw: bytes, encoding: str) -> bytes:
    """A body the server compressed although nobody asked (gzip or deflate); ValueError otherwise."""
    import zlib

    if encoding in ("gzip", "x-gzip"):
        return zlib.decompress(raw, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        try:
            return zlib.decompress(raw)
        except zlib.error:
            return zlib.decompress(raw, -zlib.MAX_WBITS)  # raw deflate, as some servers send it
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


def is_retryable_status(status: int) -> bool:
    """Whether another try may succeed after this HTTP status: timeouts, rate limits, server errors."""
    return status in (408, 429) or status >= 500


def _positive_number(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(
            f"options.{name} must be a positive number of seconds, got {value!r}", field=f"options.{name}"
        )
    return float(value)


def _seconds_or_off(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(
            f"options.{name} must be a number of seconds >= 0 (0 turns it off), got {value!r}",
            field=f"options.{name}",
        )
    return float(value)


def _base_url(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(
            "the remote_openai backend needs options.base_url, e.g. http://127.0.0.1:8000",
            field="options.base_url",
        )
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"options.base_url must be an http:// or https:// URL with a host, got {value!r}",
            field="options.base_url",
        )
    if parts.query or parts.fragment:
        raise ConfigError(
            f"options.base_url must not carry a query or fragment: {value!r}", field="options.base_url"
        )
    root = value.rstrip("/")
    # OpenAI clients take ".../v1" as their base URL; accept it so the same value works in both places.
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _api_key(options: Mapping[str, Any]) -> str | None:
    if options.get("api_key") and options.get("api_key_env"):
        raise ConfigError("set only one of options.api_key and options.api_key_env", field="options.api_key")
    env_name = options.get("api_key_env")
    if env_name:
        key = os.environ.get(str(env_name))
        if not key:
            raise ConfigError(
                f"environment variable {env_name} (options.api_key_env) is not set; "
                "export it or use options.api_key",
                field="options.api_key_env",
            )
        return key
    key = options.get("api_key")
    return str(key) if key else None


@dataclass(frozen=True)
class RemoteSettings:
    """The validated options of one remote deployment (see ``REMOTE_OPTIONS``)."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 10.0
    health_timeout_s: float = 1.0
    health_interval_s: float = 1.0
    max_connections: int = 64
    headers: Mapping[str, str] = field(default_factory=dict)
    stream_usage: bool = False
    server_metrics: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))

    @classmethod
    def from_config(cls, config: ModelConfig) -> RemoteSettings:
        """Validate ``config.options``; raises ConfigError naming the option and the fix."""
        options = config.options
        unknown = sorted(set(options) - set(REMOTE_OPTIONS))
        if unknown:
            raise ConfigError(
                f"unknown remote_openai option(s) {', '.join(unknown)}; valid: {', '.join(REMOTE_OPTIONS)}",
                field=f"options.{unknown[0]}",
            )
        max_connections = config.int_option("max_connections", 64)
        headers = options.get("headers") or {}
        if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ConfigError(
                "options.headers must map header names to string values", field="options.headers"
            )
        return cls(
            base_url=_base_url(options.get("base_url")),
            model=str(options.get("model") or config.model_id),
            api_key=_api_key(options),
            timeout_s=_positive_number(options, "timeout_s", 120.0),
            connect_timeout_s=_positive_number(options, "connect_timeout_s", 2.0),
            first_byte_timeout_s=_positive_number(options, "first_byte_timeout_s", 10.0),
            health_timeout_s=_positive_number(options, "health_timeout_s", 1.0),
            health_interval_s=_seconds_or_off(options, "health_interval_s", 1.0),
            max_connections=max_connections,
            headers=headers,
            stream_usage=config.bool_option("stream_usage", False),
            server_metrics=config.bool_option("server_metrics", True),
        )


@dataclass(frozen=True)
class RemoteMetrics:
    """What a session has seen of its server: the latency EMA of successful requests (seconds; None
    before the first), how many succeeded, and failures (in total and in a row)."""

    latency_ema_s: float | None
    successes: int
    failures: int
    consecutive_failures: int
    last_error: str | None


class RemoteOpenAISession(Session):
    """One OpenAI-compatible server. Use it from one event loop; close it to release its connections."""

    batch_mode = BatchMode.CONTINUOUS

    def __init__(
        self,
        model_id: str,
        resources: Sequence[Resource],
        settings: RemoteSettings,
        *,
        max_batch_size: int = 8,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(model_id, resources)
        self.settings = settings
        self.max_batch_size = max_batch_size
        self._clock = clock or SystemClock()
        self._http: Any = None  # aiohttp.ClientSession, created in the loop that first uses it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._health_path: str | None = None
        self._latency_ema_s: float | None = None
        self._successes = 0
        self._failures = 0
        self._consecutive_failures = 0
        self._last_error: str | None = None
        self._targets: dict[str, Any] = {}
        self._stream_timeout: Any = None  # aiohttp.ClientTimeout of streams, made on first use
        self._http1: Http1Pool | bool | None = None  # None: not decided yet; False: aiohttp only
        self._path_prefix = ""

    @property
    def health_interval_s(self) -> float:
        """Seconds between active health checks (0: none); the orchestrator runs them."""
        return self.settings.health_interval_s

    @property
    def health_timeout_s(self) -> float:
        """The most one ``health()`` call takes."""
        return self.settings.health_timeout_s

    @property
    def max_in_flight(self) -> int:
        """Requests a worker may have running here at once: one per pooled connection."""
        return self.settings.max_connections

    # -- connection -------------------------------------------------------------------------------

    def _client(self) -> Any:
        if self.closed:
            raise SessionError(f"remote session for model '{self.model_id}' is closed; create a new one")
        loop = self._check_loop()
        if self._http is None:
            import aiohttp

            headers = self._headers()
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.settings.max_connections),
                timeout=aiohttp.ClientTimeout(
                    total=self.settings.timeout_s, sock_connect=self.settings.connect_timeout_s
                ),
                headers=headers,
            )
            self._loop = loop
        return self._http

    def _check_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop; SessionError when it is not the one this session was first used on."""
        loop = asyncio.get_running_loop()
        if self._http is not None and self._loop is not loop:
            raise SessionError(
                f"remote session for model '{self.model_id}' is bound to the event loop that first used it"
            )
        return loop

    def _headers(self) -> dict[str, str]:
        """The headers of every request: ``Accept``, the configured ones, the bearer token."""
        headers = {"Accept": "application/json", **self.settings.headers}
        if self.settings.api_key:
            headers.setdefault("Authorization", f"Bearer {self.settings.api_key}")
        return headers

    def _url(self, path: str) -> str:
        return self.settings.base_url + path

    def _status_error(
        self, method: str, path: str, status: int, body: str, retry_after: str | None = None
    ) -> RemoteError:
        hint = {
            401: "; check options api_key or api_key_env",
            403: "; check options api_key or api_key_env",
            404: f"; check options base_url and model ('{self.settings.model}')",
            429: "; the server is rate limiting, retry later",
        }.get(status, "")
        return RemoteError(
            f"{self.settings.base_url} answered {status} to {method} {path}: {error_message(body)}{hint}",
            status=status,
            retryable=is_retryable_status(status),
            retry_after_s=parse_retry_after(retry_after),
        )

    def _transport_error(self, method: str, path: str, exc: Exception) -> RemoteError:
        settings = self.settings
        return transport_error(
            f"{method} {self._url(path)}",
            exc,
            f"timeout_s {settings.timeout_s:g}, connect_timeout_s {settings.connect_timeout_s:g}, "
            f"first_byte_timeout_s {settings.first_byte_timeout_s:g} for streams",
        )

    # -- bookkeeping ------------------------------------------------------------------------------

    async def _observe(self, work: Awaitable[T]) -> T:
        start = self._clock.monotonic()
        try:
            result = await work
        except RemoteError as exc:
            self._record_failure(exc)
            raise
        self._record_success(self._clock.monotonic() - start)
        return result

    def _record_failure(self, error: RemoteError) -> None:
        self._failures += 1
        self._consecutive_failures += 1
        self._last_error = str(error)

    def _record_success(self, latency_s: float) -> None:
        self._successes += 1
        self._consecutive_failures = 0
        previous = self._latency_ema_s
        self._latency_ema_s = (
            latency_s
            if previous is None
            else LATENCY_EMA_ALPHA * latency_s + (1 - LATENCY_EMA_ALPHA) * previous
        )

    def metrics(self) -> RemoteMetrics:
        """A snapshot of latency EMA and failure counts (health probes are not counted)."""
        return RemoteMetrics(
            self._latency_ema_s,
            self._successes,
            self._failures,
            self._consecutive_failures,
            self._last_error,
        )

    # -- requests ---------------------------------------------------------------------------------

    def _target(self, path: str) -> Any:
        """The URL of ``path`` as aiohttp's ``yarl.URL``, parsed once per path instead of per request."""
        target = self._targets.get(path)
        if target is None:
            from yarl import URL

            target = self._targets[path] = URL(self._url(path))
        return target

    def _lean(self) -> Http1Pool | None:
        """The lean HTTP/1.1 pool (``backends.remote.http1``) for this session's JSON POSTs, made on
        first use; None where it does not apply (https, credentials in the URL, a requested content
        encoding, no httptools): those go through aiohttp."""
        pool = self._http1
        if pool.__class__ is Http1Pool and not self.closed:
            # made on the loop of the session's first use; a use from another loop fails on the pool's
            # connections, and the error path's _check_loop says why (asking for the running loop on
            # every request is a getpid system call on Python 3.11)
            return pool
        self._client()  # the closed and event-loop checks (and the aiohttp session streams use)
        if self._http1 is None:
            parts = urlsplit(self.settings.base_url)
            wanted = {name.lower() for name in self.settings.headers}
            if (
                parts.scheme != "http"
                or parts.username is not None
                or parts.password is not None
                or "accept-encoding" in wanted
                or "transfer-encoding" in wanted
                or not http1.available()
            ):
                self._http1 = False
            else:
                self._http1 = Http1Pool(
                    parts.hostname or "",
                    parts.port or 80,
                    limit=self.settings.max_connections,
                    connect_timeout_s=self.settings.connect_timeout_s,
                    headers=self._headers(),
                )
                self._path_prefix = parts.path.rstrip("/")
        return self._http1 if isinstance(self._http1, Http1Pool) else None

    async def _post_json(self, path: str, body: Mapping[str, Any]) -> Any:
        lean = self._lean()
        if lean is None:
            return await self._post_json_aiohttp(path, body)
        try:
            answer = await lean.post(
                self._path_prefix + path, jsonio.dumps(body), timeout_s=self.settings.timeout_s
            )
        except Exception as exc:
            raise self._lean_error(path, exc) from exc
        return self._lean_json(path, *answer)

    def _lean_error(self, path: str, exc: Exception) -> Exception:
        """What a failed lean POST raises: a transport error (SessionError from another event loop)."""
        self._check_loop()  # used from another event loop: that error, not a transport one
        return self._transport_error("POST", path, exc)

    def _lean_json(self, path: str, status: int, headers: Mapping[str, str], raw: bytes) -> Any:
        """The JSON of a lean POST's answer; RemoteError for an error status or a malformed answer."""
        try:
            if status >= 400:
                text = raw.decode("utf-8", "replace")
                raise self._status_error("POST", path, status, text, headers.get("retry-after"))
            encoding = headers.get("content-encoding", "identity").lower()
            if encoding not in ("identity", ""):
                raw = _decompress(raw, encoding)
            return jsonio.loads(raw)  # JSON is UTF-8 (RFC 8259); loads reads the bytes as they are
        except RemoteError:
            raise
        except Exception as exc:
            raise self._transport_error("POST", path, exc) from exc

    async def _post_json_aiohttp(self, path: str, body: Mapping[str, Any]) -> Any:
        http = self._client()
        try:
            async with http.post(self._target(path), json=body) as response:
                raw = await response.read()
                if response.status >= 400:
                    text = raw.decode(response.charset or "utf-8", "replace")
                    raise self._status_error(
                        "POST", path, response.status, text, response.headers.get("Retry-After")
                    )
                return jsonio.loads(raw)  # JSON is UTF-8 (RFC 8259); loads reads the bytes as they are
        except RemoteError:
            raise
        except Exception as exc:
            raise self._transport_error("POST", path, exc) from exc

    async def _completion(self, path: str, body: Mapping[str, Any]) -> Completion:
        # _observe's bookkeeping and _post_json's lean way inline: one coroutine per request, not four
        start = self._clock.monotonic()
        lean = self._lean()
        try:
            if lean is None:
                data = await self._post_json_aiohttp(path, body)
            else:
                try:
                    answer = await lean.post(
                        self._path_prefix + path, jsonio.dumps(body), timeout_s=self.settings.timeout_s
                    )
                except Exception as exc:
                    raise self._lean_error(path, exc) from exc
                data = self._lean_json(path, *answer)
            try:
                completion = completion_from_response(data, default_model=self.settings.model)
            except (ValueError, TypeError, AttributeError) as exc:
                raise self._transport_error("POST", path, ValueError(str(exc))) from exc
        except RemoteError as exc:
            self._record_failure(exc)
            raise
        self._record_success(self._clock.monotonic() - start)
        return completion

    def generate(self, prompt: str, params: GenerationParams) -> Coroutine[Any, Any, Completion]:
        # the request's coroutine itself, with none around it
        return self._completion("/v1/completions", completion_request(self.settings.model, prompt, params))

    def chat(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> Coroutine[Any, Any, Completion]:
        return self._completion("/v1/chat/completions", chat_request(self.settings.model, messages, params))

    def stream_generate(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        body = completion_request(self.settings.model, prompt, params, stream=True)
        return self._stream("/v1/completions", self._with_usage(body))

    def stream_chat(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[StreamChunk]:
        body = chat_request(self.settings.model, messages, params, stream=True)
        return self._stream("/v1/chat/completions", self._with_usage(body))

    def _with_usage(self, body: dict[str, Any]) -> dict[str, Any]:
        """The stream request, asking for the usage event when ``options.stream_usage`` is set."""
        if self.settings.stream_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    async def _stream(self, path: str, body: Mapping[str, Any]) -> AsyncIterator[StreamChunk]:
        """Yield each delta as its SSE event arrives; nothing is buffered beyond one partial line."""
        lean = self._lean()
        start = self._clock.monotonic()
        finished = False
        try:
            source = self._lean_stream(lean, path, body) if lean else self._aiohttp_stream(path, body)
            async with source as (status, headers, read):
                if status >= 400:
                    text = (await _read_all(read)).decode("utf-8", "replace")
                    raise self._status_error("POST", path, status, text, headers.get("retry-after"))
                if "text/event-stream" not in headers.get("content-type", ""):
                    # A server that ignores "stream": true answers with one JSON body; pass it on whole.
                    completion = completion_from_response(jsonio.loads(await _read_all(read)))
                    yield StreamChunk(completion.text, completion.finish_reason)
                    finished = True
                else:
                    decoder = SSEDecoder()
                    done = False
                    while data := await read():
                        for payload in decoder.feed(data):
                            if done or payload == DONE:
                                # Read on to the end so the pooled connection can be reused.
                                done = True
                                continue
                            chunk = self._event_chunk(path, payload)
                            if chunk is not None:
                                finished = finished or chunk.finish_reason is not None
                                yield chunk
        except RemoteError as exc:
            self._record_failure(exc)
            raise
        except Exception as exc:
            self._check_loop()  # used from another event loop: that error, not a transport one
            error = self._transport_error("POST", path, exc)
            self._record_failure(error)
            raise error from exc
        self._record_success(self._clock.monotonic() - start)
        if not finished:
            yield StreamChunk("", "stop")

    @contextlib.asynccontextmanager
    async def _aiohttp_stream(self, path: str, body: Mapping[str, Any]) -> AsyncIterator[_StreamSource]:
        """A streamed POST through aiohttp: its status, headers and a read of the next body bytes."""
        import aiohttp

        http = self._client()
        timeout = self._stream_timeout
        if timeout is None:
            settings = self.settings
            # a hung server holds a stream no longer than first_byte_timeout_s, not the whole timeout_s
            timeout = self._stream_timeout = aiohttp.ClientTimeout(
                total=settings.timeout_s,
                sock_connect=settings.connect_timeout_s,
                sock_read=settings.first_byte_timeout_s,
            )
        async with http.post(self._target(path), json=body, headers=_SSE_ACCEPT, timeout=timeout) as response:
            yield response.status, response.headers, response.content.readany

    @contextlib.asynccontextmanager
    async def _lean_stream(
        self, lean: Http1Pool, path: str, body: Mapping[str, Any]
    ) -> AsyncIterator[_StreamSource]:
        """The same through the lean HTTP/1.1 client, with the same timeouts."""
        settings = self.settings
        async with lean.stream(
            self._path_prefix + path,
            jsonio.dumps(body),
            accept="text/event-stream",
            read_timeout_s=settings.first_byte_timeout_s,
            total_timeout_s=settings.timeout_s,
        ) as answer:
            read = answer.read
            encoding = answer.headers.get("content-encoding", "identity").lower()
            if encoding not in ("identity", ""):  # compressed although nobody asked: whole, then
                whole = [_decompress(await answer.read_all(), encoding)]

                async def read() -> bytes:
                    return whole.pop() if whole else b""

            yield answer.status, answer.headers, read

    def _event_chunk(self, path: str, payload: str) -> StreamChunk | None:
        event = jsonio.loads(payload)
        if isinstance(event, _MAPPING) and event.get("error"):
            # vLLM and others report failures inside an open stream as an error event.
            error = event["error"]
            code = error.get("code") if isinstance(error, _MAPPING) else None
            status = code if isinstance(code, int) else None
            raise RemoteError(
                f"{self.settings.base_url} failed POST {path} mid-stream: {error_message(payload)}",
                status=status,
                retryable=status is None or is_retryable_status(status),
            )
        return stream_chunk(event) if isinstance(event, _MAPPING) else None

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []

        async def run() -> list[list[float]]:
            path = "/v1/embeddings"
            data = await self._post_json(path, embedding_request(self.settings.model, texts))
            try:
                return embeddings_from_response(data, len(texts))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise self._transport_error("POST", path, ValueError(str(exc))) from exc

        return await self._observe(run())

    # -- batches: concurrent requests, batched by the server ----------------------------------------

    async def _gather(self, works: Sequence[Awaitable[T]]) -> list[T]:
        limit = asyncio.Semaphore(self.settings.max_connections)

        async def bounded(work: Awaitable[T]) -> T:
            async with limit:
                return await work

        results = await asyncio.gather(*(bounded(w) for w in works), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # every request has finished: nothing is left running
        return list(results)  # type: ignore[arg-type]

    async def generate_batch(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        return await self._gather([self.generate(p, params) for p in prompts])

    async def chat_batch(
        self, conversations: Sequence[Sequence[ChatMessage]], params: GenerationParams
    ) -> list[Completion]:
        return await self._gather([self.chat(c, params) for c in conversations])

    async def embed_batch(self, batches: Sequence[Sequence[str]]) -> list[list[list[float]]]:
        return await self._gather([self.embed(texts) for texts in batches])

    # -- health and lifetime ----------------------------------------------------------------------

    async def health(self) -> bool:
        """Whether the server answers, at no token cost: ``GET /health`` where the server has it (vLLM,
        TGI, SGLang), else ``GET /v1/models``. Never raises; bounded by ``health_timeout_s``."""
        try:
            import aiohttp

            http = self._client()
            timeout = aiohttp.ClientTimeout(
                total=self.settings.health_timeout_s, sock_connect=self.settings.connect_timeout_s
            )
            for path in [self._health_path] if self._health_path else ["/health", "/v1/models"]:
                async with http.get(self._url(path), timeout=timeout) as response:
                    await response.read()
                    if response.status in (404, 405) and self._health_path is None:
                        continue  # no such endpoint here; try the next one
                    self._health_path = path
                    return bool(response.status < 400)
        except Exception:
            return False
        return False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if isinstance(self._http1, Http1Pool):
            await self._http1.close()
        if self._http is not None:
            await self._http.close()
            self._http = None


class RemoteOpenAIPlugin:
    """Sessions on an OpenAI-compatible server named by ``options.base_url``; nothing runs locally."""

    name = "remote_openai"

    def availability(self) -> Availability:
        # the installed version is enough here: importing aiohttp costs ~0.2 s, paid at the first request
        import importlib.metadata

        try:
            version = importlib.metadata.version("aiohttp")
        except importlib.metadata.PackageNotFoundError:
            return Availability(False, f"aiohttp is not installed; {_INSTALL_HINT}")
        return Availability(True, f"aiohttp {version}: any OpenAI-compatible server", version)

    def probe(self, resources: Sequence[Resource]) -> list[Resource]:
        """The declared remote resources; a remote deployment also runs with none. Never raises."""
        return [r for r in resources if r.type is ResourceType.REMOTE]

    def required_build_profiles(
        self, resources: Sequence[Resource], config: ModelConfig
    ) -> list[BuildProfile]:
        return []  # the server loads its own model

    def get_capability(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Capability:
        return Capability(
            max_batch_size=config.max_batch_size,
            max_seq_len=config.max_seq_len,
            supports_kv_cache=True,
            supports_streaming=True,
            supports_embeddings=True,
            supports_chat=True,
            dtypes=(config.precision,),
            optimized_for=OptimizedFor.THROUGHPUT,
            unsupported={"tensor": "OpenAI-compatible servers take text, not tensors"},
        )

    async def create_session(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> RemoteOpenAISession:
        """Validate the options and return a session; no connection is opened until the first request."""
        settings = RemoteSettings.from_config(config)
        return RemoteOpenAISession(config.model_id, resources, settings, max_batch_size=config.max_batch_size)
