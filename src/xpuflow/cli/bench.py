"""``xpuflow bench URL``: load an OpenAI-compatible endpoint and report latency, TTFT, ITL and throughput.

    xpuflow bench http://127.0.0.1:8000 --concurrency 8 --requests 200
    xpuflow bench http://127.0.0.1:8000 --rate 20 --duration-s 60 --json run.json --plot run.png
    xpuflow bench http://127.0.0.1:8000 --trace AzureLLMInferenceTrace_conv.csv --speedup 20 --requests 500

Every run ends by itself (``--requests``, default 100, or ``--duration-s``) and sends only to URL.
Exit codes: 0 the run finished and some requests succeeded, 1 no request succeeded (the table says why),
2 bad input (a bad option, an unreadable prompts or trace file).
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from xpuflow.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from rich.console import Console

    from xpuflow.loadgen.arrivals import RequestSpec
    from xpuflow.loadgen.runner import BenchPlan, BenchResult

__all__ = ["register"]

EXIT_ALL_FAILED = 1
EXIT_BAD_INPUT = 2
DEFAULT_REQUESTS = 100
DEFAULT_MAX_TOKENS = 64


def _error(message: str, code: int) -> typer.Exit:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True).print(Text.assemble(("error: ", "bold red"), (message, "red")), soft_wrap=True)
    return typer.Exit(code)


def _specs(
    plan: BenchPlan,
    *,
    prompts_path: Path | None,
    trace_path: Path | None,
    speedup: float,
    max_prompt_tokens: int,
    max_tokens_cap: int | None,
    poisson: bool,
    seed: int,
) -> Iterator[RequestSpec]:
    from xpuflow.loadgen.arrivals import (
        DEFAULT_PROMPTS,
        closed_loop_specs,
        load_prompts,
        rate_specs,
        read_trace,
        trace_specs,
    )

    rng = random.Random(seed)
    if trace_path is not None:
        if prompts_path is not None:
            raise ConfigError("use --prompts or --trace, not both", field="--trace")
        if plan.rate_per_s is not None:
            raise ConfigError(
                "a trace sets its own arrival times; use --speedup instead of --rate", field="--rate"
            )
        if max_prompt_tokens < 1:
            raise ConfigError(
                f"--max-prompt-tokens must be >= 1, got {max_prompt_tokens}", field="--max-prompt-tokens"
            )
        rows = read_trace(trace_path, limit=plan.num_requests)
        if not rows:
            raise ConfigError(f"{trace_path} holds no requests", field="--trace")
        return trace_specs(
            rows, speedup=speedup, rng=rng, max_prompt_tokens=max_prompt_tokens, max_tokens_cap=max_tokens_cap
        )
    prompts = load_prompts(prompts_path) if prompts_path is not None else DEFAULT_PROMPTS
    if plan.rate_per_s is not None:
        return rate_specs(
            prompts, rate_per_s=plan.rate_per_s, max_tokens=plan.max_tokens, rng=rng, poisson=poisson
        )
    return closed_loop_specs(prompts, plan.max_tokens)


async def _run_with_progress(plan: BenchPlan, specs: Iterator[RequestSpec], console: Console) -> BenchResult:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from xpuflow.loadgen.runner import RequestRecord, run_bench

    by_count = plan.num_requests is not None
    total = float(plan.num_requests) if plan.num_requests is not None else plan.duration_s
    done = failed = 0
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]bench[/]"),
        BarColumn(),
        TextColumn("{task.fields[done]} done, {task.fields[errors]} failed"),
        TimeElapsedColumn(),
        console=console,
    )

    def on_record(record: RequestRecord) -> None:
        nonlocal done, failed
        done += 1
        failed += 0 if record.ok else 1
        progress.update(task, advance=1 if by_count else 0, done=done, errors=failed)

    async def tick() -> None:  # a duration-bound run fills its bar with time
        started = time.monotonic()
        while True:
            progress.update(task, completed=min(time.monotonic() - started, total or 0.0))
            await asyncio.sleep(0.2)

    with progress:
        task = progress.add_task("bench", total=total, done=0, errors=0)
        ticker = None if by_count else asyncio.create_task(tick())
        try:
            result = await run_bench(plan, specs, on_record=on_record)
        finally:
            if ticker is not None:
                ticker.cancel()
        progress.update(task, completed=total, done=done, errors=failed)
    return result


def bench(
    url: Annotated[
        str,
        typer.Argument(help="The server: http://HOST:PORT, .../v1, or a full .../v1/chat/completions URL."),
    ],
    model: Annotated[str, typer.Option(help="Model name sent in each request.")] = "chat",
    concurrency: Annotated[
        int | None,
        typer.Option(
            help="Clients sending back to back (default 1); with --rate or --trace, the most in flight."
        ),
    ] = None,
    rate: Annotated[float | None, typer.Option("--rate", help="Requests per second, open loop.")] = None,
    constant_rate: Annotated[
        bool, typer.Option("--constant-rate", help="Even gaps at --rate instead of Poisson arrivals.")
    ] = False,
    requests: Annotated[
        int | None,
        typer.Option(
            "--requests", help=f"Requests to send (default {DEFAULT_REQUESTS} without --duration-s)."
        ),
    ] = None,
    duration_s: Annotated[
        float | None, typer.Option("--duration-s", help="Stop starting requests after this many seconds.")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts", help="Prompts: one per line, or JSON lines with prompt or messages.", dir_okay=False
        ),
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            help="Replay arrivals from an Azure trace (.csv) or a Mooncake trace (.jsonl).",
            dir_okay=False,
        ),
    ] = None,
    speedup: Annotated[float, typer.Option(help="Replay a trace this many times faster.")] = 1.0,
    max_prompt_tokens: Annotated[
        int, typer.Option("--max-prompt-tokens", help="Cap on a trace row's synthetic prompt length.")
    ] = 2048,
    stream: Annotated[
        bool, typer.Option("--stream/--no-stream", help="Stream responses (measures TTFT and ITL).")
    ] = True,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-tokens",
            help=f"max_tokens per request (default {DEFAULT_MAX_TOKENS}); with --trace, caps the trace's.",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="XPUFLOW_API_KEY", help="Bearer key (or $XPUFLOW_API_KEY)."),
    ] = None,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", help="Give up on one request after this long.")
    ] = 60.0,
    seed: Annotated[int, typer.Option(help="Seed for arrivals and synthetic prompts.")] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the summary and every request here.", dir_okay=False)
    ] = None,
    plot_out: Annotated[
        Path | None,
        typer.Option("--plot", help="Write a PNG of latency over time and its histogram.", dir_okay=False),
    ] = None,
) -> None:
    """Load an OpenAI-compatible endpoint; print latency, TTFT and ITL percentiles, throughput and errors."""
    from rich.console import Console

    from xpuflow.loadgen.report import render_summary, summarize, write_json, write_plot
    from xpuflow.loadgen.runner import BenchPlan

    if requests is None and duration_s is None:
        requests = DEFAULT_REQUESTS
    try:
        plan = BenchPlan(
            url=url,
            model=model,
            concurrency=concurrency,
            rate_per_s=rate,
            num_requests=requests,
            duration_s=duration_s,
            stream=stream,
            max_tokens=max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS,
            api_key=api_key,
            timeout_s=timeout_s,
        )
        specs = _specs(
            plan,
            prompts_path=prompts,
            trace_path=trace,
            speedup=speedup,
            max_prompt_tokens=max_prompt_tokens,
            max_tokens_cap=max_tokens,
            poisson=not constant_rate,
            seed=seed,
        )
        if plot_out is not None and importlib.util.find_spec("matplotlib") is None:
            raise ConfigError("--plot needs matplotlib: pip install 'xpuflow[bench]'", field="--plot")
    except ConfigError as exc:
        raise _error(str(exc), EXIT_BAD_INPUT) from None

    console = Console()
    result = asyncio.run(_run_with_progress(plan, specs, Console(stderr=True)))
    summary = summarize(result)
    render_summary(summary, console)
    try:
        if json_out is not None:
            write_json(json_out, result, summary)
            console.print(f"wrote {json_out}", highlight=False, markup=False)
        if plot_out is not None:
            write_plot(plot_out, result)
            console.print(f"wrote {plot_out}", highlight=False, markup=False)
    except ConfigError as exc:
        raise _error(str(exc), EXIT_BAD_INPUT) from None
    if summary["ok"] == 0:
        raise _error(f"no request to {plan.endpoint} succeeded", EXIT_ALL_FAILED)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to the ``xpuflow`` command."""
    app.command("bench")(bench)
