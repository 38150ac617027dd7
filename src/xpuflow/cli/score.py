"""``xpuflow score PROMPT``: a prompt's complexity, each dimension of it, and the tier it would get.

    xpuflow score "Prove that sqrt(2) is irrational"
    xpuflow score - < prompt.txt --json
    xpuflow score "hello" --config routing.yaml

The tier is the one the routing config (default: the shipped defaults) would choose right now, with the
reason of every rule in the chain, including those after the deciding one (marked "not reached").
Free VRAM is read once from the configured source; no monitor thread is started and nothing is sent to
a model. Exit codes: 0 scored, 1 the scorer could not load, 2 bad input (config missing or invalid,
unreadable standard input).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from xpuflow.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

    from xpuflow.routing.adaptive import RoutingConfig, Scorer
    from xpuflow.routing.tier_router import RuleTrace
    from xpuflow.telemetry.vram import VRAMMonitor
    from xpuflow.types import RoutingDecision

__all__ = ["MonitorFactory", "ScorerFactory", "register"]

#: Builds the complexity scorer; tests pass a stand-in.
ScorerFactory = Callable[[], "Scorer"]
#: Builds the VRAM monitor for a config (not started: ``score`` polls it once).
MonitorFactory = Callable[["RoutingConfig"], "VRAMMonitor"]

EXIT_SCORER = 1
EXIT_BAD_INPUT = 2


def _default_scorer() -> Scorer:
    from xpuflow.policy.complexity import ComplexityScorer

    scorer: Scorer = ComplexityScorer()
    return scorer


def _default_monitor(config: RoutingConfig) -> VRAMMonitor:
    from xpuflow.telemetry.vram import VRAMMonitor

    return VRAMMonitor.auto(source=config.vram_source, poll_interval_ms=config.vram_poll_interval_ms)


def _error(message: str, code: int) -> typer.Exit:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True).print(Text.assemble(("error: ", "bold red"), (message, "red")), soft_wrap=True)
    return typer.Exit(code)


def _read_prompt(prompt: str) -> str:
    from xpuflow.routing.adaptive import as_prompt_text

    if prompt != "-":
        return as_prompt_text(prompt)  # argv may carry undecodable bytes as lone surrogates
    try:
        data = typer.get_binary_stream("stdin").read()
    except OSError as exc:
        raise ConfigError(f"cannot read the prompt from standard input: {exc}") from exc
    return as_prompt_text(data)


def _dimensions(explained: Mapping[str, Any]) -> dict[str, Any]:
    """The per-dimension part of ``ComplexityScorer.explain`` (its ``contributions``: each dimension's
    push on the logit), or of another scorer's explanation, whatever key it sits under."""
    for key in ("contributions", "dimensions", "features", "components"):
        value = explained.get(key)
        if isinstance(value, Mapping):
            return dict(value)
    return {
        key: value
        for key, value in explained.items()
        if key != "score" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _explain(scorer: Scorer, prompt: str) -> dict[str, Any]:
    explain = getattr(scorer, "explain", None)
    if explain is None:
        return {}
    try:
        result = explain(prompt)
    except Exception as exc:  # the explanation is extra; the score and tier still stand
        return {"error": f"{type(exc).__name__}: {exc}"}
    if isinstance(result, Mapping):
        return dict(result)
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)  # ComplexityScorer.explain's Explanation
    return {"explanation": result}


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_number(v)}" for k, v in value.items())
    return str(value)


