"""Routing: which tier of a logical model takes a request (and, later, which worker inside it).

    from xpuflow.routing import AdaptiveRouter, RoutingConfig

    with AdaptiveRouter(RoutingConfig(complexity_threshold=0.19, vram_headroom_gb=1.5)) as router:
        tier = router.route("Prove the Riemann hypothesis step by step")   # "tier_high"
        router.observe(tier, latency_ms=840.0)

The tier choice is a chain of rules (``rules``) over the tiers (``tier_router``): override -> custom
rules -> complexity threshold -> VRAM headroom -> latency SLA (``sla``) -> default. docs/routing.md
explains each rule, the half-open SLA circuit and every config field.
"""

from __future__ import annotations

from xpuflow.routing.adaptive import (
    AdaptiveRouter,
    Calibration,
    RoutingConfig,
    Scorer,
    TierConfig,
    load_config,
    parse_config,
)
from xpuflow.routing.rules import (
    ComplexityRule,
    CustomRule,
    DefaultRule,
    LatencySlaRule,
    OverrideRule,
    RouteContext,
    Rule,
    RuleOutcome,
    TierSpec,
    VramHeadroomRule,
)
from xpuflow.routing.sla import CircuitState, LatencyCircuit, SlaPolicy, SlaTracker
from xpuflow.routing.tier_router import RuleTrace, TierRouter

__all__ = [
    "AdaptiveRouter",
    "Calibration",
    "CircuitState",
    "ComplexityRule",
    "CustomRule",
    "DefaultRule",
    "LatencyCircuit",
    "LatencySlaRule",
    "OverrideRule",
    "RouteContext",
    "RoutingConfig",
    "Rule",
    "RuleOutcome",
    "RuleTrace",
    "Scorer",
    "SlaPolicy",
    "SlaTracker",
    "TierConfig",
    "TierRouter",
    "TierSpec",
    "VramHeadroomRule",
    "load_config",
    "parse_config",
]
