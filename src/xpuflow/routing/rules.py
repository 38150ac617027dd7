"""The rules that choose a tier, and the context they read.

A rule looks at a ``RouteContext`` and returns a ``RuleOutcome``: a tier it chooses, a weaker tier it
diverts to (it refuses the tier the request wants), or an abstention. Every outcome carries a reason a
person can read; the router puts them in the decision. The built-in chain, in order::

    override -> custom rules -> complexity -> VRAM headroom -> latency SLA -> default

Tiers are ordered strongest first. The complexity score picks the tier a request *wants* (the strongest
whose ``min_score`` the score reaches); the complexity rule chooses the weakest tier outright for easy
requests, the capacity rules (VRAM headroom, latency SLA) divert a request away from a wanted tier that
cannot take it now, and the default rule sends it to the tier it wants. A custom rule is any object with
``name`` and ``decide(ctx)``, or a plain function ``ctx -> tier name | None``::

    def long_context_to_gpu(ctx: RouteContext) -> str | None:
        return "tier_high" if len(ctx.prompt) > 20_000 else None

    AdaptiveRouter(config, rules=[long_context_to_gpu])

Rules are pure: they read the context (and, for the SLA rule, the circuits' current state) and change
nothing. They are cheap: the whole chain runs in a few microseconds on every request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from xpuflow.routing.sla import CircuitState, SlaTracker
from xpuflow.telemetry.vram import GIB, VramSnapshot

__all__ = [
    "ComplexityRule",
    "CustomRule",
    "DefaultRule",
    "LatencySlaRule",
    "OverrideRule",
    "RouteContext",
    "Rule",
    "RuleOutcome",
    "TierSpec",
    "VramHeadroomRule",
    "margin_confidence",
    "tier_for_score",
]

log = logging.getLogger(__name__)


class RuleOutcome(NamedTuple):
    """What one rule said. ``tier`` None is an abstention; ``divert`` marks a refusal of the wanted tier
    in favour of ``tier`` (a weaker one), after which the chain runs again for that tier."""

    tier: str | None
    reason: str
    confidence: float = 1.0
    divert: bool = False

    @classmethod
    def choose(cls, tier: str, reason: str, confidence: float = 1.0) -> RuleOutcome:
        return cls(tier, reason, confidence, False)

    @classmethod
    def abstain(cls, reason: str) -> RuleOutcome:
        return cls(None, reason, 0.0, False)

    @classmethod
    def divert_to(cls, tier: str, reason: str) -> RuleOutcome:
        return cls(tier, reason, 1.0, True)


@dataclass(frozen=True, slots=True)
class TierSpec:
    """One tier as the rules see it. ``device`` ("cuda:0") is the GPU whose free memory the VRAM rule
    watches (None: no GPU to watch); ``min_score`` is the complexity score from which requests want this
    tier (the weakest tier takes everything below its stronger neighbour's threshold)."""

    name: str
    device: str | None = None
    min_score: float = 0.0
    vram_headroom_bytes: int = 0
    latency_sla_ms: float = 0.0


class RouteContext(NamedTuple):
    """Everything a rule may read about one request (an immutable record, cheap to build per request).

    ``prompt`` is the request text (decoded, and cut to the router's scoring limit); ``score`` is its
    complexity in [0, 1], or None when scoring failed (``score_error`` says why); ``wanted`` is the index
    in ``tiers`` of the tier the request asks for; ``now_s`` is the router clock's monotonic time.
    ``explain`` is False on the hot path (``AdaptiveRouter.route``), where no one reads abstention
    reasons: a rule may then return a short constant reason instead of formatting one.
    """

    prompt: str
    score: float | None
    tiers: tuple[TierSpec, ...]
    wanted: int
    now_s: float
    override: str | None = None
    vram: VramSnapshot | None = None
    score_error: str | None = None
    explain: bool = True

    @property
    def wanted_tier(self) -> TierSpec:
        return self.tiers[self.wanted]

    @property
    def is_last(self) -> bool:
        """Whether the wanted tier is the weakest (nowhere left to divert to)."""
        return self.wanted == len(self.tiers) - 1

    def index_of(self, tier: str) -> int | None:
        for index, spec in enumerate(self.tiers):
            if spec.name == tier:
                return index
        return None

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.tiers)


@runtime_checkable
class Rule(Protocol):
    """A link of the chain: ``name`` for reasons and logs, ``decide`` for the verdict.

    Example::

        class NightShift:
            name = "night_shift"
            def decide(self, ctx: RouteContext) -> RuleOutcome:
                if is_night():
                    return RuleOutcome.choose("tier_low", "night: the GPU tier is reserved for batch jobs")
                return RuleOutcome.abstain("daytime")
    """

    @property
    def name(self) -> str: ...

    def decide(self, ctx: RouteContext) -> RuleOutcome: ...


