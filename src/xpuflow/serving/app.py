"""The HTTP gateway: an ASGI app (Starlette routes, served by uvicorn) in front of an ``Engine``.

    app = create_app(engine, GatewaySettings(api_keys={"sk-team-a": "team-a"}))
    uvicorn.run(app, host="127.0.0.1", port=8000, loop="uvloop", http="httptools", access_log=False)

Endpoints (docs/api.md has them all, with headers and errors):

- ``POST /v1/chat/completions``, ``/v1/completions`` (SSE when ``stream`` is true), ``/v1/embeddings``:
  the hot path, in ``serving.inference``.
- ``GET /v1/models``, ``/v1/models/{model}``: the engine's logical models.
- ``GET /health`` (the process answers), ``/ready`` (the engine's ``is_ready()``; an engine without one
  is ready; 503 while the server drains), ``/metrics`` (Prometheus text), ``/openapi.json`` (the API's
  OpenAPI 3.1 document, ``serving.openapi``).
- Admin, with an admin key only: ``GET /admin/workers`` (``engine.status()``),
  ``POST /admin/workers/{id}/drain``, ``/undrain``, ``/load``, ``/unload`` (on_demand deployments),
  ``POST /admin/reload``.

Every error, including unknown paths and wrong methods, is OpenAI-shaped JSON. Around the routes, outermost
first: the Host allowlist (``serving.hosts``, when ``allowed_hosts`` is not ``*``), CORS (when configured)
and the drain (``serving.drain``: in-flight count, 503 while shutting down).

The three inference POSTs are what every request pays for, so ``GatewayApp`` sends them to their
endpoint itself, with the same Host check and drain count, without Starlette's routing and middleware
layers (about a tenth of the gateway's CPU per request). With CORS configured, or under a ``root_path``,
they take the ordinary path.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Receive, Scope, Send

from xpuflow.engine import Engine
from xpuflow.errors import XpuflowError
from xpuflow.serving.auth import Authenticator, request_authorization
from xpuflow.serving.drain import Drain, DrainMiddleware
from xpuflow.serving.hosts import HostFilter, host_of
from xpuflow.serving.inference import DECISION_HEADERS, InferenceEndpoints, ModelCatalog, to_api_error
from xpuflow.serving.metrics import GatewayMetrics
from xpuflow.serving.openai_schema import APIError, error_body, require_json_content_type
from xpuflow.serving.openapi import openapi_document
from xpuflow.serving.redact import redact
from xpuflow.serving.settings import GatewaySettings
from xpuflow.types import RequestKind

__all__ = ["Gateway", "GatewayApp", "create_app"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _jsonable(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)


def _json(data: Any, status: int = 200) -> Response:
    body = json.dumps(data, default=_jsonable).encode()
    return Response(body, status_code=status, media_type="application/json")


async def _engine_call(work: Awaitable[T]) -> T:
    try:
        return await work
    except XpuflowError as exc:
        raise to_api_error(exc) from exc


class Gateway:
    """The gateway's parts over one engine: auth, metrics, the model catalog, the inference endpoints,
    and the handlers of the other endpoints. ``create_app`` mounts them."""

    def __init__(self, engine: Engine, settings: GatewaySettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or GatewaySettings()
        self.auth = Authenticator(self.settings)
        self.metrics = GatewayMetrics(engine.status)
        self.catalog = ModelCatalog(engine, self.settings.owned_by)
        self.inference = InferenceEndpoints(engine, self.settings, self.auth, self.metrics, self.catalog)
        self.drain = Drain()

    # -- models, health, metrics --------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        self.auth.check(request_authorization(request))
        return Response(self.catalog.body, media_type="application/json")

    async def get_model(self, request: Request) -> Response:
        self.auth.check(request_authorization(request))
        return _json(self.catalog.describe(self.catalog.get(request.path_params["model"])))

    async def health(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        if self.drain.draining:  # first thing a shutdown changes, so load balancers stop sending
            return _json({"status": "draining"}, 503)
        is_ready = getattr(self.engine, "is_ready", None)
        ready = True
        if callable(is_ready):
            try:
                answer = is_ready()
                ready = bool(await answer if inspect.isawaitable(answer) else answer)
            except Exception as exc:  # a readiness probe answers; it never fails with a 500
                log.warning("engine.is_ready() failed: %s", exc)
                return _json({"status": "error", "reason": redact(str(exc))}, 503)
        return _json({"status": "ready" if ready else "starting"}, 200 if ready else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        if self.settings.metrics_require_key:
            self.auth.check(request_authorization(request), "metrics")
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def openapi(self, request: Request) -> Response:
        return _json(openapi_document(self.catalog.models.values(), self.settings))

    # -- admin --------------------------------------------------------------------------------------

    def _control(self, request: Request, operation: str) -> Any:
        self.auth.check(request_authorization(request), "admin")
        if _has_body(request):  # the admin POSTs take no body; one that is sent must be JSON
            require_json_content_type(_raw_header(request, "content-type"))
        if not callable(getattr(self.engine, operation, None)):
            raise APIError(501, f"this engine does not support {operation}", code="not_implemented")
        return self.engine

    async def admin_workers(self, request: Request) -> Response:
        self.auth.check(request_authorization(request), "admin")
        return _json(self.engine.status())

    async def admin_drain(self, request: Request) -> Response:
        worker = request.path_params["worker_id"]
        await _engine_call(self._control(request, "drain").drain(worker))
        return _json({"worker": worker, "draining": True})

    async def admin_undrain(self, request: Request) -> Response:
        worker = request.path_params["worker_id"]
        await _engine_call(self._control(request, "undrain").undrain(worker))
        return _json({"worker": worker, "draining": False})

    async def admin_load(self, request: Request) -> Response:
        worker = request.path_params["worker_id"]
        return _json(await _engine_call(self._control(request, "load_worker").load_worker(worker)))

    async def admin_unload(self, request: Request) -> Response:
        worker = request.path_params["worker_id"]
        return _json(await _engine_call(self._control(request, "unload_worker").unload_worker(worker)))

    async def admin_reload(self, request: Request) -> Response:
        changes = await _engine_call(self._control(request, "reload").reload())
        self.catalog.refresh()
        return _json({"reloaded": True, "changes": changes})

    # -- assembly -----------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """The gateway's routes, hot ones first (the router tries them in order)."""
        infer = self.inference.asgi
        return [
            Route("/v1/chat/completions", infer(RequestKind.CHAT), methods=["POST"]),
            Route("/v1/completions", infer(RequestKind.COMPLETION), methods=["POST"]),
            Route("/v1/embeddings", infer(RequestKind.EMBEDDING), methods=["POST"]),
            Route("/v1/models", self.list_models),
            Route("/v1/models/{model:path}", self.get_model),
            Route("/health", self.health),
            Route("/ready", self.ready),
            Route("/metrics", self.metrics_endpoint),
            Route("/openapi.json", self.openapi),
            Route("/admin/workers", self.admin_workers),
            Route("/admin/workers/{worker_id:path}/drain", self.admin_drain, methods=["POST"]),
            Route("/admin/workers/{worker_id:path}/undrain", self.admin_undrain, methods=["POST"]),
            Route("/admin/workers/{worker_id:path}/load", self.admin_load, methods=["POST"]),
            Route("/admin/workers/{worker_id:path}/unload", self.admin_unload, methods=["POST"]),
            Route("/admin/reload", self.admin_reload, methods=["POST"]),
            *self.oip_routes(),
        ]

    def oip_routes(self) -> list[BaseRoute]:
        """The Open Inference Protocol's ``/v2`` routes (``serving.oip_rest``) over this gateway."""
        from xpuflow.serving.oip_rest import oip_routes
        from xpuflow.serving.oip_service import OIPService

        return oip_routes(OIPService(self))


