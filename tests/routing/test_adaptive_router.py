"""AdaptiveRouter as users see it: config and YAML, bad inputs, calibration, observe, lifecycle."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from routing_helpers import EASY, HARD, FixedScorer, StandInScorer, calibration_prompts

from xpuflow.clock import FakeClock
from xpuflow.errors import ConfigError
from xpuflow.routing import AdaptiveRouter, CircuitState, RoutingConfig, load_config
from xpuflow.routing.adaptive import DEFAULT_COMPLEXITY_THRESHOLD, as_prompt_text
from xpuflow.telemetry import VRAMMonitor
from xpuflow.testing.fake_vram import FakeVramSource


def plain_router(scorer: object | None = None, **config: object) -> AdaptiveRouter:
    """A router with no VRAM source, so only complexity and SLA decide."""
    return AdaptiveRouter(
        RoutingConfig(vram_source="none", **config),  # type: ignore[arg-type]
        scorer=scorer or StandInScorer(),  # type: ignore[arg-type]
        clock=FakeClock(),
    )


def test_defaults_mirror_the_gemma4_adaptive_router() -> None:
    config = RoutingConfig()
    assert config.complexity_threshold == DEFAULT_COMPLEXITY_THRESHOLD
    assert config.vram_headroom_gb == 1.5
    assert config.latency_sla_ms == 2000.0
    assert config.sla_warmup_seed_ms == 800.0
    assert config.vram_poll_interval_ms == 15.0
    assert [t.name for t in config.tiers] == ["tier_high", "tier_low"]
    assert config.tiers[0].device == "cuda:0"


def test_gemma4_style_usage_round_trip() -> None:
    router = AdaptiveRouter(
        RoutingConfig(
            complexity_threshold=0.65, vram_headroom_gb=1.5, latency_sla_ms=2000.0, vram_source="none"
        ),
        scorer=StandInScorer(),
    )
    tier = router.route(HARD)
    assert tier == "tier_high"
    assert router.observe(tier, latency_ms=350.0) is CircuitState.CLOSED
    assert router.route(EASY) == "tier_low"
    router.shutdown()
    router.shutdown()  # idempotent


def test_load_config_reads_yaml_at_the_top_level_or_under_routing(tmp_path: Path) -> None:
    flat = tmp_path / "flat.yaml"
    flat.write_text(
        "complexity_threshold: 0.5\nvram_headroom_gb: 2\nlatency_sla_ms: 1500\n"
        "vram_poll_interval_ms: 10\nsla_warmup_seed_ms: 600\n"
        "tiers:\n  - {name: gpu, device: 'cuda:1'}\n  - {name: npu}\n"
    )
    config = load_config(flat)
    assert (config.complexity_threshold, config.vram_headroom_gb, config.latency_sla_ms) == (0.5, 2.0, 1500.0)
    assert (config.vram_poll_interval_ms, config.sla_warmup_seed_ms) == (10.0, 600.0)
    assert [t.name for t in config.tiers] == ["gpu", "npu"]
    nested = tmp_path / "nested.yaml"
    nested.write_text("routing:\n  latency_sla_ms: 900\n")
    assert load_config(nested).latency_sla_ms == 900.0
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == RoutingConfig()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("complexity_threshold: [", "is not valid YAML"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("complexity_threshold: 1.5\n", r"complexity_threshold: Input should be less than or equal to 1"),
        ("vram_poll_interval_ms: 0\n", "vram_poll_interval_ms"),
        ("latency_sla_ms: fast\n", "latency_sla_ms: Input should be a valid number"),
        ("vram_source: cuda\n", "vram_source"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "routing.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_non_utf8_config_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_bytes(b"latency_sla_ms: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


BAD_INPUTS: list[object] = [
    "",
    "   \n\t",
    b"",
    b"\xff\xfe\xfa invalid utf-8 \xc3\x28",
    bytes(range(256)) * 4,
    bytearray(b"\x00\x01binary"),
    "lone \ud800 surrogate \udfff",
    "\x00nul and \u202e bidi",
    None,
    12345,
    3.5,
    [{"role": "user", "content": "Prove step by step that 2 + 2 = 4"}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}],
    {"unexpected": "mapping"},
    object(),
]


@pytest.mark.parametrize("query", BAD_INPUTS, ids=lambda q: type(q).__name__)
def test_bad_inputs_never_crash_route(query: object) -> None:
    router = plain_router()
    assert router.route(query) in router.tiers
    decision = router.route_decision(query)
    assert decision.tier in router.tiers
    assert decision.reason


def test_an_object_whose_str_raises_is_routed_too() -> None:
    class Nasty:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    assert as_prompt_text(Nasty()) == ""
    assert plain_router().route(Nasty()) == "tier_low"


def test_chat_messages_are_scored_on_their_text() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": HARD}]
    assert as_prompt_text(messages) == "be brief\n" + HARD
    assert plain_router().route(messages) == "tier_high"


def test_a_one_megabyte_prompt_is_scored_in_bounded_time() -> None:
    scorer = StandInScorer()
    router = plain_router(scorer)
    huge = "Prove the lemma. " * (1 << 16)  # about 1.1 MB
    assert len(huge) > 1_000_000
    start = time.perf_counter()
    for _ in range(20):
        assert router.route(huge) == "tier_high"
    per_call_s = (time.perf_counter() - start) / 20
    assert scorer.longest_seen == router.config.max_scored_chars
    assert per_call_s < 0.05, f"{per_call_s * 1000:.1f} ms per 1 MB route"
    binary = os.urandom(1 << 20)
    assert router.route(binary) in router.tiers


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), st.binary(), st.none(), st.integers()))
def test_route_never_raises_for_any_input(query: object) -> None:
    router = plain_router()
    assert router.route(query) in ("tier_high", "tier_low")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -3.0, 7.0])
def test_odd_scores_are_clamped_or_treated_as_unknown(value: float) -> None:
    decision = plain_router(FixedScorer(value)).route_decision("x")
    if not math.isfinite(value):
        assert decision.details["score"] is None
        assert decision.tier == "tier_high"
    else:
        assert decision.details["score"] == min(1.0, max(0.0, value))


def test_calibrate_hits_the_target_share(tmp_path: Path) -> None:
    prompts = calibration_prompts(4000)
    fit, held_out = prompts[::2], prompts[1::2]
    router = plain_router()
    for share in (0.3, 0.1, 0.5):
        result = router.calibrate(fit, strong_share=share)
        assert result.num_prompts == len(fit)
        assert result.threshold == router.config.complexity_threshold
        assert abs(result.achieved_share - share) <= 0.02
        routed = [router.route(p) for p in fit]
        assert abs(routed.count("tier_high") / len(fit) - share) <= 0.02
        unseen = [router.route(p) for p in held_out]
        assert abs(unseen.count("tier_high") / len(held_out) - share) <= 0.05


def test_calibrate_edges_and_errors() -> None:
    router = plain_router(FixedScorer(0.4))
    everything = router.calibrate(["a", "b", "c"], strong_share=1.0)
    assert everything.threshold == 0.4
    assert everything.achieved_share == 1.0
    assert router.route("x") == "tier_high"
    nothing = router.calibrate(["a", "b"], strong_share=0.0)
    assert nothing.achieved_share == 0.0
    assert nothing.threshold > 0.4
    assert router.route("x") == "tier_low"
    with pytest.raises(ConfigError, match="strong_share must be within"):
        router.calibrate(["a"], strong_share=1.5)
    with pytest.raises(ConfigError, match="at least one prompt"):
        router.calibrate([])


def test_calibrate_refuses_a_threshold_below_a_middle_tier() -> None:
    config = RoutingConfig(
        vram_source="none",
        tiers=[{"name": "a"}, {"name": "m", "min_score": 0.1}, {"name": "z"}],  # type: ignore[list-item]
    )
    router = AdaptiveRouter(config, scorer=FixedScorer(0.05), clock=FakeClock())
    with pytest.raises(ConfigError, match="conflicts with the middle tiers"):
        router.calibrate(["x", "y"], strong_share=1.0)
    assert router.config.complexity_threshold == DEFAULT_COMPLEXITY_THRESHOLD  # unchanged


def test_observe_rejects_unknown_tiers_and_reports_state() -> None:
    router = plain_router()
    with pytest.raises(ConfigError, match="unknown tier 'tier_mid'; tiers: tier_high, tier_low"):
        router.observe("tier_mid", 10.0)
    assert router.observe("tier_low", float("nan")) is CircuitState.CLOSED


def test_shutdown_stops_only_a_monitor_the_router_owns() -> None:
    source = FakeVramSource({"cuda:0": 8 << 30})
    mine = VRAMMonitor(source, poll_interval_ms=10).start()
    router = AdaptiveRouter(RoutingConfig(), scorer=StandInScorer(), monitor=mine)
    router.shutdown()
    assert mine.running
    mine.stop()
    with AdaptiveRouter(RoutingConfig(vram_source="none"), scorer=StandInScorer()) as owned:
        assert not owned.monitor.running
    assert not owned.monitor.running


def test_status_reports_circuits_and_vram() -> None:
    router = plain_router()
    router.observe("tier_high", 100.0)
    status = router.status()
    assert status["tiers"] == ["tier_high", "tier_low"]
    assert status["circuits"]["tier_high"]["observations"] == 1
    assert status["vram"]["error"] == "no VRAM source: disabled by configuration"
    assert status["vram_monitor"]["polls"] == 0


def test_concurrent_route_and_observe_are_safe() -> None:
    router = AdaptiveRouter(RoutingConfig(vram_source="none", sla_cooldown_s=0.01), scorer=StandInScorer())
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(400):
                tier = router.route(HARD if (i + seed) % 2 else EASY)
                router.observe(tier, 5000.0 if i % 7 == 0 else 100.0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_the_yaml_example_in_the_docs_is_valid(tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "routing.md"
    text = docs.read_text(encoding="utf-8")
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "routing.yaml"
    path.write_text(block)
    config = load_config(path)
    assert [t.name for t in config.tiers] == ["big", "mid", "small"]
    with AdaptiveRouter(config, scorer=FixedScorer(0.5), clock=FakeClock()) as router:
        assert router.route("x") == "mid"