def _render(
    console: Console,
    prompt: str,
    decision: RoutingDecision,
    trace: tuple[RuleTrace, ...],
    dimensions: Mapping[str, Any],
    vram: dict[str, Any],
) -> None:
    from rich.markup import escape
    from rich.table import Table

    score = decision.details.get("score")
    score_text = "unknown" if score is None else f"{score:.3f}"
    console.print(f"[bold]score[/] {score_text}  ({len(prompt)} characters)", highlight=False)
    if dimensions:
        table = Table(title="Dimensions", title_justify="left")
        table.add_column("dimension")
        table.add_column("value", justify="right")
        for name, value in dimensions.items():
            table.add_row(escape(str(name)), escape(_number(value)))
        console.print(table)
        console.print("[dim]each value: that dimension's push on the logit (+ leans to the strong tier)[/]")
    console.print(
        f"[bold]tier[/] {escape(str(decision.tier))}  confidence {decision.confidence:.2f}  "
        f"({escape(decision.reason)})",
        highlight=False,
    )
    rules = Table(title="Rules, in order", title_justify="left")
    for column in ("rule", "verdict", "tier", "reason"):
        rules.add_column(column, overflow="fold")
    for line in trace:
        rules.add_row(escape(line.rule), line.verdict, escape(line.tier or "-"), escape(line.reason))
    console.print(rules)
    source = vram.get("source", "none")
    devices = ", ".join(
        f"{d['device']} {d['free_bytes'] / (1 << 30):.1f} GiB free" for d in vram.get("devices", [])
    )
    note = devices or escape(str(vram.get("error") or "no GPU"))
    console.print(f"[dim]VRAM ({escape(str(source))}): {note}[/]", highlight=False)


def _run(
    prompt_arg: str,
    as_json: bool,
    config_path: Path | None,
    scorer_factory: ScorerFactory,
    monitor_factory: MonitorFactory,
) -> None:
    from xpuflow.routing.adaptive import AdaptiveRouter, RoutingConfig, load_config

    try:
        config = load_config(config_path) if config_path is not None else RoutingConfig()
        prompt = _read_prompt(prompt_arg)
    except ConfigError as exc:
        raise _error(str(exc), EXIT_BAD_INPUT) from None
    try:
        scorer = scorer_factory()
    except Exception as exc:  # an install problem, not the user's input
        raise _error(
            f"the complexity scorer could not load ({type(exc).__name__}: {exc})", EXIT_SCORER
        ) from None

    monitor = monitor_factory(config)
    try:
        monitor.poll_once()
        router = AdaptiveRouter(config, scorer=scorer, monitor=monitor)
        decision, trace = router.explain(prompt)
        vram = monitor.snapshot().to_dict()
    finally:
        monitor.stop()
    explained = _explain(scorer, prompt[: config.max_scored_chars])
    dimensions = _dimensions(explained)

    if as_json:
        payload = {
            "prompt_chars": len(prompt),
            "score": decision.details.get("score"),
            # whether the word lookups ran in the C extension (False: the pure-Python path)
            "scorer_accelerated": bool(getattr(scorer, "accelerated", False)),
            "dimensions": dimensions,
            "explain": explained,
            "tier": decision.tier,
            "confidence": decision.confidence,
            "reason": decision.reason,
            "rules": [line.to_dict() for line in trace],
            "decision": decision.to_dict(),
            "config": {
                "complexity_threshold": config.complexity_threshold,
                "tiers": [tier.model_dump() for tier in config.tiers],
            },
            "vram": vram,
        }
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
        return
    from rich.console import Console

    _render(Console(), prompt, decision, trace, dimensions, vram)


def register(
    app: typer.Typer,
    *,
    scorer_factory: ScorerFactory | None = None,
    monitor_factory: MonitorFactory | None = None,
) -> None:
    """Add ``score`` to ``app``. The factories replace the shipped scorer and the VRAM source (tests)."""
    make_scorer = scorer_factory or _default_scorer
    make_monitor = monitor_factory or _default_monitor

    @app.command("score")
    def score(
        prompt: Annotated[str, typer.Argument(help="The prompt to score; '-' reads it from standard input.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
        config: Annotated[
            Path | None,
            typer.Option(
                "--config", help="Routing config (YAML); default: the shipped defaults.", dir_okay=True
            ),
        ] = None,
    ) -> None:
        """Score a prompt's complexity and show the tier the routing rules would choose, and why."""
        _run(prompt, as_json, config, make_scorer, make_monitor)
