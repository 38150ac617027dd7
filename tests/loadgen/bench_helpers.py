"""A real uvicorn server on 127.0.0.1 for the load generator tests, and what the tests share."""

from __future__ import annotations

from dataclasses import dataclass

from xpuflow.testing.fake_engine import FakeEngine

API_KEY = "sk-bench-test-0123456789"


@dataclass
class Gateway:
    url: str
    engine: FakeEngine
