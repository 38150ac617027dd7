"""``xpuflow serve [CONFIG]`` and ``xpuflow check CONFIG``."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Annotated, Any

import typer

from xpuflow.errors import XpuflowError

__all__ = ["register"]


def _settings(config: Any) -> Any:
    from xpuflow.errors import ConfigError
    from xpuflow.serving.settings import ApiKey, GatewaySettings

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
    return GatewaySettings(
        api_keys=api_keys,
        admin_keys=admin_keys,
        max_body_bytes=config.gateway.max_body_bytes,
        metrics_require_key=config.gateway.metrics_require_key,
        dashboard_require_key=config.gateway.dashboard_require_key,
    )


def _banner(url: str, orchestrator: Any, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"xpuflow is serving on {url}")
    for column in ("model", "task", "tier", "worker", "device", "backend"):
        table.add_column(column)
    for model in orchestrator.models():
        for tier, workers in orchestrator._models[model.name].tiers:
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


async def _serve(config: Any, config_path: Path | None, host: str, port: int) -> None:
    import uvicorn
    from rich.console import Console

    from xpuflow.build.builder import RichProgress
    from xpuflow.orchestrator import Orchestrator
    from xpuflow.serving.app import create_app
    from xpuflow.serving.auth import Authenticator

    console = Console(stderr=True)
    settings = _settings(config)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise typer.BadParameter(
            f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port"
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
        server = uvicorn.Server(
            uvicorn.Config(
                app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=3
            )
        )
        shown_host = f"[{host}]" if ":" in host else host
        _banner(f"http://{shown_host}:{bound_port}", orchestrator, Console())
        await server.serve(sockets=[sock])
    finally:
        await orchestrator.stop()
        sock.close()


def register(app: typer.Typer) -> None:
    from xpuflow.cli.main import fail

    @app.command()
    def serve(
        config: Annotated[
            Path | None,
            typer.Argument(help="YAML config; without it, the embedded default for this machine."),
        ] = None,
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    ) -> None:
        """Serve every configured model behind one OpenAI-compatible endpoint."""
        from xpuflow.config import load_config
        from xpuflow.defaults import embedded_config

        try:
            cfg = load_config(config) if config is not None else embedded_config()
            asyncio.run(_serve(cfg, config, host, port))
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
