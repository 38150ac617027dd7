"""Custom tier rules loaded by name from a config (tests/orchestrator/test_custom_rules.py)."""

from __future__ import annotations

from xpuflow.routing import RouteContext, RuleOutcome


def urgent_to_small(ctx: RouteContext) -> str | None:
    return "tier_low" if "urgent" in ctx.prompt else None


class Never:
    name = "never"

    def decide(self, ctx: RouteContext) -> RuleOutcome:
        return RuleOutcome.abstain("never decides")


NOT_A_RULE = 42