def _raw_header(request: Request, name: str) -> bytes | None:
    value = request.headers.get(name)
    return None if value is None else value.encode("latin-1")


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return "transfer-encoding" in request.headers or (length is not None and length.strip() not in ("", "0"))


def _slash_redirect(request: Request) -> Response | None:
    """A 307 to the same path with its trailing slash added or removed, when that path exists.

    Starlette's own redirect builds an absolute URL from the client's Host header; this one sends a
    relative ``Location`` (RFC 9110 allows it), so a forged Host cannot steer the client elsewhere."""
    path = request.scope["path"]
    if path == "/" or "//" in path or "\\" in path:  # "//host" would be a protocol-relative URL
        return None
    other = path.rstrip("/") if path.endswith("/") else path + "/"
    if not other:
        return None
    scope = {**request.scope, "path": other}
    for route in request.app.router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            query = request.scope.get("query_string", b"")
            location = other + ("?" + query.decode("latin-1") if query else "")
            return Response(status_code=307, headers={"location": location})
    return None


def _error_response(error: APIError) -> Response:
    return Response(error.body(), error.status, error.headers, media_type="application/json")


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return _error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        redirect = _slash_redirect(request)
        if redirect is not None:
            return redirect
        message, code = (
            f"no endpoint {request.method} {request.url.path}; docs/api.md lists them",
            "not_found",
        )
    elif exc.status_code == 405:
        message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    body = error_body(message, "invalid_request_error", None, code)
    return Response(body, exc.status_code, exc.headers, media_type="application/json")


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(to_api_error(exc))


