"""The rule chain: order, abstention reasons, override, custom rules, VRAM headroom, N tiers."""

from __future__ import annotations

import logging

import pytest
from routing_helpers import EASY, GIB, HARD, FixedScorer, StandInScorer

from xpuflow.clock import FakeClock
from xpuflow.errors import ConfigError
from xpuflow.routing import (
    AdaptiveRouter,
    ComplexityRule,
    DefaultRule,
    OverrideRule,
    RouteContext,
    RoutingConfig,
    RuleOutcome,
    TierConfig,
    TierRouter,
    TierSpec,
    parse_config,
)
from xpuflow.telemetry import NvmlSource, VRAMMonitor
from xpuflow.testing import FakeGpu, FakeNvml
from xpuflow.testing.fake_vram import FakeVramSource


def reasons(decision: object) -> dict[str, str]:
    return {a.candidate: a.reason for a in decision.alternatives}  # type: ignore[attr-defined]


def test_the_chain_runs_in_the_documented_order(router: AdaptiveRouter) -> None:
    def mine(ctx: RouteContext) -> None:
        return None

    custom = AdaptiveRouter(RoutingConfig(), [mine], scorer=StandInScorer(), monitor=router.monitor)
    names = [rule.name for rule in custom._chain.rules]
    assert names == ["override", "mine", "complexity", "vram_headroom", "latency_sla", "default"]


def test_a_hard_prompt_passes_every_rule_and_each_says_why(router: AdaptiveRouter) -> None:
    decision = router.route_decision(HARD)
    assert decision.tier == "tier_high"
    assert decision.device == "cuda:0"
    assert decision.reason == "default: no rule objected; the score asks for tier_high"
    assert [a.candidate for a in decision.alternatives] == [
        "rule:override",
        "rule:complexity",
        "rule:vram_headroom",
        "rule:latency_sla",
    ]
    why = reasons(decision)
    assert why["rule:override"] == "no tier override"
    assert why["rule:complexity"].endswith(">= 0.190: wants tier_high")
    assert why["rule:vram_headroom"] == "cuda:0 has 24.00 GiB free >= 1.50 GiB headroom"
    assert why["rule:latency_sla"] == "tier_high EMA 800 ms <= SLA 2000 ms"
    assert decision.details["rule"] == "default"
    assert 0.5 <= decision.confidence <= 1.0


def test_an_easy_prompt_is_decided_by_the_complexity_rule(router: AdaptiveRouter) -> None:
    decision = router.route_decision(EASY)
    assert decision.tier == "tier_low"
    assert decision.device is None
    assert decision.reason.startswith("complexity: score 0.001 < 0.190 (tier_high's threshold)")
    assert decision.confidence > 0.85  # far below the threshold
    assert [a.candidate for a in decision.alternatives] == ["rule:override"]
    assert router.route(EASY) == "tier_low"


def test_override_wins_over_everything(router: AdaptiveRouter, vram: FakeVramSource) -> None:
    vram.set_free("cuda:0", 0)
    router.monitor.poll_once()
    for _ in range(5):
        router.observe("tier_high", 60_000.0)
    decision = router.route_decision(EASY, override="tier_high")
    assert decision.tier == "tier_high"
    assert decision.reason == "override: the client asked for tier_high"
    assert decision.confidence == 1.0
    assert router.route(HARD, override="tier_low") == "tier_low"


def test_an_unknown_override_is_ignored_with_a_reason(router: AdaptiveRouter) -> None:
    decision = router.route_decision(EASY, override="tier_gold")
    assert decision.tier == "tier_low"
    assert reasons(decision)["rule:override"] == (
        "override 'tier_gold' is not a tier here (tiers: tier_high, tier_low); ignored"
    )


