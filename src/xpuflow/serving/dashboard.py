"""The live dashboard: one HTML page, a Server-Sent Events feed of snapshots, and its static files.

The gateway mounts the routes next to the OpenAI API::

    app = Starlette(routes=[*api_routes, *dashboard_routes(engine, interval_s=0.5)])

``GET /dashboard`` is the page, ``GET /dashboard/events`` streams one JSON snapshot every ``interval_s``
(event name ``snapshot``), ``GET /dashboard/snapshot`` returns one snapshot as JSON, and
``GET /dashboard/static/{file}`` serves the page's script, stylesheet and the vendored chart library, so
the page renders with no network access beyond the gateway itself.

A snapshot is built from ``engine.status()`` only; the keys read from it are documented in
docs/dashboard.md and the engine is expected to answer quickly (it is called on the event loop). The
request-rate and latency charts come from a short ring buffer kept here and fed from the status counters,
sampled at most once per ``interval_s`` however many browsers watch.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from xpuflow.engine import Engine
    from xpuflow.serving.auth import Authenticator

__all__ = ["DashboardFeed", "dashboard_routes"]

log = logging.getLogger(__name__)

#: Most route decisions a snapshot carries (newest first).
MAX_DECISIONS = 25
#: Chart history length: 240 points at 0.5 s is the last two minutes.
HISTORY_POINTS = 240
#: Rates are averaged over this window (as Prometheus' rate() does), so bursts do not draw spikes.
RATE_WINDOW_S = 2.0
#: A stream ends after this long and the browser reconnects at once (EventSource does so by itself);
#: it bounds how long a watching browser can hold a server that is shutting down.
STREAM_MAX_S = 120.0
_REASON_MAX_CHARS = 300

_CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
_STATIC_NAME = re.compile(r"^(?:vendor/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
# The page loads only its own files and talks only to its own origin.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _num(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, text, NaN, a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    if isinstance(value, Mapping):  # a queue depth per priority: the total is what the page shows
        parts = [_int(v) for v in value.values()]
        return sum(p for p in parts if p is not None)
    number = _num(value)
    return None if number is None else int(number)


def _scalar_int(value: Any) -> int | None:
    number = _num(value)
    return None if number is None else int(number)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _batch_sizes(value: Any) -> dict[str, int]:
    """``{batch size: number of batches}``; a plain list of recent batch sizes is counted too."""
    counts: dict[int, int] = {}
    if isinstance(value, Mapping):
        for size, count in value.items():
            s, c = _int(_num_or_parse(size)), _int(count)
            if s is not None and c is not None and s > 0 and c > 0:
                counts[s] = counts.get(s, 0) + c
    elif isinstance(value, Iterable) and not isinstance(value, str | bytes):
        for size in value:
            s = _int(size)
            if s is not None and s > 0:
                counts[s] = counts.get(s, 0) + 1
    return {str(s): counts[s] for s in sorted(counts)}


def _num_or_parse(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return _num(value)


#: What a managed engine's state may read (``backends.managed_engine.EngineState``); others become None.
MANAGED_STATES = ("starting", "running", "restarting", "failed", "stopped")
MAX_MANAGED_ERROR_CHARS = 300


def _managed(value: Any) -> dict[str, Any] | None:
    """The model server a managed worker's gateway started (docs/managed_engines.md): its state, pid,
    restart count, uptime, last exit code and last error; None for a worker that is not managed. The
    process's argv and log file stay in the admin API (they may carry keys and local paths)."""
    if not isinstance(value, Mapping):
        return None
    state = _text(value.get("state"))
    error = _text(value.get("last_error"))
    return {
        "state": state if state in MANAGED_STATES else None,
        "pid": _scalar_int(value.get("pid")),
        "restarts": _scalar_int(value.get("restarts")),
        "uptime_s": _num(value.get("uptime_s")),
        "last_exit_code": _scalar_int(value.get("last_exit_code")),
        "last_error": error[:MAX_MANAGED_ERROR_CHARS] if error else None,
    }


def _worker(raw: Mapping[str, Any]) -> dict[str, Any]:
    healthy = bool(raw.get("healthy", True))
    draining = bool(raw.get("draining", False))
    health = _text(raw.get("health")) or ("draining" if draining else "healthy" if healthy else "unhealthy")
    batch_sizes = _batch_sizes(raw.get("batch_sizes"))
    batches = sum(batch_sizes.values())
    mean_batch = sum(int(s) * c for s, c in batch_sizes.items()) / batches if batches else None
    return {
        "worker_id": str(raw.get("worker_id", "?")),
        "deployment": _text(raw.get("deployment")),
        "model": _text(raw.get("model")),
        "tier": _text(raw.get("tier")),
        "device": str(raw.get("device") or "unknown"),
        "node": _text(raw.get("node")),
        "healthy": healthy,
        "draining": draining,
        "health": health,
        "queue_depth": _int(raw.get("queue_depth")),
        "in_flight": _int(raw.get("in_flight")),
        "ema_latency_ms": _num(raw.get("ema_latency_ms")),
        "tokens_per_s": _num(raw.get("tokens_per_s")),
        "free_memory_bytes": _int(raw.get("free_memory_bytes")),
        "total_memory_bytes": _int(raw.get("total_memory_bytes")),
        "batch_sizes": batch_sizes,
        "mean_batch_size": mean_batch,
        "managed": _managed(raw.get("managed")),
    }


