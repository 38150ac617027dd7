"""``AdaptiveRouter``: complexity-, VRAM- and latency-aware tier choice for one logical model.

The API follows the gemma4-adaptive-router package, generalised to any number of tiers::

    from xpuflow.routing import AdaptiveRouter, RoutingConfig

    router = AdaptiveRouter(RoutingConfig(
        complexity_threshold=0.19,   # score >= this -> tier_high (~30% of typical prompts)
        vram_headroom_gb=1.5,        # tier_high's GPU with less free -> tier_low
        latency_sla_ms=2000.0,       # tier_high's latency EMA above this -> tier_low, re-probed later
        sla_warmup_seed_ms=800.0,    # where the EMA starts, so a cold start does not trip it
    ))
    tier = router.route("Prove that there are infinitely many primes")     # "tier_high"
    ...  # call the model behind that tier
    router.observe(tier, latency_ms=elapsed_ms)
    router.shutdown()                 # stops the VRAM monitor thread

``route_decision`` returns the full ``RoutingDecision`` (reason, confidence, every rule's abstention);
``calibrate(prompts, strong_share=0.3)`` sets the threshold so that 30 % of such prompts go to the
strongest tier; ``load_config(path)`` reads the same fields from YAML. ``route`` never raises for any
input: empty, huge, binary, undecodable; a failing scorer or custom rule costs its opinion, not the request.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from xpuflow.clock import Clock, SystemClock
from xpuflow.config import first_error_field, format_validation_error, read_yaml
from xpuflow.errors import ConfigError
from xpuflow.routing.rules import (
    ComplexityRule,
    CustomRule,
    DefaultRule,
    LatencySlaRule,
    OverrideRule,
    RouteContext,
    Rule,
    TierSpec,
    VramHeadroomRule,
)
from xpuflow.routing.sla import CircuitState, SlaPolicy, SlaTracker
from xpuflow.routing.tier_router import RuleTrace, TierRouter
from xpuflow.telemetry.vram import GIB, VRAMMonitor
from xpuflow.types import RoutingDecision

__all__ = [
    "AdaptiveRouter",
    "Calibration",
    "RoutingConfig",
    "Scorer",
    "TierConfig",
    "load_config",
    "parse_config",
]

log = logging.getLogger(__name__)

CustomRuleLike = Rule | Callable[[RouteContext], object]


class Scorer(Protocol):
    """Anything with ``score(prompt) -> float in [0, 1]``; ``xpuflow.policy.complexity.ComplexityScorer``
    by default."""

    def score(self, prompt: str) -> float: ...


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierConfig(_Strict):
    """One tier of a logical model. Tiers are listed strongest first."""

    name: str = Field(min_length=1, max_length=64, description="Tier name, e.g. tier_high.")
    device: str | None = Field(
        default=None, description="GPU whose free memory the VRAM rule watches ('cuda:0'); None: not watched."
    )
    min_score: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Score from which requests want this tier. Middle tiers only: the first tier uses "
        "complexity_threshold, the last takes everything below its neighbour.",
    )
    vram_headroom_gb: float | None = Field(
        default=None, ge=0.0, description="Free GiB this tier's GPU must keep; default: vram_headroom_gb."
    )
    latency_sla_ms: float | None = Field(
        default=None, gt=0.0, description="Latency SLA of this tier in ms; default: latency_sla_ms."
    )


def _default_tiers() -> list[TierConfig]:
    return [TierConfig(name="tier_high", device="cuda:0"), TierConfig(name="tier_low")]


#: The shipped ComplexityScorer's score is a calibrated probability that only the strong tier answers
#: well (median 0.16 on the RouteLLM calibration prompts); about 30% of those prompts score >= 0.19.
#: ``AdaptiveRouter.calibrate(prompts, strong_share)`` sets it for your own traffic.
DEFAULT_COMPLEXITY_THRESHOLD = 0.19


class RoutingConfig(_Strict):
    """How a logical model's requests are spread over its tiers. Every field has a safe default."""

    complexity_threshold: float = Field(
        default=DEFAULT_COMPLEXITY_THRESHOLD,
        ge=0.0,
        le=1.0,
        description="Score from which a request wants the first (strongest) tier.",
    )
    vram_headroom_gb: float = Field(
        default=1.5,
        ge=0.0,
        description="Free GiB (2**30 bytes) a tier's GPU must keep, or its traffic is diverted.",
    )
    latency_sla_ms: float = Field(
        default=2000.0,
        gt=0.0,
        description="Latency SLA; a tier whose latency EMA exceeds it is diverted from.",
    )
    sla_warmup_seed_ms: float = Field(
        default=800.0, ge=0.0, description="Starting value of each tier's latency EMA."
    )
    sla_ema_alpha: float = Field(
        default=0.2, gt=0.0, le=1.0, description="Weight of the newest latency sample."
    )
    sla_cooldown_s: float = Field(
        default=10.0, gt=0.0, description="Seconds a diverted tier rests before a probe."
    )
    sla_probe_timeout_s: float | None = Field(
        default=None,
        gt=0.0,
        description="Seconds before an unreported probe stops blocking the next one; "
        "default: sla_cooldown_s.",
    )
    vram_poll_interval_ms: float = Field(
        default=15.0,
        ge=1.0,
        le=1000.0,
        description="How often the VRAM monitor polls; 10-20 ms is the sweet spot.",
    )
    vram_max_age_ms: float = Field(
        default=500.0, gt=0.0, description="Readings older than this are ignored (the monitor stalled)."
    )
    vram_source: Literal["auto", "nvml", "torch", "none"] = Field(
        default="auto",
        description="Where free VRAM comes from: NVML, torch.cuda, the first that works, or none.",
    )
    max_scored_chars: int = Field(
        default=65536, ge=1, description="Longer prompts are cut to this many characters before scoring."
    )
    default_tier: str | None = Field(
        default=None, description="Tier for requests that could not be scored; default: the first tier."
    )
    tiers: list[TierConfig] = Field(
        default_factory=_default_tiers, min_length=1, description="Tiers, strongest first."
    )

    @model_validator(mode="after")
    def _check_tiers(self) -> RoutingConfig:
        names = [tier.name for tier in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        if self.default_tier is not None and self.default_tier not in names:
            raise ValueError(f"default_tier {self.default_tier!r} is not a tier; tiers: {', '.join(names)}")
        last = len(self.tiers) - 1
        bar = self.complexity_threshold
        for index, tier in enumerate(self.tiers):
            if index == 0 and tier.min_score is not None and last > 0:
                raise ValueError(
                    f"tier {tier.name!r} is the first tier: set complexity_threshold instead of its min_score"
                )
            if index == last and tier.min_score is not None and last > 0:
                raise ValueError(
                    f"tier {tier.name!r} is the last tier and takes every lower score; drop min_score"
                )
            if 0 < index < last:
                if tier.min_score is None:
                    raise ValueError(f"middle tier {tier.name!r} needs a min_score below {bar}")
                if tier.min_score >= bar:
                    raise ValueError(
                        f"tier {tier.name!r} min_score {tier.min_score} must be below the stronger "
                        f"tier's {bar}"
                    )
                bar = tier.min_score
        return self

    def tier_specs(self) -> tuple[TierSpec, ...]:
        last = len(self.tiers) - 1
        specs = []
        for index, tier in enumerate(self.tiers):
            if index == 0 and last > 0:
                min_score = self.complexity_threshold
            elif index == last:
                min_score = 0.0
            else:
                min_score = float(tier.min_score or 0.0)
            headroom = self.vram_headroom_gb if tier.vram_headroom_gb is None else tier.vram_headroom_gb
            sla = self.latency_sla_ms if tier.latency_sla_ms is None else tier.latency_sla_ms
            specs.append(TierSpec(tier.name, tier.device, min_score, int(headroom * GIB), sla))
        return tuple(specs)

    def sla_policies(self) -> dict[str, SlaPolicy]:
        return {
            spec.name: SlaPolicy(
                latency_sla_ms=spec.latency_sla_ms,
                warmup_seed_ms=self.sla_warmup_seed_ms,
                ema_alpha=self.sla_ema_alpha,
                cooldown_s=self.sla_cooldown_s,
                probe_timeout_s=self.sla_probe_timeout_s,
            )
            for spec in self.tier_specs()
        }


def parse_config(data: Any, source: str = "<data>") -> RoutingConfig:
    """Validate parsed YAML/JSON. The fields may sit at the top level or under a ``routing:`` key."""
    if data is None:
        data = {}
    if isinstance(data, Mapping) and set(data) == {"routing"}:
        data = data["routing"] or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"routing config {source} must be a mapping, got {type(data).__name__}")
    try:
        return RoutingConfig.model_validate(dict(data))
    except ValidationError as exc:
        message = format_validation_error(exc, source, "routing config")
        raise ConfigError(message, field=first_error_field(exc)) from exc


