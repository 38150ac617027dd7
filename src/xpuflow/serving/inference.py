"""The gateway's hot path: ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``.

Each endpoint is a plain ASGI callable: it reads the few headers it needs in one pass, checks the key,
reads the body under the size limit, validates it by hand (``openai_schema``), calls the engine and
sends a pre-built header list. The gateway's own cost is what every request pays on top of the model,
so nothing here allocates a framework request or response object::

    endpoints = InferenceEndpoints(engine, settings, auth, metrics, ModelCatalog(engine, "xpuflow"))
    Route("/v1/chat/completions", endpoints.asgi(RequestKind.CHAT), methods=["POST"])

A client mistake is always a 4xx in OpenAI's error shape (``to_api_error`` maps engine errors); a 500
means a bug here. When the client disconnects, the call's ``cancelled`` event is set and the handler is
cancelled, so queued work is dropped instead of computed for nobody.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from xpuflow import deadlines
from xpuflow.engine import Engine, InferenceCall, ModelInfo
from xpuflow.errors import (
    AdmissionRejected,
    BackendError,
    CapabilityError,
    ConfigError,
    ModelDoesNotFit,
    ModelNotFound,
    RemoteError,
    RoutingError,
    XpuflowError,
)
from xpuflow.scheduling.request import CancelSignal
from xpuflow.serving.auth import Authenticator
from xpuflow.serving.metrics import GatewayMetrics
from xpuflow.serving.openai_schema import (
    SSE_DONE,
    APIError,
    ChatStream,
    ParsedRequest,
    chat_response,
    completion_response,
    embeddings_response,
    load_json,
    model_object,
    parse_chat,
    parse_completion,
    parse_embeddings,
    require_json_content_type,
)
from xpuflow.serving.redact import redact
from xpuflow.serving.settings import ApiKey, GatewaySettings
from xpuflow.types import Priority, RequestKind, RoutingDecision

__all__ = [
    "DECISION_HEADERS",
    "DISCONNECT_EXTENSION",
    "RESPOND_EXTENSION",
    "InferenceEndpoints",
    "ModelCatalog",
    "to_api_error",
]

log = logging.getLogger(__name__)

#: The ASGI scope extensions a server may offer the endpoints (``serving.http_protocol`` offers both):
#: ``scope["extensions"][DISCONNECT_EXTENSION]["watch"](callback) -> unwatch`` reports the client leaving
#: (its ``"loop"``, where present, is the event loop the request's handler runs on);
#: ``scope["extensions"][RESPOND_EXTENSION]["respond"](status, headers, body) -> bool`` writes a whole
#: answer in one call. Without them the endpoints use ``receive()`` and the ASGI messages.
DISCONNECT_EXTENSION = "xpuflow.disconnect"
RESPOND_EXTENSION = "xpuflow.respond"

#: Response headers that say where a request ran and why.
DECISION_HEADERS = (
    "x-xpuflow-tier",
    "x-xpuflow-worker",
    "x-xpuflow-device",
    "x-xpuflow-route-reason",
    "x-xpuflow-cold-start",
)

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies (nginx) must not hold the stream back
]
_WANTED = frozenset(
    {
        b"authorization",
        b"content-length",
        b"content-type",
        b"x-priority",
        b"x-qos-class",
        b"x-xpuflow-tier",
        b"x-xpuflow-session",
    }
)
_PRIORITIES = {b"": Priority.NORMAL, b"high": Priority.HIGH, b"normal": Priority.NORMAL, b"low": Priority.LOW}
_MAX_HEADER_CHARS = 200
# Header values must not carry control characters (CR/LF would split the response).
_HEADER_SAFE = bytes(b if 32 <= b < 127 else 32 for b in range(256))
_ID_PREFIX = {RequestKind.CHAT: "chatcmpl-", RequestKind.COMPLETION: "cmpl-", RequestKind.EMBEDDING: "emb-"}


class _RandomHex:
    """24 hex digits of the system's randomness at a time (a request id's), read from ``os.urandom``
    4 KiB at once: one ``getrandom`` system call per 170 ids instead of one per id. A forked child
    starts a buffer of its own, so two processes never hand out the same digits."""

    __slots__ = ("_at", "_digits")

    def __init__(self) -> None:
        self._digits = ""
        self._at = 0

    def take(self) -> str:
        at = self._at
        if at + 24 > len(self._digits):
            self._digits, at = os.urandom(4096).hex(), 0
        self._at = at + 24
        return self._digits[at : at + 24]

    def forget(self) -> None:
        self._digits, self._at = "", 0


_random_hex = _RandomHex()
os.register_at_fork(after_in_child=_random_hex.forget)

_PARSERS: dict[RequestKind, Callable[[Mapping[str, Any], GatewaySettings], ParsedRequest]] = {
    RequestKind.CHAT: parse_chat,
    RequestKind.COMPLETION: parse_completion,
    RequestKind.EMBEDDING: parse_embeddings,
}


class _ClientGone(Exception):
    """The client disconnected while its body was being read: there is nobody to answer."""


@functools.lru_cache(maxsize=1024)
def _header(value: str) -> bytes:
    """``value`` as a header value: at most 200 ASCII characters, control characters as spaces. Cached:
    the decision headers take few values (tiers, workers, devices, the scorer's reasons)."""
    return value[:_MAX_HEADER_CHARS].encode("ascii", "replace").translate(_HEADER_SAFE)


def decision_headers(decision: RoutingDecision | None) -> Sequence[tuple[bytes, bytes]]:
    """The ``x-xpuflow-*`` response headers for ``decision`` (none without one). A decision the router
    gives again (a sole worker's, made once: ``routing.dispatch``) finds its headers made already."""
    if decision is None:
        return ()
    cached = _DECISION_HEADERS.get(id(decision))
    if cached is not None and cached[0] is decision:
        return cached[1]
    headers = _decision_headers(decision)
    if len(_DECISION_HEADERS) >= 64:
        _DECISION_HEADERS.clear()  # scored decisions are new every time: keep the few that come back
    _DECISION_HEADERS[id(decision)] = (decision, headers)
    return headers


# id -> (the decision, its headers); the decision is kept, so its id is not reused while it is here
_DECISION_HEADERS: dict[int, tuple[RoutingDecision, tuple[tuple[bytes, bytes], ...]]] = {}


def _decision_headers(decision: RoutingDecision) -> tuple[tuple[bytes, bytes], ...]:
    return (
        (b"x-xpuflow-tier", _header(decision.tier or "")),
        (b"x-xpuflow-worker", _header(decision.worker or "")),
        (b"x-xpuflow-device", _header(decision.device or "")),
        *([(b"x-xpuflow-cold-start", b"true")] if decision.details.get("cold_start") else []),
        # a remote worker's reason may name its server's URL; the log has it, the client does not
        (
            b"x-xpuflow-route-reason",
            _header(redact(decision.reason) if "://" in decision.reason else decision.reason),
        ),
    )


def _session_key(raw: bytes | None) -> str | None:
    if not raw:
        return None
    if len(raw) > 256:
        raise APIError(400, "header x-xpuflow-session must be at most 256 bytes", param="x-xpuflow-session")
    return raw.decode("latin-1")


def _token(raw: bytes | None, name: str) -> str | None:
    if not raw:
        return None
    if len(raw) > 64 or not raw.replace(b"-", b"").replace(b"_", b"").replace(b".", b"").isalnum():
        raise APIError(
            400,
            f"header {name} must be 1-64 letters, digits, '-', '_' or '.'",
            param=name,
            code="invalid_header",
        )
    return raw.decode("ascii")


def _extension(scope: Scope, name: str) -> Any:
    """The server's scope extension ``name``, or None."""
    extensions = scope.get("extensions")
    return None if extensions is None else extensions.get(name)


async def _send_json(
    scope: Scope, send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """A JSON answer: in one call through the server's ``RESPOND_EXTENSION`` where it has one (every
    header here is lower-case and clean), else as the two ASGI messages."""
    extension = _extension(scope, RESPOND_EXTENSION)
    if extension is not None and extension["respond"](status, [_JSON, *headers], body):
        return
    headers = [_JSON, (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes; send less", code="request_too_large")


async def _read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise APIError(400, "invalid Content-Length header", param="content-length") from None
        if size > limit:
            raise _too_large(limit)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > limit:
            raise _too_large(limit)
        return body
    parts, size = [body], len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


def _retry_after(seconds: float | None) -> dict[str, str]:
    """A ``Retry-After`` header in whole seconds, rounded up (1 s when the wait is unknown)."""
    return {"retry-after": str(1 if seconds is None else max(1, math.ceil(seconds)))}


def to_api_error(exc: BaseException, models: Sequence[str] = ()) -> APIError:
    """The HTTP answer for an error the engine raised (docs/api.md, "Errors", has the table). Its
    message has no upstream URLs or addresses (``redact``); the caller logs the original."""
    if isinstance(exc, APIError):
        return exc
    message = redact(str(exc)) or type(exc).__name__
    if isinstance(exc, ConfigError):
        field = exc.field
        if field == "model":
            if not isinstance(exc, ModelNotFound):
                message = f"{message}; available models: {', '.join(sorted(models)) or 'none'}"
            return APIError(404, message, param="model", code="model_not_found")
        if field == "worker":
            return APIError(404, message, param="worker", code="worker_not_found")
        if field == "worker_state":  # an admin action the worker's state refuses now (in use, pinned)
            return APIError(409, message, param="worker", code="conflict")
        if field is not None and field.startswith("x-"):
            return APIError(400, message, param=field, code="invalid_header")
        return APIError(422 if field else 400, message, param=field, code="invalid_value")
    if isinstance(exc, AdmissionRejected):
        return APIError(429, message, code="rate_limited", headers=_retry_after(exc.retry_after_s))
    if isinstance(
        exc, ModelDoesNotFit
    ):  # no room to load the model now: the server's state, not the client's
        return APIError(503, message, code="model_does_not_fit", headers=_retry_after(exc.retry_after_s))
    if isinstance(exc, TimeoutError):  # DispatchTimeout, and the gateway's own request timeout
        return APIError(504, f"the request timed out: {message}", code="timeout")
    if isinstance(exc, RoutingError):
        return APIError(503, message, code="no_worker_available", headers={"retry-after": "1"})
    if isinstance(exc, CapabilityError):
        return APIError(400, message, code="unsupported")
    if isinstance(exc, RemoteError):
        if exc.status == 429:
            # the upstream's own Retry-After when it sent one, so clients back off as long as it asks
            return APIError(
                429, message, code="upstream_rate_limited", headers=_retry_after(exc.retry_after_s)
            )
        if exc.status in (400, 413, 422):  # the upstream refused the client's input (e.g. too long)
            return APIError(exc.status, message, code="upstream_rejected")
        return APIError(502, message, code="upstream_error")
    if isinstance(exc, BackendError):
        return APIError(503, message, code="backend_error", headers={"retry-after": "1"})
    if isinstance(exc, XpuflowError):
        return APIError(500, message, code="internal_error")
    return APIError(500, "internal error; the server log has the details", code="internal_error")


class ModelCatalog:
    """The engine's models, cached; re-read on a miss and after a reload. ``body`` is the ready-made
    ``GET /v1/models`` answer."""

    def __init__(self, engine: Engine, owned_by: str) -> None:
        self._engine = engine
        self._owned_by = owned_by
        self.models: dict[str, ModelInfo] = {}
        self.body = b""
        self.refresh()

    def refresh(self) -> None:
        self.models = {m.name: m for m in self._engine.models()}
        data = [self.describe(m) for m in self.models.values()]
        self.body = json.dumps({"object": "list", "data": data}).encode()

    def describe(self, info: ModelInfo) -> dict[str, Any]:
        return model_object(info.name, info.created_s, self._owned_by, task=info.task, tiers=list(info.tiers))

    def get(self, name: str) -> ModelInfo:
        """The model called ``name``; raises APIError 404 listing the models."""
        info = self.models.get(name)
        if info is None:
            self.refresh()
            info = self.models.get(name)
            if info is None:
                raise to_api_error(ModelNotFound(name, list(self.models)))
        return info

    def for_kind(self, name: str, kind: RequestKind) -> ModelInfo:
        info = self.get(name)
        if (kind is RequestKind.EMBEDDING) != (info.task == "embedding"):
            use = "POST /v1/embeddings" if info.task == "embedding" else "POST /v1/chat/completions"
            raise APIError(
                400,
                f"model '{name}' serves {info.task}; use {use}",
                param="model",
                code="model_task_mismatch",
            )
        return info


def _nothing() -> None:
    return None


class _Guard:
    """Watches one request while the engine works on it: the client leaving and the deadline for the
    answer (``request_timeout_s``; for a stream, its first event). Either sets the call's ``cancelled``
    event and cancels the handler; ``reason`` then says which. One timer per request, cheaper than
    ``asyncio.timeout``. The client leaving comes from the server's ``DISCONNECT_EXTENSION``
    (``serving/http_protocol.py``, what ``xpuflow serve`` runs) where there is one: a callback, no task;
    under another server, from a task waiting on ``receive()`` for ``http.disconnect``."""

    __slots__ = ("call", "done", "handler", "reason", "started", "stop_watching", "timer", "until_s")

    def __init__(self, scope: Scope, receive: Receive, call: InferenceCall, timeout_s: float | None) -> None:
        self.call = call
        self.done = False
        self.started = False  # the response has begun: an error can no longer become an HTTP status
        self.reason: str | None = None  # "disconnect" or "timeout" once fired
        extension = _extension(scope, DISCONNECT_EXTENSION)
        # the handler's task, on the loop the server says it runs on where it says (on Python 3.11 the
        # running loop is found with a getpid system call)
        loop = None if extension is None else extension.get("loop")
        handler = self.handler = asyncio.current_task(loop)
        self.timer: deadlines.Cancellable | None = None
        # when its timer comes due, on the handler's loop (what promise() tells the engine)
        self.until_s = None if timeout_s is None or handler is None else handler.get_loop().time() + timeout_s
        if timeout_s is not None:
            self.timer = (
                deadlines.call_later(timeout_s, self._fire, "timeout")
                if handler is None
                else deadlines.call_later_on(handler.get_loop(), timeout_s, self._fire, "timeout")
            )
        self.stop_watching: Callable[[], object]
        if extension is not None:
            self.stop_watching = extension["watch"](self._on_disconnect)
        else:
            task = asyncio.ensure_future(receive())
            task.add_done_callback(self._on_message)
            self.stop_watching = task.cancel

    def _on_disconnect(self) -> None:
        self._fire("disconnect")

    def _on_message(self, task: asyncio.Future[Message]) -> None:
        if (
            not task.cancelled()
            and task.exception() is None
            and task.result().get("type") == "http.disconnect"
        ):
            self._fire("disconnect")

    def _fire(self, reason: str) -> None:
        if self.done or self.reason is not None:
            return
        self.reason = reason
        self.call.cancelled.set()
        if self.handler is not None:
            self.handler.cancel()

    def promise(self) -> None:
        """For a whole answer (not a stream, whose deadline ends at its first event): tell the call's
        ``CancelSignal`` that this guard sets it by its deadline (``CancelSignal.set_by_s``), so that a
        worker need not arm a timer of its own for the same instant. The loop's clock reads no later
        than the monotonic clock the engine's deadline is taken from, so the promise is never late."""
        signal = self.call.cancelled
        if self.timer is not None and self.until_s is not None and isinstance(signal, CancelSignal):
            signal.set_by_s = self.until_s

    def answered(self) -> None:
        """The engine has answered (a stream: its first event); the deadline no longer applies."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def finish(self) -> None:
        """Call before the last send, so that a normal end is never taken for a disconnect."""
        self.done = True
        self.answered()
        # once: what it calls holds this guard (a reference cycle the collector would have to find)
        stop, self.stop_watching = self.stop_watching, _nothing
        stop()


class _Endpoint:
    """An ASGI app for one request kind (an object, so Starlette mounts it as a raw ASGI app)."""

    __slots__ = ("endpoints", "kind")

    def __init__(self, endpoints: InferenceEndpoints, kind: RequestKind) -> None:
        self.endpoints = endpoints
        self.kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.endpoints.handle(self.kind, scope, receive, send)


class InferenceEndpoints:
    """The three inference endpoints over one engine."""

    def __init__(
        self,
        engine: Engine,
        settings: GatewaySettings,
        auth: Authenticator,
        metrics: GatewayMetrics,
        catalog: ModelCatalog,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.auth = auth
        self.metrics = metrics
        self.catalog = catalog

    def asgi(self, kind: RequestKind) -> _Endpoint:
        return _Endpoint(self, kind)

    async def handle(self, kind: RequestKind, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        headers = {k: v for k, v in scope["headers"] if k in _WANTED}
        request_id = _ID_PREFIX[kind] + _random_hex.take()
        model = tier = device = ""
        guard: _Guard | None = None
        self.metrics.in_flight += 1
        try:
            key = self.auth.check(headers.get(b"authorization"))
            if key is not None:
                self.metrics.observe_key(key.name)
            require_json_content_type(headers.get(b"content-type"))
            body = await _read_body(receive, headers.get(b"content-length"), self.settings.max_body_bytes)
            parsed = _PARSERS[kind](load_json(body), self.settings)
            info = self.catalog.for_kind(parsed.model, kind)
            model = info.name
            call = self._call(kind, parsed, info, headers, request_id, key)
            guard = _Guard(scope, receive, call, self.settings.request_timeout_s)
            if parsed.stream:
                await self._stream(call, parsed, start, send, guard)
                return
            guard.promise()
            result = await self.engine.complete(call)
            guard.answered()
            decision = result.decision
            tier, device = decision.tier or "", decision.device or ""
            prompt_tokens, completion_tokens = result.prompt_tokens, 0
            if kind is RequestKind.EMBEDDING:
                vectors = result.embeddings or []
                if parsed.dimensions is not None and vectors and len(vectors[0]) != parsed.dimensions:
                    n = len(vectors[0])
                    message = (
                        f"dimensions: model '{model}' returns {n}-dimensional vectors; omit it or set {n}"
                    )
                    raise APIError(422, message, param="dimensions", code="unsupported_value")
                out = embeddings_response(model, vectors, prompt_tokens, parsed.encoding_format)
            else:
                completion = result.completion
                if completion is None:
                    raise XpuflowError(f"the engine returned no completion for request {request_id}")
                build = chat_response if kind is RequestKind.CHAT else completion_response
                out = build(request_id, model, int(time.time()), completion, prompt_tokens)
                prompt_tokens = prompt_tokens or completion.prompt_tokens
                completion_tokens = completion.completion_tokens
            guard.finish()
            await _send_json(
                scope, send, 200, out, [(b"x-request-id", request_id.encode()), *decision_headers(decision)]
            )
            self.metrics.observe_decision(model, decision)
            self.metrics.observe_request(
                model,
                tier,
                device,
                200,
                time.perf_counter() - start,
                queue_s=result.queue_ms / 1000.0,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        except _ClientGone:
            return
        except asyncio.CancelledError:
            if guard is None or guard.reason is None:
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()  # the guard cancelled us, not the server
            guard.finish()
            if guard.reason == "disconnect" or guard.started:
                self.metrics.observe_request(model, tier, device, 499, time.perf_counter() - start)
                return  # the client left: nobody to answer
            timeout = TimeoutError(f"no answer within request_timeout_s={self.settings.request_timeout_s:g}")
            await self._fail(scope, send, timeout, request_id, (model, tier, device), start)
        except Exception as exc:
            if guard is not None:
                guard.finish()
                if guard.started:
                    log.warning("stream %s broke off: %s", request_id, exc, exc_info=True)
                    return
            await self._fail(scope, send, exc, request_id, (model, tier, device), start)
        finally:
            self.metrics.in_flight -= 1

    async def _fail(
        self,
        scope: Scope,
        send: Send,
        exc: BaseException,
        request_id: str,
        labels: tuple[str, str, str],
        start: float,
    ) -> None:
        error = to_api_error(exc, list(self.catalog.models))
        if error.status >= 500 or isinstance(exc, RemoteError):  # the full message: the body is redacted
            log.warning("request %s failed: %s", request_id, exc, exc_info=error.status == 500)
        extra = [(b"x-request-id", request_id.encode())]
        extra += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await _send_json(scope, send, error.status, error.body(), extra)
        self.metrics.observe_request(*labels, error.status, time.perf_counter() - start)

    def _call(
        self,
        kind: RequestKind,
        parsed: ParsedRequest,
        info: ModelInfo,
        headers: Mapping[bytes, bytes],
        request_id: str,
        key: ApiKey | None,
    ) -> InferenceCall:
        raw_priority = headers.get(b"x-priority", b"")
        priority = _PRIORITIES.get(raw_priority.strip(b" \t").lower())
        if priority is None:
            raise APIError(
                400,
                f"unknown priority {raw_priority.decode('latin-1')!r}; valid: high, normal, low",
                param="x-priority",
                code="invalid_header",
            )
        tier = _token(headers.get(b"x-xpuflow-tier"), "x-xpuflow-tier")
        if tier is not None and info.tiers and tier not in info.tiers:
            raise APIError(
                400,
                f"model '{info.name}' has no tier '{tier}'; tiers: {', '.join(info.tiers)}",
                param="x-xpuflow-tier",
                code="invalid_header",
            )
        qos_class = _token(headers.get(b"x-qos-class"), "x-qos-class")
        if key is not None and key.qos_class is not None:
            qos_class = key.qos_class  # the key's class: a client cannot talk itself into another one
        return InferenceCall(
            model=info.name,
            kind=kind,
            payload=parsed.payload,
            params=parsed.params,
            priority=priority,
            qos_class=qos_class,
            tier_override=tier,
            api_key_name=key.name if key else None,
            request_id=request_id,
            timeout_s=self.settings.request_timeout_s,
            session_key=_session_key(headers.get(b"x-xpuflow-session")) or parsed.user,
        )

    async def _stream(
        self, call: InferenceCall, parsed: ParsedRequest, start: float, send: Send, guard: _Guard
    ) -> None:
        """Send the engine's events as SSE. Errors before the first event are ordinary HTTP errors
        (raised to ``handle``); after it, an error event ends the stream."""
        events = self.engine.stream(call).__aiter__()
        model, tier, device = call.model, "", ""
        try:
            try:
                first = await events.__anext__()
                guard.answered()
            except StopAsyncIteration:
                raise XpuflowError(f"the engine ended stream {call.request_id} before any event") from None
            decision = first.decision
            if decision is not None:
                tier, device = decision.tier or "", decision.device or ""
                self.metrics.observe_decision(model, decision)
            headers = [
                *_SSE_HEADERS,
                (b"x-request-id", call.request_id.encode()),
                *decision_headers(decision),
            ]
            guard.started = True
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            out = ChatStream(call.request_id, model, int(time.time()), chat=call.kind is RequestKind.CHAT)
            if out.chat:
                await send({"type": "http.response.body", "body": out.role(), "more_body": True})
            sent, ttft_s, failed = 0, None, None
            usage: Mapping[str, Any] | None = None
            event: Any = first
            while True:
                chunk = event.chunk
                if chunk is not None and (chunk.text or chunk.finish_reason is not None):
                    if chunk.text:
                        sent += 1
                        if ttft_s is None:
                            ttft_s = time.perf_counter() - start
                    data = out.chunk(chunk.text, chunk.finish_reason)
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                # sessions put token counts on their last chunk; else chunks are counted
                if chunk is not None and chunk.prompt_tokens is not None:
                    usage = {"prompt_tokens": chunk.prompt_tokens}
                    if chunk.completion_tokens is not None:
                        usage["completion_tokens"] = chunk.completion_tokens
                if event.error is not None:
                    failed = str(event.error)
                    break
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    break
                except (XpuflowError, TimeoutError) as exc:  # e.g. the worker failed mid-stream
                    failed = str(exc) or type(exc).__name__
                    break
                except Exception:
                    log.exception("stream %s failed", call.request_id)
                    failed = "internal error; the server log has the details"
                    break
            prompt_tokens = int(usage.get("prompt_tokens", 0)) if usage else 0
            completion_tokens = int(usage.get("completion_tokens", sent)) if usage else sent
            if failed is not None:
                worker = decision.worker if decision is not None and decision.worker else None
                where = f" on worker '{worker}'" if worker else ""
                log.warning("stream %s failed after it started%s: %s", call.request_id, where, failed)
                tail = ChatStream.error(
                    f"the stream failed after it started{where}: {redact(failed)}", code="stream_interrupted"
                )
            else:
                tail = out.usage(prompt_tokens, completion_tokens) if parsed.include_usage else b""
                tail += SSE_DONE
            guard.finish()
            await send({"type": "http.response.body", "body": tail})
            self.metrics.observe_request(
                model,
                tier,
                device,
                200 if failed is None else 502,
                time.perf_counter() - start,
                ttft_s=ttft_s,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
