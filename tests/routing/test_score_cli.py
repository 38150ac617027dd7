"""``xpuflow score``: the score, its dimensions, the tier and every rule's reason; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from routing_helpers import GIB, HARD, StandInScorer
from typer.testing import CliRunner

from xpuflow.cli.score import register
from xpuflow.routing import RoutingConfig
from xpuflow.telemetry import VRAMMonitor
from xpuflow.testing.fake_vram import FakeVramSource


def no_gpu(config: RoutingConfig) -> VRAMMonitor:
    return VRAMMonitor.auto(source="none")


def make_app(monitor_factory: object = no_gpu, scorer_factory: object = StandInScorer) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app, scorer_factory=scorer_factory, monitor_factory=monitor_factory)  # type: ignore[arg-type]

    @app.callback()
    def main() -> None:
        """Keeps `score` a named sub-command, as in the real CLI."""

    return app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200"})


def test_json_has_score_dimensions_tier_and_every_rule(runner: CliRunner) -> None:
    result = runner.invoke(make_app(), ["score", HARD, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tier"] == "tier_high"
    assert data["score"] == pytest.approx(StandInScorer().score(HARD))
    assert set(data["dimensions"]) == {"length", "keywords"}
    assert [(r["rule"], r["verdict"]) for r in data["rules"]] == [
        ("override", "abstained"),
        ("complexity", "abstained"),
        ("vram_headroom", "abstained"),
        ("latency_sla", "abstained"),
        ("default", "chose"),
    ]
    assert all(r["reason"] for r in data["rules"])
    assert data["decision"]["tier"] == "tier_high"
    assert data["config"]["complexity_threshold"] == 0.19
    assert data["vram"]["error"] == "no VRAM source: disabled by configuration"


def test_table_output_for_an_easy_prompt(runner: CliRunner) -> None:
    result = runner.invoke(make_app(), ["score", "hello there"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "score 0.004" in out
    assert "tier tier_low" in out
    assert "Dimensions" in out
    assert "keywords" in out
    assert "Rules, in order" in out
    assert "not reached" in out
    assert "complexity" in out
    assert "chose" in out


def test_the_vram_reading_reaches_the_decision(runner: CliRunner) -> None:
    source = FakeVramSource({"cuda:0": 24 * GIB})
    source.set_free("cuda:0", GIB // 2)
    result = runner.invoke(make_app(lambda config: VRAMMonitor(source)), ["score", HARD, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tier"] == "tier_low"
    diverted = data["rules"][0]
    assert diverted["verdict"] == "diverted"
    assert diverted["rule"] == "vram_headroom"
    assert "cuda:0 has 0.50 GiB free < 1.50 GiB headroom" in diverted["reason"]
    assert not source.is_open  # the CLI closes what it opened


def test_prompt_from_stdin_even_when_it_is_not_utf8(runner: CliRunner) -> None:
    result = runner.invoke(make_app(), ["score", "-", "--json"], input=b"\xff\xfe prove it \xc3\x28")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tier"] == "tier_high"


def test_an_empty_prompt_is_scored(runner: CliRunner) -> None:
    result = runner.invoke(make_app(), ["score", "", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tier"] == "tier_low"


def test_a_config_file_changes_the_tiers(runner: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "routing.yaml"
    config.write_text("complexity_threshold: 0.001\ntiers: [{name: gpu}, {name: cpu}]\n")
    result = runner.invoke(make_app(), ["score", "hello", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tier"] == "gpu"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("latency_sla_ms: -1\n", "latency_sla_ms"), ("{", "not valid YAML")],
)
def test_bad_config_exits_2_without_a_traceback(
    runner: CliRunner, tmp_path: Path, content: str | None, message: str
) -> None:
    config = tmp_path / "routing.yaml"
    if content is not None:
        config.write_text(content)
    result = runner.invoke(make_app(), ["score", "hi", "--config", str(config)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_scorer_that_cannot_load_exits_1_with_a_message(runner: CliRunner) -> None:
    def broken() -> StandInScorer:
        raise ImportError("complexity weights missing")

    result = runner.invoke(make_app(scorer_factory=broken), ["score", "hi"])
    assert result.exit_code == 1
    assert "the complexity scorer could not load (ImportError: complexity weights missing)" in result.output
    assert "Traceback" not in result.output


def test_a_failing_explain_still_prints_the_score_and_tier(runner: CliRunner) -> None:
    class NoExplain(StandInScorer):
        def explain(self, prompt: str) -> dict[str, object]:
            raise RuntimeError("explain bug")

    result = runner.invoke(make_app(scorer_factory=NoExplain), ["score", HARD, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tier"] == "tier_high"
    assert data["explain"] == {"error": "RuntimeError: explain bug"}


def test_the_real_scorer_shows_every_dimension_and_its_words(runner: CliRunner) -> None:
    from xpuflow.policy.complexity import ComplexityScorer
    from xpuflow.policy.complexity_features import DIMENSIONS

    app = make_app(scorer_factory=ComplexityScorer)
    data = json.loads(runner.invoke(app, ["score", HARD, "--json"]).stdout)
    assert set(data["dimensions"]) == set(DIMENSIONS)
    explained = data["explain"]
    assert explained["logit"] == pytest.approx(explained["bias"] + sum(data["dimensions"].values()))
    assert explained["expert"] in ("open", "choice")
    assert explained["words"]  # the vocabulary words found, with their weights
    table = runner.invoke(app, ["score", HARD]).stdout
    for name in DIMENSIONS:
        assert name in table
