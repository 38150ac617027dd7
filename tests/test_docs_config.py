"""docs/config.md stays true: its example validates and every config field is documented."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from xpuflow import config as cfg

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_full_example_validates() -> None:
    text = DOC.read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    parsed = cfg.parse_config(yaml.safe_load(block.group(1)))
    assert [m.name for m in parsed.models] == ["chat-main", "embed"]


def test_every_field_is_documented() -> None:
    text = DOC.read_text()
    for model in (
        cfg.XpuflowConfig,
        cfg.DeploymentConfig,
        cfg.BatchingConfig,
        cfg.LogicalModelConfig,
        cfg.TierRef,
        cfg.ApiKeyConfig,
        cfg.GatewayConfig,
        cfg.DeclaredResource,
        cfg.PartitionConfig,
        cfg.QoSConfig,
        cfg.QoSContextConfig,
        cfg.ClusterConfig,
        cfg.ResidencyConfig,
    ):
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{model.__name__}.{name} is missing from docs/config.md"