def load_config(path: str | Path) -> RoutingConfig:
    """Read a routing config from YAML. Raises ``ConfigError`` naming the file, the field and the fix."""
    file = Path(path)
    data = read_yaml(file, "routing config")
    return parse_config(data, str(file))


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` did: the threshold it set and the strong-tier share it gives on the prompts."""

    threshold: float
    target_share: float
    achieved_share: float
    num_prompts: int


def as_prompt_text(query: object) -> str:
    """Any request payload as text, never raising: str (lone surrogates replaced), bytes (invalid UTF-8
    replaced), chat messages (their text contents joined), None (empty), anything else (``str()``)."""
    if isinstance(query, str):
        if query.isascii():
            return query
        try:
            query.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from a lenient decoder upstream
            return query.encode("utf-8", "replace").decode("utf-8")
        return query
    if isinstance(query, (bytes, bytearray, memoryview)):
        return bytes(query).decode("utf-8", "replace")
    if query is None:
        return ""
    if isinstance(query, Sequence):
        return "\n".join(as_prompt_text(_message_text(item)) for item in query)
    try:
        return as_prompt_text(str(query))
    except Exception:  # a __str__ that raises: nothing to score
        return ""


def _message_text(item: object) -> object:
    """The text of one chat message ({"role", "content"}; content may be a list of parts)."""
    if isinstance(item, Mapping):
        content = item.get("content", item.get("text", ""))
        if isinstance(content, Sequence) and not isinstance(content, (str, bytes)):
            return "\n".join(
                str(part.get("text", "")) if isinstance(part, Mapping) else str(part) for part in content
            )
        return content
    return item


def _default_scorer() -> Scorer:
    from xpuflow.policy.complexity import ComplexityScorer

    scorer: Scorer = ComplexityScorer()
    return scorer


class AdaptiveRouter:
    """Chooses a tier for each request of one logical model and learns each tier's latency.

    ``rules`` are custom rules run after the override and before the built-in ones (see
    ``xpuflow.routing.rules``). ``scorer`` defaults to the shipped ``ComplexityScorer``. ``monitor``:
    pass a ``VRAMMonitor`` you own (the router neither starts nor stops it); without one the router
    starts its own from ``config.vram_source`` and stops it in ``shutdown()``. ``clock`` must be the
    one the monitor stamps readings with. Thread-safe: ``route`` and ``observe`` may run concurrently.
    """

    def __init__(
        self,
        config: RoutingConfig | None = None,
        rules: Iterable[CustomRuleLike] = (),
        *,
        scorer: Scorer | None = None,
        monitor: VRAMMonitor | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._config = config or RoutingConfig()
        self._clock: Clock = clock or SystemClock()
        self._scorer: Scorer = scorer if scorer is not None else _default_scorer()
        self._custom = tuple(CustomRule(rule) for rule in rules)
        self._sla = SlaTracker(self._config.sla_policies())
        self._lock = threading.Lock()
        self._score_failures: set[str] = set()
        if monitor is not None:
            self._monitor, self._owns_monitor = monitor, False
        else:
            self._monitor = VRAMMonitor.auto(
                source=self._config.vram_source,
                poll_interval_ms=self._config.vram_poll_interval_ms,
                clock=self._clock,
            )
            self._owns_monitor = True
            self._monitor.start()
        self._chain = self._build_chain(self._config)

    def _build_chain(self, config: RoutingConfig) -> TierRouter:
        rules: list[Rule] = [
            OverrideRule(),
            *self._custom,
            ComplexityRule(),
            VramHeadroomRule(max_age_s=config.vram_max_age_ms / 1000.0),
            LatencySlaRule(self._sla),
            DefaultRule(),
        ]
        return TierRouter(config.tier_specs(), rules, default_tier=config.default_tier)

    # -- the hot path ------------------------------------------------------------------------------

    def route(self, query: object, *, override: str | None = None) -> str:
        """The tier name for this request. Never raises."""
        ctx = self._context(query, override, explain=False)
        with self._lock:
            walk = self._chain.choose(ctx)
            self._sla.on_dispatch(walk.tier, ctx.now_s)
        return walk.tier

    def route_decision(self, query: object, *, override: str | None = None) -> RoutingDecision:
        """Like ``route``, with the reason, confidence and every rule's abstention."""
        ctx = self._context(query, override)
        with self._lock:
            decision = self._chain.decide(ctx)
            if decision.tier is not None:
                self._sla.on_dispatch(decision.tier, ctx.now_s)
        return decision

    def explain(
        self, query: object, *, override: str | None = None
    ) -> tuple[RoutingDecision, tuple[RuleTrace, ...]]:
        """What ``route_decision`` would return and every rule's say, without dispatching anything."""
        ctx = self._context(query, override)
        with self._lock:
            return self._chain.decide(ctx), self._chain.trace(ctx)

    def observe(self, tier: str, latency_ms: float) -> CircuitState:
        """Report a finished request's latency on ``tier``; returns the tier's circuit state after it.
        Raises ``ConfigError`` for an unknown tier; ignores NaN, infinite and negative latencies."""
        now = self._clock.monotonic()
        with self._lock:
            return self._sla.observe(tier, float(latency_ms), now)

    def _context(self, query: object, override: str | None, *, explain: bool = True) -> RouteContext:
        prompt = as_prompt_text(query)
        limit = self._config.max_scored_chars
        if len(prompt) > limit:
            prompt = prompt[:limit]  # bounded scoring time; the head says what the request is about
        score, error = self._score(prompt)
        if override is not None and not isinstance(override, str):
            override = as_prompt_text(override)
        return self._chain.context(
            prompt,
            score,
            self._clock.monotonic(),
            override=override,
            vram=self._monitor.snapshot(),
            score_error=error,
            explain=explain,
        )

    def _score(self, prompt: str) -> tuple[float | None, str | None]:
        try:
            score = float(self._scorer.score(prompt))
        except Exception as exc:  # a scorer bug must not fail the request; the default tier takes it
            reason = f"scorer raised {type(exc).__name__}: {str(exc)[:200]}"
            if reason not in self._score_failures:
                self._score_failures.add(reason)
                log.warning("complexity %s", reason, exc_info=exc)
            return None, reason
        if not math.isfinite(score):
            return None, f"scorer returned {score}"
        return min(1.0, max(0.0, score)), None

    # -- tuning and state --------------------------------------------------------------------------

    @property
    def config(self) -> RoutingConfig:
        return self._config

    @property
    def monitor(self) -> VRAMMonitor:
        return self._monitor

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self._chain.tiers)

    def calibrate(self, prompts: Iterable[object], strong_share: float = 0.3) -> Calibration:
        """Set ``complexity_threshold`` so that about ``strong_share`` of ``prompts`` want the strongest
        tier, and return what it achieved. With ties in the scores the share closest to the target wins
        (the higher threshold on a tie). Raises ``ConfigError`` for an empty set or a share outside [0, 1]."""
        if not 0.0 <= strong_share <= 1.0:
            raise ConfigError(f"strong_share must be within [0, 1], got {strong_share}", field="strong_share")
        limit = self._config.max_scored_chars
        scores = []
        for prompt in prompts:
            score, _error = self._score(as_prompt_text(prompt)[:limit])
            if score is not None:
                scores.append(score)
        if not scores:
            raise ConfigError("calibrate needs at least one prompt that can be scored", field="prompts")
        threshold, achieved = _threshold_for_share(scores, strong_share)
        try:
            config = RoutingConfig.model_validate(
                {**self._config.model_dump(), "complexity_threshold": threshold}
            )
        except ValidationError as exc:
            raise ConfigError(
                f"a threshold of {threshold:.4f} for a {strong_share:.0%} strong share conflicts with the "
                "middle tiers' min_score; lower them or ask for a smaller share "
                f"({format_validation_error(exc, '')})",
                field="complexity_threshold",
            ) from exc
        with self._lock:
            self._config = config
            self._chain = self._build_chain(config)
        return Calibration(threshold, strong_share, achieved, len(scores))

    def status(self) -> dict[str, Any]:
        """Circuits and VRAM monitor state, for dashboards and ``xpuflow score``."""
        now = self._clock.monotonic()
        with self._lock:
            circuits = self._sla.to_dict(now)
        return {
            "tiers": list(self.tiers),
            "complexity_threshold": self._config.complexity_threshold,
            "circuits": circuits,
            "vram": self._monitor.snapshot().to_dict(),
            "vram_monitor": self._monitor.stats().to_dict(),
        }

    def shutdown(self) -> None:
        """Stop the VRAM monitor the router started (a monitor passed in is left to its owner)."""
        if self._owns_monitor:
            self._monitor.stop()

    close = shutdown

    def __enter__(self) -> AdaptiveRouter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def _threshold_for_share(scores: Sequence[float], share: float) -> tuple[float, float]:
    """The threshold t (requests with score >= t are strong) whose share is closest to ``share``."""
    ordered = sorted(scores, reverse=True)
    n = len(ordered)
    top = ordered[0]
    best_threshold = min(1.0, math.nextafter(top, math.inf))  # nothing strong (unless a score is 1.0)
    best_share = sum(1 for s in ordered if s >= best_threshold) / n
    index = 0
    while index < n:
        value = ordered[index]
        while index < n and ordered[index] == value:
            index += 1
        candidate = index / n  # every score >= value
        if abs(candidate - share) < abs(best_share - share):
            best_threshold, best_share = value, candidate
    return best_threshold, best_share