def test_a_custom_rule_that_raises_is_skipped_with_a_logged_reason(
    router: AdaptiveRouter, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(ctx: RouteContext) -> str:
        raise RuntimeError("rule bug")

    custom = AdaptiveRouter(RoutingConfig(), [boom], scorer=StandInScorer(), monitor=router.monitor)
    with caplog.at_level(logging.WARNING, logger="xpuflow.routing"):
        decision = custom.route_decision(HARD)
        assert custom.route(HARD) == "tier_high"
        assert custom.route(EASY) == "tier_low"
    assert decision.tier == "tier_high"
    assert reasons(decision)["rule:boom"] == "raised RuntimeError: rule bug; skipped"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # logged once, not once per request
    assert "routing rule 'boom' raised RuntimeError: rule bug; skipped" in warnings[0].getMessage()


def test_custom_rules_choose_before_the_built_ins(router: AdaptiveRouter) -> None:
    def long_to_gpu(ctx: RouteContext) -> str | None:
        return "tier_high" if "urgent" in ctx.prompt else None

    class Quiet:
        name = "quiet_hours"

        def decide(self, ctx: RouteContext) -> RuleOutcome:
            if "batch" in ctx.prompt:
                return RuleOutcome.choose("tier_low", "batch jobs go to the cheap tier", 0.9)
            return RuleOutcome.abstain("not a batch job")

    custom = AdaptiveRouter(
        RoutingConfig(), [long_to_gpu, Quiet()], scorer=StandInScorer(), monitor=router.monitor
    )
    decision = custom.route_decision("urgent: hi")
    assert decision.tier == "tier_high"
    assert decision.reason == "long_to_gpu: custom rule long_to_gpu chose tier_high"
    batch = custom.route_decision(HARD + " batch")
    assert batch.tier == "tier_low"
    assert batch.confidence == 0.9
    assert batch.reason == "quiet_hours: batch jobs go to the cheap tier"
    assert reasons(batch)["rule:long_to_gpu"] == "no opinion"


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        ("tier_gold", "chose unknown tier 'tier_gold'; skipped"),
        (42, "returned int, not a tier name or RuleOutcome; skipped"),
    ],
)
def test_a_custom_rule_with_a_bad_answer_is_skipped(
    router: AdaptiveRouter, result: object, reason: str
) -> None:
    def odd(ctx: RouteContext) -> object:
        return result

    custom = AdaptiveRouter(RoutingConfig(), [odd], scorer=StandInScorer(), monitor=router.monitor)
    decision = custom.route_decision(HARD)
    assert decision.tier == "tier_high"
    assert reasons(decision)["rule:odd"] == reason


def test_a_custom_rule_must_be_a_rule_or_a_function() -> None:
    with pytest.raises(TypeError, match="a custom rule must be a Rule"):
        AdaptiveRouter(RoutingConfig(vram_source="none"), [42], scorer=StandInScorer())  # type: ignore[list-item]


def test_vram_headroom_diverts_from_a_gpu_without_room() -> None:
    clock = FakeClock(start_s=50.0)
    nvml = FakeNvml([FakeGpu("NVIDIA L4", 24 * GIB, cc=(8, 9), mig_supported=False)])
    monitor = VRAMMonitor(NvmlSource(nvml), clock=clock)
    router = AdaptiveRouter(RoutingConfig(), scorer=StandInScorer(), monitor=monitor, clock=clock)
    monitor.poll_once()
    assert router.route(HARD) == "tier_high"

    nvml.set_memory_used(0, 23 * GIB)
    monitor.poll_once()
    decision = router.route_decision(HARD)
    assert decision.tier == "tier_low"
    assert decision.alternatives[0].candidate == "tier_high"
    assert decision.alternatives[0].reason == (
        "vram_headroom: cuda:0 has 1.00 GiB free < 1.50 GiB headroom for tier_high"
    )
    assert decision.details["diverted_from"] == ["tier_high"]
    assert router.route(HARD) == "tier_low"

    nvml.set_memory_used(0, 4 * GIB)
    monitor.poll_once()
    assert router.route(HARD) == "tier_high"
    monitor.stop()


def test_stale_or_missing_readings_are_ignored_not_trusted(
    router: AdaptiveRouter, vram: FakeVramSource, clock: FakeClock
) -> None:
    vram.set_free("cuda:0", 0)
    router.monitor.poll_once()
    clock.advance(2.0)  # the monitor stalled: a 2 s old reading says nothing about now
    decision = router.route_decision(HARD)
    assert decision.tier == "tier_high"
    assert (
        reasons(decision)["rule:vram_headroom"]
        == "the reading for cuda:0 is 2000 ms old (limit 500 ms); ignored"
    )

    blind = AdaptiveRouter(RoutingConfig(vram_source="none"), scorer=StandInScorer(), clock=clock)
    assert reasons(blind.route_decision(HARD))["rule:vram_headroom"] == (
        "no free-memory reading for cuda:0 (no VRAM source: disabled by configuration)"
    )


def three_tiers(**extra: object) -> RoutingConfig:
    return RoutingConfig(
        complexity_threshold=0.7,
        tiers=[
            TierConfig(name="big", device="cuda:0"),
            TierConfig(name="mid", device="cuda:1", min_score=0.4, vram_headroom_gb=4.0),
            TierConfig(name="small"),
        ],
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("score", "tier"), [(0.95, "big"), (0.7, "big"), (0.55, "mid"), (0.4, "mid"), (0.1, "small")]
)
def test_three_tiers_split_by_score(monitor: VRAMMonitor, clock: FakeClock, score: float, tier: str) -> None:
    router = AdaptiveRouter(three_tiers(), scorer=FixedScorer(score), monitor=monitor, clock=clock)
    assert router.tiers == ("big", "mid", "small")
    assert router.route("anything") == tier