def tier_for_score(score: float, tiers: tuple[TierSpec, ...]) -> int:
    """The index of the strongest tier whose ``min_score`` the score reaches (the weakest tier if none)."""
    last = len(tiers) - 1
    for index in range(last):
        if score >= tiers[index].min_score:
            return index
    return last


def margin_confidence(score: float | None, ctx: RouteContext) -> float:
    """How far the score sits from the nearest tier threshold: 0.5 on it, 1.0 at 0.25 or more away."""
    if score is None:
        return 0.5
    tiers, wanted = ctx.tiers, ctx.wanted
    gap = 0.25
    if wanted < len(tiers) - 1:
        gap = abs(score - tiers[wanted].min_score)
    if wanted > 0:
        gap = min(gap, abs(tiers[wanted - 1].min_score - score))
    return 0.5 + min(0.5, 2.0 * gap)


_NO_OVERRIDE = RuleOutcome.abstain("no tier override")
_QUIET_WANTS_STRONGER = RuleOutcome.abstain("the score reaches a stronger tier's threshold")
_QUIET_HEADROOM_OK = RuleOutcome.abstain("enough free VRAM")
_QUIET_SLA_OK = RuleOutcome.abstain("latency within the SLA")


class OverrideRule:
    """The client named a tier (header or request field): it wins, if the tier exists."""

    name = "override"

    def decide(self, ctx: RouteContext) -> RuleOutcome:
        override = ctx.override
        if override is None:
            return _NO_OVERRIDE
        if ctx.index_of(override) is None:
            return RuleOutcome.abstain(
                f"override {override[:64]!r} is not a tier here (tiers: {', '.join(ctx.tier_names)}); ignored"
            )
        return RuleOutcome.choose(override, f"the client asked for {override}")


class CustomRule:
    """Wraps a user rule so that it can never break routing.

    ``rule`` is a ``Rule`` or a function ``ctx -> RuleOutcome | tier name | None``. An exception, a tier
    that does not exist or a result of the wrong type turns into an abstention whose reason says what
    went wrong; the first occurrence of each is logged as a warning, repeats at debug level.
    """

    def __init__(self, rule: Rule | Callable[[RouteContext], object], name: str | None = None) -> None:
        if isinstance(rule, Rule):
            self._call: Callable[[RouteContext], object] = rule.decide
            default_name = rule.name
        elif callable(rule):
            self._call = rule
            default_name = getattr(rule, "__name__", type(rule).__name__)
        else:
            raise TypeError(
                f"a custom rule must be a Rule (name + decide) or a function of RouteContext, "
                f"got {type(rule).__name__}"
            )
        self.name: str = name or str(default_name)
        self._logged: set[str] = set()

    def decide(self, ctx: RouteContext) -> RuleOutcome:
        try:
            result = self._call(ctx)
        except Exception as exc:  # a user's bug must cost one rule, not the request
            return self._skip(f"raised {type(exc).__name__}: {str(exc)[:200]}; skipped", exc)
        if result is None:
            return RuleOutcome.abstain("no opinion")
        if isinstance(result, str):
            result = RuleOutcome.choose(result, f"custom rule {self.name} chose {result}")
        if not isinstance(result, RuleOutcome):
            return self._skip(f"returned {type(result).__name__}, not a tier name or RuleOutcome; skipped")
        if result.tier is not None and ctx.index_of(result.tier) is None:
            return self._skip(f"chose unknown tier {result.tier[:64]!r}; skipped")
        return result

    def _skip(self, reason: str, exc: BaseException | None = None) -> RuleOutcome:
        key = reason.split(":", 1)[0]
        if key not in self._logged:
            self._logged.add(key)
            log.warning("routing rule %r %s", self.name, reason, exc_info=exc)
        else:
            log.debug("routing rule %r %s", self.name, reason)
        return RuleOutcome.abstain(reason)


