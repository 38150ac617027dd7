"""The rule chain over a logical model's tiers (strongest first), as an explainable decision.

    router = TierRouter(tiers, [OverrideRule(), ComplexityRule(), VramHeadroomRule(), DefaultRule()])
    ctx = router.context("prove that sqrt(2) is irrational", score=0.81, now_s=clock.monotonic())
    decision = router.decide(ctx)
    decision.tier, decision.reason          # "tier_high", "default: no rule objected; ..."
    [a.to_dict() for a in decision.alternatives]   # every abstention and every refused tier, with why

How the chain runs: rules are asked in order; the first that *chooses* a tier decides. A rule that
*diverts* refuses the wanted tier and names a weaker one; the chain then starts again with that tier as
the wanted one, so every rule judges the tier the request would really go to (a tier with VRAM to spare
but an open latency circuit is skipped too). Diversions only move to weaker tiers, so the chain runs at
most once per tier. A rule that raises is skipped with a logged reason; if no rule decides, the wanted
tier is used. ``TierRouter`` is pure: recording a dispatch (for the SLA probes) is the caller's job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from xpuflow.errors import ConfigError
from xpuflow.routing.rules import RouteContext, Rule, RuleOutcome, TierSpec, tier_for_score
from xpuflow.telemetry.vram import VramSnapshot
from xpuflow.types import Alternative, RoutingDecision

__all__ = ["RuleTrace", "TierRouter", "Walk"]

log = logging.getLogger(__name__)


class Walk(NamedTuple):
    """The chain's raw result: the tier, the rule that chose it and its outcome, the final context
    (after diversions), the abstentions of the last pass as (rule, reason), and each diversion as
    (refused tier, rule, reason)."""

    tier: str
    rule: str
    outcome: RuleOutcome
    ctx: RouteContext
    abstained: list[tuple[str, str]]
    diverted: list[tuple[str, str, str]]


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """One line of an explanation: what ``rule`` said. ``verdict`` is "chose", "diverted", "abstained",
    or "not reached" (a rule after the decision, shown with what it would have said)."""

    rule: str
    verdict: str
    tier: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "verdict": self.verdict, "tier": self.tier, "reason": self.reason}


class TierRouter:
    """Runs ``rules`` over ``tiers`` (strongest first). ``default_tier`` is where a request without a
    score goes (the strongest tier when None)."""

    def __init__(
        self, tiers: Sequence[TierSpec], rules: Sequence[Rule], *, default_tier: str | None = None
    ) -> None:
        if not tiers:
            raise ConfigError("a logical model needs at least one tier", field="tiers")
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ConfigError(f"tier names must be unique, got {names}", field="tiers")
        if not rules:
            raise ConfigError("the rule chain is empty; end it with DefaultRule()", field="rules")
        self._tiers = tuple(tiers)
        self._names = frozenset(names)
        self._rules = tuple(rules)
        if default_tier is not None and default_tier not in self._names:
            raise ConfigError(
                f"default_tier {default_tier!r} is not a tier; tiers: {', '.join(names)}",
                field="default_tier",
            )
        self._default_index = names.index(default_tier) if default_tier is not None else 0
        self._logged: set[str] = set()

    @property
    def tiers(self) -> tuple[TierSpec, ...]:
        return self._tiers

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    def context(
        self,
        prompt: str,
        score: float | None,
        now_s: float,
        *,
        override: str | None = None,
        vram: VramSnapshot | None = None,
        score_error: str | None = None,
        explain: bool = True,
    ) -> RouteContext:
        """The context for one request; the wanted tier follows from the score."""
        wanted = self._default_index if score is None else tier_for_score(score, self._tiers)
        return RouteContext(prompt, score, self._tiers, wanted, now_s, override, vram, score_error, explain)

    def choose(self, ctx: RouteContext) -> Walk:
        """Run the chain. Never raises for a rule's failure. With ``ctx.explain`` False the abstentions
        are not collected (the hot path needs only the tier)."""
        diverted: list[tuple[str, str, str]] = []
        abstained: list[tuple[str, str]] = []
        names = self._names
        explain = ctx.explain
        for _ in range(len(self._tiers)):
            abstained = []
            for rule in self._rules:
                try:
                    outcome = rule.decide(ctx)
                except Exception as exc:  # built-in rules do not raise; this keeps routing alive if one does
                    outcome = self._broken(rule, exc)
                if type(outcome) is not RuleOutcome and not isinstance(outcome, RuleOutcome):
                    outcome = RuleOutcome.abstain(
                        f"returned {type(outcome).__name__}, not a RuleOutcome; skipped"
                    )
                tier = outcome.tier
                if tier is None:
                    if explain:
                        abstained.append((rule.name, outcome.reason))
                    continue
                if type(tier) is not str or tier not in names:
                    abstained.append((rule.name, f"chose unknown tier {str(tier)[:64]!r}; ignored"))
                    continue
                if outcome.divert:
                    index = ctx.index_of(tier)
                    if index is None or index <= ctx.wanted:
                        abstained.append((rule.name, f"diverted to {tier}, which is not weaker; ignored"))
                        continue
                    diverted.append((ctx.wanted_tier.name, rule.name, outcome.reason))
                    ctx = ctx._replace(wanted=index)
                    break
                return Walk(tier, rule.name, outcome, ctx, abstained, diverted)
            else:
                break
        tier = ctx.wanted_tier.name
        outcome = RuleOutcome.choose(tier, f"no rule decided; {tier} is the tier the request wants", 0.5)
        return Walk(tier, "fallback", outcome, ctx, abstained, diverted)

    def decide(self, ctx: RouteContext) -> RoutingDecision:
        """The chain's choice as an explainable ``RoutingDecision``: ``alternatives`` holds each refused
        tier (candidate = tier name) and each abstaining rule (candidate = "rule:<name>")."""
        walk = self.choose(ctx)
        alternatives = [Alternative(tier, f"{rule}: {reason}") for tier, rule, reason in walk.diverted]
        alternatives.extend(Alternative(f"rule:{rule}", reason) for rule, reason in walk.abstained)
        final = walk.ctx
        spec = final.tiers[final.index_of(walk.tier) or 0]
        return RoutingDecision(
            device=spec.device,
            reason=f"{walk.rule}: {walk.outcome.reason}",
            confidence=min(1.0, max(0.0, float(walk.outcome.confidence))),
            alternatives=tuple(alternatives),
            tier=walk.tier,
            details={
                "rule": walk.rule,
                "score": ctx.score,
                "wanted": ctx.wanted_tier.name,
                "diverted_from": [tier for tier, _rule, _reason in walk.diverted],
            },
        )

    def trace(self, ctx: RouteContext) -> tuple[RuleTrace, ...]:
        """Every rule's say, for people (``xpuflow score``): diversions first, then the last pass, with
        the rules after the deciding one marked "not reached" and shown with what they would say."""
        walk = self.choose(ctx)
        lines = [RuleTrace(rule, "diverted", tier, reason) for tier, rule, reason in walk.diverted]
        decided = False
        for rule in self._rules:
            outcome = self._ask(rule, walk.ctx)
            if decided:
                verdict = "not reached"
            elif rule.name == walk.rule and outcome.tier == walk.tier and not outcome.divert:
                verdict, decided = "chose", True
            else:
                verdict = "abstained"
            lines.append(RuleTrace(rule.name, verdict, outcome.tier, outcome.reason))
        if walk.rule == "fallback":
            lines.append(RuleTrace("fallback", "chose", walk.tier, walk.outcome.reason))
        return tuple(lines)

    def _ask(self, rule: Rule, ctx: RouteContext) -> RuleOutcome:
        try:
            outcome = rule.decide(ctx)
        except Exception as exc:
            return self._broken(rule, exc)
        if not isinstance(outcome, RuleOutcome):
            return RuleOutcome.abstain(f"returned {type(outcome).__name__}, not a RuleOutcome; skipped")
        return outcome

    def _broken(self, rule: Rule, exc: Exception) -> RuleOutcome:
        name = getattr(rule, "name", type(rule).__name__)
        reason = f"raised {type(exc).__name__}: {str(exc)[:200]}; skipped"
        if name not in self._logged:
            self._logged.add(name)
            log.warning("routing rule %r %s", name, reason, exc_info=exc)
        else:
            log.debug("routing rule %r %s", name, reason)
        return RuleOutcome.abstain(reason)