def test_diversions_chain_down_through_every_tier_that_cannot_take_it(
    monitor: VRAMMonitor, vram: FakeVramSource, clock: FakeClock
) -> None:
    router = AdaptiveRouter(three_tiers(), scorer=FixedScorer(0.9), monitor=monitor, clock=clock)
    vram.set_free("cuda:0", GIB)  # big: below its 1.5 GiB headroom
    monitor.poll_once()
    assert router.route("x") == "mid"
    for _ in range(5):
        router.observe("mid", 10_000.0)  # mid: over its SLA
    decision = router.route_decision("x")
    assert decision.tier == "small"
    assert [a.candidate for a in decision.alternatives[:2]] == ["big", "mid"]
    assert decision.alternatives[1].reason.startswith("latency_sla: mid EMA")
    assert decision.details["diverted_from"] == ["big", "mid"]

    vram.set_free("cuda:1", 2 * GIB)  # mid's own headroom (4 GiB) fails too: still small, never crash
    monitor.poll_once()
    assert router.route("x") == "small"


def test_no_score_goes_to_the_default_tier(monitor: VRAMMonitor, clock: FakeClock) -> None:
    class Broken:
        def score(self, prompt: str) -> float:
            raise ValueError("scorer bug")

    router = AdaptiveRouter(
        RoutingConfig(default_tier="tier_low"), scorer=Broken(), monitor=monitor, clock=clock
    )
    decision = router.route_decision(HARD)
    assert decision.tier == "tier_low"
    assert decision.confidence == 0.5
    assert (
        reasons(decision)["rule:complexity"] == "no complexity score (scorer raised ValueError: scorer bug)"
    )
    first = AdaptiveRouter(RoutingConfig(), scorer=Broken(), monitor=monitor, clock=clock)
    assert first.route(HARD) == "tier_high"  # without default_tier: the strongest


def tiers(*names: str) -> tuple[TierSpec, ...]:
    return tuple(TierSpec(name, min_score=1.0 - (i + 1) / len(names)) for i, name in enumerate(names))


def test_tier_router_survives_a_raising_rule_and_a_chain_that_decides_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Raises:
        name = "raises"

        def decide(self, ctx: RouteContext) -> RuleOutcome:
            raise KeyError("oops")

    chain = TierRouter(tiers("a", "b"), [Raises(), OverrideRule()])
    with caplog.at_level(logging.WARNING):
        decision = chain.decide(chain.context("p", 0.9, 0.0))
    assert decision.tier == "a"
    assert decision.reason == "fallback: no rule decided; a is the tier the request wants"
    assert reasons(decision)["rule:raises"] == "raised KeyError: 'oops'; skipped"
    assert "routing rule 'raises' raised KeyError" in caplog.text


def test_trace_shows_every_rule_including_those_after_the_decision() -> None:
    chain = TierRouter(tiers("a", "b"), [OverrideRule(), ComplexityRule(), DefaultRule()])
    trace = chain.trace(chain.context("p", 0.1, 0.0))
    assert [(t.rule, t.verdict, t.tier) for t in trace] == [
        ("override", "abstained", None),
        ("complexity", "chose", "b"),
        ("default", "not reached", "b"),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tiers": [{"name": "a"}, {"name": "a"}]}, "tier names must be unique"),
        ({"tiers": [{"name": "a"}, {"name": "m"}, {"name": "z"}]}, "middle tier 'm' needs a min_score"),
        ({"tiers": [{"name": "a"}, {"name": "m", "min_score": 0.9}, {"name": "z"}]}, "must be below"),
        ({"tiers": [{"name": "a", "min_score": 0.5}, {"name": "z"}]}, "set complexity_threshold instead"),
        ({"tiers": [{"name": "a"}, {"name": "z", "min_score": 0.1}]}, "drop min_score"),
        ({"default_tier": "nope"}, "default_tier 'nope' is not a tier"),
        ({"tiers": []}, "at least 1 item"),
        ({"complexity_treshold": 0.5}, "complexity_treshold: Extra inputs are not permitted"),
    ],
)
def test_bad_tier_configs_say_what_to_fix(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_tier_router_rejects_an_empty_or_ambiguous_setup() -> None:
    with pytest.raises(ConfigError, match="at least one tier"):
        TierRouter((), [DefaultRule()])
    with pytest.raises(ConfigError, match="unique"):
        TierRouter(tiers("a", "a"), [DefaultRule()])
    with pytest.raises(ConfigError, match="end it with DefaultRule"):
        TierRouter(tiers("a"), [])
    with pytest.raises(ConfigError, match="default_tier 'x'"):
        TierRouter(tiers("a"), [DefaultRule()], default_tier="x")


def test_a_single_tier_takes_everything(monitor: VRAMMonitor, clock: FakeClock) -> None:
    config = RoutingConfig(tiers=[TierConfig(name="only", device="cuda:0")])
    router = AdaptiveRouter(config, scorer=StandInScorer(), monitor=monitor, clock=clock)
    assert {router.route(p) for p in (EASY, HARD, "")} == {"only"}
