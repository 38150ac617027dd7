from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from oip_serve import FAKE_CONFIG, Served, xpuflow_serve


@pytest.fixture(scope="session")
def fake_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``xpuflow serve`` with fake embedding, tensor and chat models, one key, HTTP and gRPC."""
    with xpuflow_serve(Path(tmp_path_factory.mktemp("oip-gateway")), FAKE_CONFIG) as served:
        yield served