class GatewayApp(Starlette):
    """The gateway's Starlette app, with a short way for the hot routes: a ``POST`` to one of
    ``fast_routes`` (path -> raw ASGI endpoint) gets the Host check and the drain's count and refusal
    that the middleware would give it, then goes straight to its endpoint (which answers every error
    itself, in OpenAI's shape). Everything else goes through Starlette as usual."""

    fast_routes: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]]
    hosts: HostFilter | None
    drain: Drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            endpoint = self.fast_routes.get(scope["path"])
            if endpoint is not None:
                hosts = self.hosts
                if hosts is not None:
                    host = host_of(scope)
                    if not hosts.allows(host):
                        await hosts.refuse(scope, send, host)
                        return
                scope["app"] = self
                drain = self.drain  # Drain.run, inline: one coroutine fewer on every inference request
                if drain.draining:
                    await drain.refuse(send)
                    return
                drain.in_flight += 1
                try:
                    await endpoint(scope, receive, send)
                finally:
                    drain.in_flight -= 1
                return
        await super().__call__(scope, receive, send)


def create_app(
    engine: Engine,
    settings: GatewaySettings | None = None,
    *,
    routes: Sequence[BaseRoute] = (),
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    """The gateway's ASGI app over ``engine``. ``routes`` are mounted after the gateway's own (the
    dashboard, for one); ``lifespan`` runs around the server's life (to start and close the engine).
    The ``Gateway`` is at ``app.state.gateway``; its ``drain`` is what a server's shutdown begins."""
    gateway = Gateway(engine, settings)
    middleware = []
    hosts: HostFilter | None = None
    if "*" not in gateway.settings.allowed_hosts:
        middleware.append(Middleware(HostFilter, allowed=gateway.settings.allowed_hosts))
        hosts = HostFilter(_unreachable, gateway.settings.allowed_hosts)  # its check, for the fast routes
    cors = gateway.settings.cors
    if cors is not None:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors.allow_origins),
                allow_methods=list(cors.allow_methods),
                allow_headers=list(cors.allow_headers),
                allow_credentials=cors.allow_credentials,
                max_age=cors.max_age_s,
                expose_headers=["x-request-id", "retry-after", *DECISION_HEADERS],
            )
        )
    middleware.append(Middleware(DrainMiddleware, drain=gateway.drain))
    app = GatewayApp(
        routes=[*gateway.routes(), *routes],
        middleware=middleware,
        exception_handlers={
            APIError: _on_api_error,
            HTTPException: _on_http_error,
            Exception: _on_unexpected,
        },
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # _on_http_error redirects, with a relative Location
    app.state.gateway = gateway
    # CORS adds its headers in its middleware: with it configured, every route goes through the stack
    app.fast_routes = (
        {}
        if cors is not None
        else {
            # the handler's coroutine itself (a partial, not the _Endpoint object Starlette mounts)
            "/v1/chat/completions": functools.partial(gateway.inference.handle, RequestKind.CHAT),
            "/v1/completions": functools.partial(gateway.inference.handle, RequestKind.COMPLETION),
            "/v1/embeddings": functools.partial(gateway.inference.handle, RequestKind.EMBEDDING),
        }
    )
    app.hosts, app.drain = hosts, gateway.drain
    return app


async def _unreachable(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("the fast routes' HostFilter only checks hosts; it wraps no app")
