"""The harness of tests/test_docs_features_wired.py: ``xpuflow serve`` as cli/serve.py builds it, run
in-process (``served``), the feature registry (``feature``, ``custom``) and an OpenAI-style upstream on
127.0.0.1 for the remote cases."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

try:  # the maintained fork the openai client depends on here; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from xpuflow.cli import serve as serve_cli
from xpuflow.config import load_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.orchestrator import Orchestrator
from xpuflow.serving.app import create_app
from xpuflow.serving.auth import Authenticator
from xpuflow.serving.dashboard import dashboard_routes
from xpuflow.types import Resource, ResourceType

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GIB = 1 << 30
HOST = "127.0.0.1"
INVENTORY = Inventory.of([Resource("cpu", ResourceType.CPU, "cpu", {"memory_bytes": 16 * GIB})])
ADMIN = "sk-admin-docs"
USER = "sk-user-docs"
KEY_ENV = "XPUFLOW_TEST_DOCS_FEATURE_KEY"
MOCK_UPSTREAM = ROOT / "tests" / "orchestrator" / "mock_upstream.py"
CASE_TIMEOUT_S = 30
T = TypeVar("T")


# -- how xpuflow serve builds its gateway ------------------------------------------------------------


@dataclass
class Served:
    """What ``xpuflow serve CONFIG`` runs, reachable in-process."""

    path: Path
    orch: Orchestrator
    app: Any
    client: httpx.AsyncClient

    async def chat(
        self,
        model: str = "chat",
        text: str = "hello there",
        headers: dict[str, str] | None = None,
        **body: Any,
    ) -> httpx.Response:
        payload = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **body}
        return await self.client.post("/v1/chat/completions", json=payload, headers=headers or {})

    async def metrics(self, headers: dict[str, str] | None = None) -> str:
        answer = await self.client.get("/metrics", headers=headers or {})
        assert answer.status_code == 200, answer.text
        return answer.text

    async def admin(self, method: str, path: str) -> httpx.Response:
        return await self.client.request(method, path, headers=bearer(ADMIN))

    async def workers(self) -> dict[str, dict[str, Any]]:
        answer = await self.admin("GET", "/admin/workers")
        assert answer.status_code == 200, answer.text
        return {w["worker_id"]: w for w in answer.json()["workers"]}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def served(data: dict[str, Any], tmp: Path, *, host: str = HOST) -> AsyncIterator[Served]:
    """``xpuflow serve CONFIG --host HOST`` as cli/serve.py builds it, without the socket."""
    data = {"artifact_dir": str(tmp / "artifacts"), **data}
    path = tmp / "xpuflow.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_config(path)
    settings = serve_cli._settings(config, host)
    orch = Orchestrator(config, config_path=path, inventory=INVENTORY)
    await orch.start()
    try:
        auth = Authenticator(settings) if settings.dashboard_require_key else None
        app = create_app(orch, settings, routes=list(dashboard_routes(orch, auth=auth)))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
            yield Served(path, orch, app, client)
    finally:
        await orch.stop()


def fake(name: str = "chat", **kw: Any) -> dict[str, Any]:
    options = {"service_time_s": 0.0, **kw.pop("options", {})}
    return {"name": name, "backend": "fake", "device": "cpu", "options": options, **kw}


def one(*deployments: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"deployments": list(deployments) or [fake()], **top}


def two_tiers(routing: dict[str, Any] | None = None, **tier_high: Any) -> dict[str, Any]:
    return {
        "deployments": [fake("big"), fake("small")],
        "models": [
            {
                "name": "chat",
                "tiers": [
                    {"name": "tier_high", "deployments": ["big"], **tier_high},
                    {"name": "tier_low", "deployments": ["small"]},
                ],
                "routing": routing or {},
            }
        ],
    }


KEYS = {
    "api_keys": [
        {"name": "app", "key": USER, "rights": ["infer"]},
        {"name": "ops", "key": ADMIN, "rights": ["admin", "metrics", "dashboard"]},
    ]
}


def metric(text: str, name: str, **labels: str) -> list[float]:
    """The values of ``name`` whose labels include ``labels``."""
    values = []
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            values.append(float(value))
    return values


async def until(predicate: Callable[[], Any], what: str) -> None:
    """Wait (bounded by the case's timeout) until ``predicate()`` holds; no timing is asserted."""
    while not predicate():
        await asyncio.sleep(0.01)
    assert predicate(), what


def reachable(root: object, cls: type[T], depth: int = 4) -> list[T]:
    """Every ``cls`` instance reachable from ``root`` through attributes, mappings and sequences (so the
    checks do not depend on where the orchestrator keeps its parts while it is being restructured)."""
    found: list[T] = []
    seen: set[int] = set()

    def walk(obj: object, left: int) -> None:
        if id(obj) in seen or left < 0:
            return
        seen.add(id(obj))
        if isinstance(obj, cls):
            found.append(obj)
            return
        if isinstance(obj, dict):
            children: list[object] = list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            children = list(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("xpuflow"):
            children = list(vars(obj).values())
        else:
            return
        for child in children:
            walk(child, left - 1)

    walk(root, depth)
    return found


def queued_on(orch: Orchestrator, worker: str) -> int:
    status = {w["worker_id"]: w for w in orch.status()["workers"]}
    depth = status[worker]["queue_depth"]
    return sum(depth.values()) if isinstance(depth, dict) else int(depth)


def running_on(orch: Orchestrator, worker: str) -> int:
    return int({w["worker_id"]: w for w in orch.status()["workers"]}[worker]["in_flight"])


# -- the feature table ---------------------------------------------------------------------------------

Check = Callable[[Served], Awaitable[None]]


@dataclass(frozen=True)
class Feature:
    id: str
    doc: str  # docs/<file>.md
    quote: str  # a phrase of that file that promises the feature
    run: Callable[[Path], Awaitable[None]]
    gap: str | None = None  # why serve does not reach it: the case is a strict xfail
    marks: tuple[Any, ...] = field(default=())


FEATURES: list[Feature] = []


def feature(
    id: str, doc: str, quote: str, config: dict[str, Any] | None = None, *, gap: str | None = None
) -> Callable[[Check], Check]:
    """Register ``check`` as the case for one documented feature, run against ``config`` served."""

    def register(check: Check) -> Check:
        async def run(tmp: Path) -> None:
            async with served(config if config is not None else one(), tmp) as s:
                await check(s)

        FEATURES.append(Feature(id, doc, quote, run, gap))
        return check

    return register


def custom(id: str, doc: str, quote: str, *, gap: str | None = None) -> Callable[[Any], Any]:
    """Register a case that builds what it serves itself (upstream servers, two gateways, ...)."""

    def register(run: Callable[[Path], Awaitable[None]]) -> Callable[[Path], Awaitable[None]]:
        FEATURES.append(Feature(id, doc, quote, run, gap))
        return run

    return register


# -- an upstream model server ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def openai_upstream(
    with_metrics: bool = True,
    status: int = 200,
    metrics_text: str = "vllm:num_requests_waiting 3\nvllm:num_requests_running 1\n",
) -> AsyncIterator[tuple[str, Counter[str]]]:
    """An OpenAI-style server on 127.0.0.1 with /health and (optionally) vLLM's /metrics gauges
    (``metrics_text``; without ``with_metrics`` a 404); with ``status`` its chat answers that error
    (with ``Retry-After: 7``)."""
    from aiohttp import web

    hits: Counter[str] = Counter()

    async def chat(request: web.Request) -> web.Response:
        hits["chat"] += 1
        if status != 200:
            error = {"error": {"message": f"upstream says {status}", "type": "x"}}
            return web.json_response(error, status=status, headers={"Retry-After": "7"})
        reply = {"role": "assistant", "content": "from upstream"}
        return web.json_response(
            {"id": "x", "object": "chat.completion", "model": "mock", "created": 0,
             "choices": [{"index": 0, "message": reply, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
        )  # fmt: skip

    async def health(request: web.Request) -> web.Response:
        hits["health"] += 1
        return web.Response(text="ok")

    async def metrics(request: web.Request) -> web.Response:
        hits["metrics"] += 1
        if not with_metrics:
            return web.Response(status=404)
        return web.Response(text=metrics_text)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://{HOST}:{port}", hits
    finally:
        await runner.cleanup()


def remote_deployment(url: str, **options: Any) -> dict[str, Any]:
    opts = {"base_url": url, "model": "mock", "health_interval_s": 0.05, **options}
    return {"name": "chat", "backend": "remote_openai", "options": opts}
