"""Fixtures of the simulator tests: two device models and a two-deployment fleet config in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA_TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "traces"

BIG = """name: big
max_batch_size: 8
overhead_s: 0.002
prefill_tokens_per_s: {1: 8000, 8: 12000}
decode_tokens_per_s: {1: 60, 8: 360}
"""
SMALL = """name: small
max_batch_size: 4
prefill_tokens_per_s: {1: 2000}
decode_tokens_per_s: {1: 20, 4: 60}
"""
FLEET = """deployments:
  - {name: big, backend: fake, replicas: 2, max_seq_len: 32768, options: {device_model: big.yaml}}
  - {name: small, backend: fake, replicas: 4, max_seq_len: 32768, options: {device_model: small.yaml}}
models:
  - {name: chat, tiers: [{name: main, deployments: [big, small]}]}
"""


@pytest.fixture
def fleet_file(tmp_path: Path) -> Path:
    (tmp_path / "big.yaml").write_text(BIG)
    (tmp_path / "small.yaml").write_text(SMALL)
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET)
    return path


@pytest.fixture
def traces_dir() -> Path:
    if not (DATA_TRACES / "AzureLLMInferenceTrace_conv.csv").is_file():
        pytest.skip(f"the shared traces are not beside the checkout ({DATA_TRACES})")
    return DATA_TRACES