def _devices(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Workers grouped by device; a device's memory reading is its first worker's that has one."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for worker in workers:
        grouped.setdefault(worker["device"], []).append(worker)
    devices = []
    for device in sorted(grouped):
        members = sorted(grouped[device], key=lambda w: w["worker_id"])
        free = next((w["free_memory_bytes"] for w in members if w["free_memory_bytes"] is not None), None)
        total = next((w["total_memory_bytes"] for w in members if w["total_memory_bytes"] is not None), None)
        devices.append(
            {
                "device": device,
                "node": next((w["node"] for w in members if w["node"]), None),
                "free_memory_bytes": free,
                "total_memory_bytes": total,
                "healthy_workers": sum(1 for w in members if w["healthy"] and not w["draining"]),
                "workers": members,
            }
        )
    return devices


def _nodes(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cluster mode (some worker names its node): devices grouped by node, sorted by name; a device
    without a node is under ``None`` (listed last). One machine: an empty list, the page is unchanged."""
    if not any(d["node"] for d in devices):
        return []
    grouped: dict[str | None, list[dict[str, Any]]] = {}
    for device in devices:
        grouped.setdefault(device["node"], []).append(device)
    nodes = []
    for node in sorted(grouped, key=lambda n: (n is None, n or "")):
        members = grouped[node]
        nodes.append(
            {
                "node": node,
                "devices": [d["device"] for d in members],
                "workers": sum(len(d["workers"]) for d in members),
                "healthy_workers": sum(d["healthy_workers"] for d in members),
            }
        )
    return nodes


def _decision(raw: Mapping[str, Any]) -> dict[str, Any]:
    reason = _text(raw.get("reason")) or ""
    if len(reason) > _REASON_MAX_CHARS:
        reason = reason[: _REASON_MAX_CHARS - 1] + "…"
    return {
        "ts": _num(raw.get("ts")),
        "model": _text(raw.get("model")),
        "tier": _text(raw.get("tier")),
        "worker": _text(raw.get("worker")),
        "device": _text(raw.get("device")),
        "reason": reason,
        "request_id": _text(raw.get("request_id")),
    }


def _qos_context(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": _text(raw.get("name")) or "",
        "device": _text(raw.get("device")),
        "qos": _text(raw.get("qos")),
        "used_bytes": _int(raw.get("used_bytes")),
        "max_bytes": _int(raw.get("max_bytes")),
        "base_bytes": _int(raw.get("base_bytes")),
        "admitted": _int(raw.get("admitted")),
        "rejected": _int(raw.get("rejected")),
        "shed": _int(raw.get("shed")),
    }


def _residency(raw: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per model a device's residency knows (docs/residency.md), with the device's budget."""
    device = _text(raw.get("device")) or ""
    budget = _int(raw.get("budget_bytes"))
    rows = []
    for model in _mappings(raw.get("models")):
        name = _text(model.get("name"))
        if not name:
            continue
        rows.append(
            {
                "device": device,
                "budget_bytes": budget,
                "resident_bytes": _int(raw.get("resident_bytes")),
                "unaccounted_bytes": _int(raw.get("unaccounted_bytes")),
                "worker": name,
                "resident": bool(model.get("resident")),
                "pinned": bool(model.get("pinned")),
                "size_bytes": _int(model.get("size_bytes")),
                "in_use": _int(model.get("in_use")),
                "idle_s": _num(model.get("idle_s")),
                "keep_alive_s": _num(model.get("keep_alive_s")),
                "loads": _int(model.get("loads")),
                "evictions": _int(model.get("evictions")),
                "load_ms_p50": _num(model.get("load_ms_p50")),
            }
        )
    return rows


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, Mapping):  # keyed by id is as good as a list
        value = list(value.values())
    if not isinstance(value, Iterable) or isinstance(value, str | bytes):
        return []
    return [item for item in value if isinstance(item, Mapping)]


@dataclass(frozen=True)
class _Sample:
    wall_s: float
    monotonic_s: float
    requests_total: int | None
    errors_total: int | None
    p50_ms: float | None
    p99_ms: float | None
    tokens_per_s: float | None


class DashboardFeed:
    """Builds dashboard snapshots from ``engine.status()`` and keeps the history the charts draw.

    ``snapshot()`` never raises: a failing or malformed status becomes a snapshot with an ``error``
    text and whatever could be read. ``clock`` (monotonic) and ``wall`` (epoch seconds) are injectable.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        sample_every_s: float = 0.5,
        rate_window_s: float = RATE_WINDOW_S,
        history_points: int = HISTORY_POINTS,
        max_decisions: int = MAX_DECISIONS,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if sample_every_s <= 0:
            raise ValueError(f"sample_every_s must be > 0, got {sample_every_s}")
        self._engine = engine
        self._sample_every_s = sample_every_s
        self._rate_window_s = rate_window_s
        self._max_decisions = max_decisions
        self._clock = clock
        self._wall = wall
        self._history: deque[_Sample] = deque(maxlen=history_points + 1)  # +1: a rate needs a previous

    def snapshot(self) -> dict[str, Any]:
        """The dashboard's state now, JSON-serialisable (no NaN), as documented in docs/dashboard.md."""
        error: str | None = None
        try:
            status: Any = self._engine.status()
            if not isinstance(status, Mapping):
                raise TypeError(f"status() returned {type(status).__name__}, not a mapping")
        except Exception as exc:  # the page shows the failure instead of going blank
            log.debug("dashboard: engine status failed", exc_info=True)
            error = f"engine status failed: {type(exc).__name__}: {exc}"
            status = {}

        workers = [_worker(w) for w in _mappings(status.get("workers"))]
        decisions = [_decision(d) for d in _mappings(status.get("decisions"))]
        decisions.sort(key=lambda d: d["ts"] if d["ts"] is not None else -math.inf, reverse=True)
        counters = status.get("counters")
        counters = counters if isinstance(counters, Mapping) else {}
        latency = status.get("latency_ms")
        latency = latency if isinstance(latency, Mapping) else {}
        known_rates = [w["tokens_per_s"] for w in workers if w["tokens_per_s"] is not None]
        tokens_per_s = sum(known_rates) if known_rates else None

        self._sample(
            _int(counters.get("requests_total")),
            _int(counters.get("errors_total")),
            _num(latency.get("p50")),
            _num(latency.get("p99")),
            tokens_per_s,
        )
        series = self._series()
        devices = _devices(workers)
        return {
            "ts": self._wall(),
            "error": error,
            "totals": {
                "requests_total": _int(counters.get("requests_total")),
                "errors_total": _int(counters.get("errors_total")),
                "requests_per_s": series["requests_per_s"][-1] if series["t"] else None,
                "p50_ms": _num(latency.get("p50")),
                "p99_ms": _num(latency.get("p99")),
                "tokens_per_s": tokens_per_s,
                "workers": len(workers),
                "healthy_workers": sum(1 for w in workers if w["healthy"] and not w["draining"]),
            },
            "devices": devices,
            "nodes": _nodes(devices),
            "decisions": decisions[: self._max_decisions],
            "qos": [_qos_context(c) for c in _mappings(status.get("qos")) if _text(c.get("name"))],
            "residency": [row for d in _mappings(status.get("residency")) for row in _residency(d)],
            "series": series,
        }

    def _sample(
        self,
        requests_total: int | None,
        errors_total: int | None,
        p50_ms: float | None,
        p99_ms: float | None,
        tokens_per_s: float | None,
    ) -> None:
        now = self._clock()
        if self._history and now - self._history[-1].monotonic_s < self._sample_every_s * 0.9:
            return  # another browser sampled a moment ago: share its point
        self._history.append(
            _Sample(self._wall(), now, requests_total, errors_total, p50_ms, p99_ms, tokens_per_s)
        )

    def _series(self) -> dict[str, list[float | None]]:
        """Columns for the charts; the first sample only anchors the rates and is not drawn. A rate at a
        sample is taken over the ``rate_window_s`` before it (at least back to the previous sample)."""
        samples = list(self._history)
        columns: dict[str, list[float | None]] = {
            "t": [],
            "requests_per_s": [],
            "errors_per_s": [],
            "p50_ms": [],
            "p99_ms": [],
            "tokens_per_s": [],
        }
        start = 0
        for index in range(1, len(samples)):
            current = samples[index]
            while (
                index - start > 1 and current.monotonic_s - samples[start].monotonic_s > self._rate_window_s
            ):
                start += 1
            window = samples[start : index + 1]
            columns["t"].append(current.wall_s)
            columns["requests_per_s"].append(_rate([s.requests_total for s in window], window))
            columns["errors_per_s"].append(_rate([s.errors_total for s in window], window))
            columns["p50_ms"].append(current.p50_ms)
            columns["p99_ms"].append(current.p99_ms)
            columns["tokens_per_s"].append(current.tokens_per_s)
        return columns

    async def events(self, interval_s: float, max_events: int | None = None) -> AsyncIterator[str]:
        """The SSE body: a reconnect hint, then one ``snapshot`` event per interval."""
        yield "retry: 1000\n\n"
        started = self._clock()
        sent = 0
        while True:
            data = json.dumps(self.snapshot(), separators=(",", ":"), allow_nan=False, default=str)
            yield f"event: snapshot\ndata: {data}\n\n"
            sent += 1
            if (max_events is not None and sent >= max_events) or self._clock() - started > STREAM_MAX_S:
                return
            await asyncio.sleep(interval_s)


def _rate(values: list[int | None], window: list[_Sample]) -> float | None:
    """Per-second rate of a counter over ``window``; None when unknown or when it went backwards in the
    window (a reset: the engine restarted its counters)."""
    elapsed_s = window[-1].monotonic_s - window[0].monotonic_s
    known = [v for v in values if v is not None]
    if len(known) != len(values) or elapsed_s <= 0 or any(b < a for a, b in itertools.pairwise(known)):
        return None
    return (known[-1] - known[0]) / elapsed_s


# Files found are kept (a handful, ~60 KB); names not found are not, so probes cannot grow it.
_static_cache: dict[str, bytes] = {}


def _static_bytes(name: str) -> bytes | None:
    """A packaged dashboard file by its name under static/; None for any other name (no traversal)."""
    if name in _static_cache:
        return _static_cache[name]
    if not _STATIC_NAME.match(name) or PurePosixPath(name).suffix not in _CONTENT_TYPES:
        return None
    resource = resources.files("xpuflow.serving").joinpath("static", *name.split("/"))
    try:
        if not resource.is_file():
            return None
        body = resource.read_bytes()
    except OSError:
        return None
    _static_cache[name] = body
    return body


def _static_response(name: str) -> Response:
    from starlette.responses import PlainTextResponse, Response

    body = _static_bytes(name)
    if body is None:
        return PlainTextResponse(
            f"no dashboard file '{name}'", status_code=404, headers={"X-Content-Type-Options": "nosniff"}
        )
    # Vendored files carry their version in the name, so they never change under one URL.
    cache = "public, max-age=86400, immutable" if name.startswith("vendor/") else "no-cache"
    return Response(
        body,
        media_type=_CONTENT_TYPES[PurePosixPath(name).suffix],
        headers={"Cache-Control": cache, "X-Content-Type-Options": "nosniff"},
    )


def dashboard_routes(
    engine: Engine, *, interval_s: float = 0.5, auth: Authenticator | None = None
) -> list[Route]:
    """The dashboard's routes over ``engine``; one snapshot is pushed every ``interval_s`` seconds.

    With ``auth`` the data feeds (``/dashboard/events``, ``/dashboard/snapshot``) need a bearer key with
    the "dashboard" right (401/403 otherwise); the page and its scripts stay open, since they hold no
    data, and the page asks for the key. Without ``auth`` everything is open (the gateway binds to
    127.0.0.1 by default).
    """
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    feed = DashboardFeed(engine, sample_every_s=interval_s)

    async def page(request: Request) -> Response:
        return _static_response_with_csp("dashboard.html")

    from xpuflow.serving.auth import request_authorization

    def authorize(request: Request) -> None:
        # the page and its scripts hold no data: only the feeds need the "dashboard" right
        if auth is not None:
            auth.check(request_authorization(request), "dashboard")

    async def events(request: Request) -> Response:
        authorize(request)
        raw = request.query_params.get("max_events")
        max_events: int | None = None
        if raw is not None:
            if not raw.isdigit() or not 1 <= int(raw) <= 100_000:
                return PlainTextResponse(
                    f"max_events must be an integer from 1 to 100000, got '{raw}'", status_code=400
                )
            max_events = int(raw)
        return StreamingResponse(
            feed.events(interval_s, max_events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def snapshot(request: Request) -> Response:
        authorize(request)
        body = json.dumps(feed.snapshot(), separators=(",", ":"), allow_nan=False, default=str)
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})

    async def static(request: Request) -> Response:
        return _static_response(request.path_params["file"])

    return [
        Route("/dashboard", page, methods=["GET"], name="dashboard"),
        Route("/dashboard/events", events, methods=["GET"], name="dashboard_events"),
        Route("/dashboard/snapshot", snapshot, methods=["GET"], name="dashboard_snapshot"),
        Route("/dashboard/static/{file:path}", static, methods=["GET"], name="dashboard_static"),
    ]


def _static_response_with_csp(name: str) -> Response:
    response = _static_response(name)
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["Cache-Control"] = "no-cache"
    return response
