"""``xpuflow serve [CONFIG]`` and ``xpuflow check CONFIG``.

Where it listens: ``--host``/``--port`` when given, else the config's ``gateway.host``/``gateway.port``
(127.0.0.1:8000 by default). On SIGTERM or SIGINT it drains (``serving.server``) and then stops the
orchestrator; a second signal stops it at once.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from xpuflow.errors import ConfigError, XpuflowError

__all__ = ["register"]


#: How long the server waits for connections to close once the drain is over (idle keep-alive ones close
#: at once; a dashboard's event stream is cut after this).
_CLOSE_GRACE_S = 3


def _allowed_hosts(config: Any, host: str) -> tuple[str, ...]:
    from xpuflow.serving.hosts import is_loopback_address
    from xpuflow.serving.settings import LOOPBACK_HOSTS

    if config.gateway.allowed_hosts is not None:
        return tuple(config.gateway.allowed_hosts)
    return LOOPBACK_HOSTS if is_loopback_address(host) else ("*",)


def _settings(config: Any, host: str | None = None) -> Any:
    from xpuflow.errors import ConfigError
    from xpuflow.serving.settings import ApiKey, CorsPolicy, GatewaySettings

    api_keys: dict[str, ApiKey] = {}
    admin_keys: dict[str, str] = {}
    for entry in config.api_keys:
        secret = entry.key if entry.key is not None else os.environ.get(entry.key_env or "", "")
        if not secret:
            raise ConfigError(
                f"api key '{entry.name}': environment variable {entry.key_env} is empty or unset",
                field="api_keys.key_env",
            )
        rights = set(entry.rights)
        if "admin" in rights and "infer" in rights:
            raise ConfigError(
                f"api key '{entry.name}' has both infer and admin rights; the admin API needs its own key",
                field="api_keys.rights",
            )
        if rights == {"admin"}:
            admin_keys[secret] = entry.name
        else:  # an operator's key may hold admin with metrics and dashboard
            api_keys[secret] = ApiKey(entry.name, frozenset(rights), entry.qos_class)
    gateway = config.gateway
    cors = None
    if gateway.cors is not None:
        cors = CorsPolicy(
            allow_origins=tuple(gateway.cors.allow_origins),
            allow_methods=tuple(gateway.cors.allow_methods),
            allow_headers=tuple(gateway.cors.allow_headers),
            allow_credentials=gateway.cors.allow_credentials,
            max_age_s=gateway.cors.max_age_s,
        )
    return GatewaySettings(
        api_keys=api_keys,
        admin_keys=admin_keys,
        max_body_bytes=gateway.max_body_bytes,
        request_timeout_s=gateway.request_timeout_s,
        default_max_tokens=gateway.default_max_tokens,
        max_tokens_limit=gateway.max_tokens_limit,
        max_embedding_inputs=gateway.max_embedding_inputs,
        owned_by=gateway.owned_by,
        metrics_require_key=gateway.metrics_require_key,
        dashboard_require_key=gateway.dashboard_require_key,
        cors=cors,
        allowed_hosts=_allowed_hosts(config, host if host is not None else gateway.host),
    )


def listen_address(config: Any, host: str | None, port: int | None) -> tuple[str, int]:
    """Where ``serve`` listens: the CLI flag, else the config's ``gateway`` section (whose defaults are
    127.0.0.1 and 8000)."""
    return (
        host if host is not None else config.gateway.host,
        port if port is not None else config.gateway.port,
    )


def _banner(url: str, orchestrator: Any, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"xpuflow is serving on {url}")
    for column in ("model", "task", "tier", "worker", "device", "backend"):
        table.add_column(column)
    for model in orchestrator.models():
        for tier, workers in orchestrator.router(model.name).tiers:
            for worker in workers:
                backend = orchestrator.placements[worker.deployment].backend
                table.add_row(model.name, model.task, tier, worker.worker_id, worker.device, backend)
    console.print(table)
    chat = next((m.name for m in orchestrator.models() if m.task == "chat"), None)
    if chat:
        console.print("Try it:")
        console.print(
            f"  curl {url}/v1/chat/completions -H 'content-type: application/json' "
            f'-d \'{{"model": "{chat}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'',
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"Dashboard: {url}/dashboard   Metrics: {url}/metrics   Stop: Ctrl+C")


async def _start_grpc(config: Any, app: Any, host: str, console: Any) -> Any:
    """The Open Inference Protocol gRPC server when ``gateway.grpc_port`` is set (docs/oip.md)."""
    port = getattr(config.gateway, "grpc_port", None)
    if port is None:
        return None
    try:
        from xpuflow.serving.oip_grpc import OIPGrpcServer
        from xpuflow.serving.oip_service import OIPService

        server = OIPGrpcServer(OIPService(app.state.gateway), host, port)
        bound = await server.start()
    except ImportError as exc:
        raise typer.BadParameter(
            f"gateway.grpc_port is set but gRPC is not installed ({exc}); pip install 'xpuflow[oip]'"
        ) from exc
    except OSError as exc:
        raise typer.BadParameter(f"{exc}; choose another gateway.grpc_port") from exc
    shown_host = f"[{host}]" if ":" in host else host
    console.print(f"Open Inference Protocol gRPC: {shown_host}:{bound}", highlight=False)
    return server


def _http_protocol() -> Any:
    """The gateway's HTTP protocol (``serving/http_protocol.py``: one write per small response, disconnects
    without a task), or uvicorn's own choice where httptools is not installed or uvicorn is a release the
    protocol was not written for."""
    try:
        from xpuflow.serving.http_protocol import GatewayHttpProtocol, supports_installed_uvicorn
    except ImportError:
        return "auto"
    return GatewayHttpProtocol if supports_installed_uvicorn() else "auto"


async def _serve(config: Any, config_path: Path | None, host: str, port: int) -> None:
    import uvicorn
    from rich.console import Console

    from xpuflow.artifacts.builder import RichProgress
    from xpuflow.orchestrator import Orchestrator
    from xpuflow.serving.app import create_app
    from xpuflow.serving.auth import Authenticator
    from xpuflow.serving.server import GatewayServer, listen_socket, settle_heap

    console = Console(stderr=True)
    settings = _settings(config, host)
    try:
        sock = listen_socket(host, port)
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
            "(or gateway.port in the config)"
        ) from exc
    bound_port = sock.getsockname()[1]
    with RichProgress(console, transient=True) as progress:
        orchestrator = Orchestrator(config, progress=progress, config_path=config_path)
        with console.status("placing, building and loading models..."):
            await orchestrator.start()
    try:
        routes: list[Any] = []
        try:
            from xpuflow.serving.dashboard import dashboard_routes

            auth = Authenticator(settings) if settings.dashboard_require_key else None
            routes = list(dashboard_routes(orchestrator, auth=auth))
        except ImportError:
            pass
        app = create_app(orchestrator, settings, routes=routes)
        drain_timeout_s = config.gateway.drain_timeout_s

        def draining(in_flight: int, timeout_s: float) -> None:
            console.print(
                f"shutting down: /ready answers 503, new requests 503; waiting up to {timeout_s:g} s for "
                f"{in_flight} request(s) in flight (signal again to stop at once)",
                highlight=False,
            )

        server = GatewayServer(
            uvicorn.Config(
                app,
                http=_http_protocol(),
                proxy_headers=False,  # X-Forwarded-* are not trusted, and nothing here reads the client
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=_CLOSE_GRACE_S,
            ),
            app.state.gateway.drain,
            drain_timeout_s=drain_timeout_s,
            on_drain_start=draining,
        )
        shown_host = f"[{host}]" if ":" in host else host
        grpc_server = await _start_grpc(config, app, host, console)
        _banner(f"http://{shown_host}:{bound_port}", orchestrator, Console())
        settle_heap()
        try:
            await server.serve(sockets=[sock])
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace_s=_CLOSE_GRACE_S)
    finally:
        await orchestrator.stop()
        sock.close()


def _run(main: Any, event_loop: str) -> None:
    """Run the server on uvloop where it is installed (``gateway.event_loop: auto``; its loop costs less
    per request than asyncio's), else on asyncio's own loop."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise ConfigError(
                    "gateway.event_loop is uvloop but uvloop is not installed; pip install uvloop, or set "
                    "event_loop: auto",
                    field="gateway.event_loop",
                ) from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def register(app: typer.Typer) -> None:
    from xpuflow.cli.main import fail

    @app.command()
    def serve(
        config: Annotated[
            Path | None,
            typer.Argument(help="YAML config; without it, the embedded default for this machine."),
        ] = None,
        host: Annotated[
            str | None,
            typer.Option(help="Address to listen on [default: gateway.host of the config, 127.0.0.1]."),
        ] = None,
        port: Annotated[
            int | None,
            typer.Option(
                min=0,
                max=65535,
                help="Port to listen on, 0 for any free one [default: gateway.port of the config, 8000].",
            ),
        ] = None,
    ) -> None:
        """Serve every configured model behind one OpenAI-compatible endpoint."""
        from xpuflow.config import load_config
        from xpuflow.defaults import embedded_config

        # transformers draws a "Loading weights" bar per model under our own progress display; the
        # banner and the build bars say what is loading (set before transformers is imported)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            cfg = load_config(config) if config is not None else embedded_config()
            _run(_serve(cfg, config, *listen_address(cfg, host, port)), cfg.gateway.event_loop)
        except XpuflowError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            pass

    @app.command()
    def check(config: Annotated[Path, typer.Argument(help="YAML config to validate.")]) -> None:
        """Validate a config file: every error names the field, the bad value and the fix."""
        from rich.console import Console

        from xpuflow.config import load_config

        try:
            cfg = load_config(config)
            _settings(cfg)
        except XpuflowError as exc:
            fail(str(exc))
        Console().print(
            f"[green]ok[/]: {config} — {len(cfg.deployments)} deployment(s), "
            f"{len(cfg.models) or len(cfg.deployments)} model(s)"
        )
