"""models[].rules: custom tier rules named in the config run in xpuflow serve's routers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from xpuflow.backends.base import GenerationParams
from xpuflow.config import parse_config
from xpuflow.discovery.inventory import Inventory
from xpuflow.engine import InferenceCall
from xpuflow.errors import ConfigError
from xpuflow.orchestrator import Orchestrator
from xpuflow.types import RequestKind, Resource, ResourceType

INVENTORY = Inventory.of([Resource("cpu", ResourceType.CPU, "cpu", {"memory_bytes": 8 << 30})])


def config(rules: list[str]) -> Any:
    deployments = [{"name": n, "backend": "fake", "device": "cpu"} for n in ("big", "small")]
    tiers = [{"name": "tier_high", "deployments": ["big"]}, {"name": "tier_low", "deployments": ["small"]}]
    routing = {"complexity_threshold": 0.0, "vram_source": "none"}  # everything to tier_high otherwise
    model = {"name": "chat", "tiers": tiers, "routing": routing, "rules": rules}
    return parse_config({"deployments": deployments, "models": [model]})


def call(text: str) -> InferenceCall:
    return InferenceCall("chat", RequestKind.CHAT, [{"role": "user", "content": text}], GenerationParams())


def test_a_rule_named_in_the_config_decides_the_tier() -> None:
    async def go() -> tuple[str | None, str | None, str]:
        cfg = config(["tier_rules_example:Never", "tier_rules_example:urgent_to_small"])
        async with Orchestrator(cfg, inventory=INVENTORY) as orch:
            urgent = (await orch.complete(call("urgent: the server is down"))).decision
            plain = (await orch.complete(call("tell me a story"))).decision
            return urgent.tier, plain.tier, urgent.reason

    urgent, plain, reason = asyncio.run(go())
    assert urgent == "tier_low"
    assert plain == "tier_high"
    assert "urgent_to_small" in reason


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("tier_rules_example:missing", "cannot be loaded"),
        ("no_such_module_anywhere:rule", "cannot be loaded"),
        ("tier_rules_example:NOT_A_RULE", "neither a function nor an object with decide"),
    ],
)
def test_a_rule_that_cannot_load_fails_start_up_naming_it(ref: str, match: str) -> None:
    async def go() -> None:
        async with Orchestrator(config([ref]), inventory=INVENTORY):
            pass

    with pytest.raises(ConfigError, match=match):
        asyncio.run(go())


def test_a_rule_reference_must_name_module_and_attribute() -> None:
    with pytest.raises(ConfigError, match=r"package\.module:name"):
        config(["just_a_name"])