class ComplexityRule:
    """Easy requests (the score is under every stronger tier's threshold) go to the weakest tier; harder
    ones are left to the capacity rules and the default, which send them to the tier they want when it
    can take them."""

    name = "complexity"

    def decide(self, ctx: RouteContext) -> RuleOutcome:
        score = ctx.score
        if score is None:
            return RuleOutcome.abstain(f"no complexity score ({ctx.score_error or 'no scorer'})")
        tiers = ctx.tiers
        if len(tiers) > 1 and score < tiers[-2].min_score:
            bar, weakest = tiers[-2], tiers[-1]
            return RuleOutcome.choose(
                weakest.name,
                f"score {score:.3f} < {bar.min_score:.3f} ({bar.name}'s threshold): {weakest.name} serves it",
                margin_confidence(score, ctx),
            )
        if not ctx.explain:
            return _QUIET_WANTS_STRONGER
        asked = tiers[tier_for_score(score, tiers)]
        return RuleOutcome.abstain(f"score {score:.3f} >= {asked.min_score:.3f}: wants {asked.name}")


class VramHeadroomRule:
    """Diverts from a wanted tier whose GPU has less free memory than the tier's headroom.

    Readings older than ``max_age_s`` are ignored (the monitor stopped or its source is failing):
    the rule then abstains rather than act on stale numbers.
    """

    name = "vram_headroom"

    def __init__(self, max_age_s: float = 0.5) -> None:
        self.max_age_s = max_age_s

    def decide(self, ctx: RouteContext) -> RuleOutcome:
        tier = ctx.wanted_tier
        device = tier.device
        if device is None:
            return RuleOutcome.abstain(f"{tier.name} has no GPU to watch")
        snapshot = ctx.vram
        reading = snapshot.readings.get(device) if snapshot is not None else None
        if reading is None:
            why = (snapshot.error if snapshot is not None else None) or "no VRAM monitor"
            return RuleOutcome.abstain(f"no free-memory reading for {device} ({why})")
        age_s = ctx.now_s - reading.taken_at_s
        if age_s > self.max_age_s:
            return RuleOutcome.abstain(
                f"the reading for {device} is {age_s * 1000:.0f} ms old "
                f"(limit {self.max_age_s * 1000:.0f} ms); ignored"
            )
        headroom = tier.vram_headroom_bytes
        if reading.free_bytes >= headroom:
            if not ctx.explain:
                return _QUIET_HEADROOM_OK
            return RuleOutcome.abstain(
                f"{device} has {reading.free_bytes / GIB:.2f} GiB free >= {headroom / GIB:.2f} GiB headroom"
            )
        short = f"{device} has {reading.free_bytes / GIB:.2f} GiB free < {headroom / GIB:.2f} GiB headroom"
        if ctx.is_last:
            return RuleOutcome.abstain(f"{short}, but {tier.name} is the last tier")
        return RuleOutcome.divert_to(ctx.tiers[ctx.wanted + 1].name, f"{short} for {tier.name}")


class LatencySlaRule:
    """Diverts from a wanted tier whose latency circuit is open (EMA over its SLA, cooling down) or
    half-open with its probe in flight. Reads the circuits; the router records dispatches."""

    name = "latency_sla"

    def __init__(self, tracker: SlaTracker) -> None:
        self.tracker = tracker

    def decide(self, ctx: RouteContext) -> RuleOutcome:
        tier = ctx.wanted_tier
        circuit = self.tracker.get(tier.name)
        if circuit is None:
            return RuleOutcome.abstain(f"{tier.name} has no latency SLA")
        now = ctx.now_s
        if circuit.state(now) is CircuitState.CLOSED:  # the common case, kept cheap
            if not ctx.explain:
                return _QUIET_SLA_OK
            return RuleOutcome.abstain(
                f"{tier.name} EMA {circuit.ema_ms:.0f} ms <= SLA {circuit.policy.latency_sla_ms:.0f} ms"
            )
        text = f"{tier.name} {circuit.explain(now)}"
        if circuit.allows(now):
            return RuleOutcome.abstain(text)
        if ctx.is_last:
            return RuleOutcome.abstain(f"{text}, but it is the last tier")
        return RuleOutcome.divert_to(ctx.tiers[ctx.wanted + 1].name, text)


class DefaultRule:
    """The end of the chain: the tier the request wants (the configured default when there is no score)."""

    name = "default"

    def decide(self, ctx: RouteContext) -> RuleOutcome:
        tier = ctx.wanted_tier.name
        if ctx.score is None:
            return RuleOutcome.choose(tier, f"no score; the default tier is {tier}", 0.5)
        if ctx.wanted != tier_for_score(ctx.score, ctx.tiers):
            return RuleOutcome.choose(tier, f"{tier} is the strongest tier left after the diversions")
        confidence = margin_confidence(ctx.score, ctx)
        if not ctx.explain:
            return RuleOutcome(tier, "no rule objected", confidence, False)
        return RuleOutcome.choose(tier, f"no rule objected; the score asks for {tier}", confidence)
