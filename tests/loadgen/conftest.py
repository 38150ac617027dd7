"""Fixtures for the load generator tests: the gateway over a FakeEngine under a real uvicorn server on
127.0.0.1, and a typer app holding the ``bench`` command."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import typer
from bench_helpers import API_KEY, Gateway

from xpuflow.cli.bench import register
from xpuflow.serving.app import create_app
from xpuflow.serving.settings import GatewaySettings
from xpuflow.testing.fake_engine import FakeEngine
from xpuflow.testing.live_server import live_server


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    """One gateway for the module; tests read ``engine.calls`` from the index they started at."""
    engine = FakeEngine(service_time_s=0.002, chunk_interval_s=0.0005)
    with live_server(create_app(engine, GatewaySettings())) as url:
        yield Gateway(url, engine)


@pytest.fixture(scope="module")
def keyed_gateway() -> Iterator[Gateway]:
    engine = FakeEngine()
    with live_server(create_app(engine, GatewaySettings(api_keys={API_KEY: "bench"}))) as url:
        yield Gateway(url, engine)


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer(add_completion=False)

    @app.callback()
    def main() -> None:
        """xpuflow (test app)."""

    register(app)
    return app
