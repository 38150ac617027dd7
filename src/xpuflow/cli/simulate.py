"""``xpuflow simulate CONFIG --trace NAME|FILE``: a trace through xpuflow's policies on a virtual clock.

    xpuflow simulate fleet.yaml --trace azure-conv --duration-s 600
    xpuflow simulate fleet.yaml --trace azure-conv --compare --json out.json --plot out.png
    xpuflow simulate fleet.yaml --trace mooncake --slo ttft_p99=2s,e2e_p99=30s --find-min --scale 2
    xpuflow simulate fleet.yaml --trace my.jsonl --compare --kill big/0@60 --slow small/2x4@30
    xpuflow simulate-fit backends.json --backend llamacpp --out cpu.yaml

Exit codes: 0 done (with ``--find-min``: a fleet that meets the SLO was found), 1 ``--find-min`` found
none within ``--max-workers``, 2 bad input. See docs/simulate.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from xpuflow.errors import ConfigError

__all__ = ["register"]

EXIT_NOT_MET = 1
EXIT_BAD_INPUT = 2


def _error(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True).print(Text.assemble(("error: ", "bold red"), (message, "red")), soft_wrap=True)
    return typer.Exit(code)


def simulate(
    config: Annotated[
        Path,
        typer.Argument(help="xpuflow config; each deployment sets options.device_model."),
    ],
    trace: Annotated[
        str,
        typer.Option("--trace", help="azure-conv, azure-code, mooncake, or a file."),
    ],
    trace_dir: Annotated[
        list[Path] | None,
        typer.Option("--trace-dir", help="Folder to look up trace names in (repeatable)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Logical model to simulate (default: first)."),
    ] = None,
    start_s: Annotated[float, typer.Option("--start-s", help="Skip the trace's first S seconds.")] = 0.0,
    duration_s: Annotated[
        float | None,
        typer.Option("--duration-s", help="Replay S seconds of the trace."),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="At most N requests.")] = None,
    scale: Annotated[float, typer.Option("--scale", help="Multiply the arrival rate by X.")] = 1.0,
    policy: Annotated[
        str,
        typer.Option("--policy", help="xpuflow, round-robin, random, p2c, jsq, least-latency."),
    ] = "xpuflow",
    compare: Annotated[bool, typer.Option("--compare", help="Run every policy on the same trace.")] = False,
    slo: Annotated[
        str, typer.Option("--slo", help="Targets, e.g. ttft_p99=2s,e2e_p99=30s.")
    ] = "ttft_p99=2s,e2e_p99=30s",
    find_min: Annotated[
        bool,
        typer.Option("--find-min", help="Search the smallest fleet that meets --slo."),
    ] = False,
    max_workers: Annotated[int, typer.Option("--max-workers", help="Largest fleet --find-min tries.")] = 256,
    kill: Annotated[list[str] | None, typer.Option("--kill", help="WORKER@T: kill a worker at T s.")] = None,
    slow: Annotated[
        list[str] | None,
        typer.Option("--slow", help="WORKERxK@T: K times slower from T s."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every random choice.")] = 0,
    sample: Annotated[
        int | None,
        typer.Option(
            "--sample",
            help="Choose among this many workers drawn at random per pick (default: all, as the gateway).",
            min=1,
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON.")] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Latency CDFs and utilisation (PNG; needs matplotlib)."),
    ] = None,
) -> None:
    """Replay a request trace through xpuflow's routing and scheduling on a virtual clock (no sleeping)."""
    from rich.console import Console

    from xpuflow.simulate import (
        BASELINES,
        PolicyName,
        Simulation,
        capacity_per_s,
        default_trace_dirs,
        find_min_fleet,
        load_fleet,
        load_trace,
        parse_kill,
        parse_slo,
        parse_slow,
        render_table,
        summarize,
        write_plot,
    )

    console = Console()
    try:
        if not scale > 0:
            raise ConfigError(f"--scale must be > 0, got {scale}", field="--scale")
        if plot is not None and not _has_matplotlib():
            raise ConfigError("--plot needs matplotlib: pip install 'xpuflow[bench]'", field="--plot")
        try:
            chosen = PolicyName(policy)
        except ValueError:
            raise ConfigError(
                f"unknown policy '{policy}'; valid: {', '.join(p.value for p in PolicyName)}",
                field="--policy",
            ) from None
        target = parse_slo(slo)
        faults = [parse_kill(k) for k in kill or []] + [parse_slow(s) for s in slow or []]
        fleet = load_fleet(config, model)
        dirs = list(trace_dir or []) + default_trace_dirs()
        requests = load_trace(trace, dirs, start_s=start_s, duration_s=duration_s, limit=limit)
    except ConfigError as exc:
        raise _error(str(exc)) from None
    span = requests[-1].arrival_s / scale if len(requests) > 1 else 0.0
    capacity = capacity_per_s(fleet, requests)
    console.print(
        f"{len(requests)} requests over {span:,.0f} s ({len(requests) / max(span, 1e-9):.2f}/s) on "
        f"{len(fleet.worker_ids())} workers of model '{fleet.model_name}' "
        f"(capacity about {capacity:.2f} requests/s, each device at the batch size it achieves)",
        highlight=False,
    )
    output: dict[str, Any] = {
        "format_version": 1,
        "config": str(config),
        "trace": trace,
        "requests": len(requests),
        "scale": scale,
        "slo": target.describe(),
        "fleet": fleet.replicas(),
        "capacity_per_s": capacity,
    }
    if find_min:

        def progress(counts: dict[str, int], ok: bool) -> None:
            console.print(
                f"  tried {counts}: {'meets' if ok else 'misses'} the SLO",
                highlight=False,
            )

        try:
            plan = find_min_fleet(
                fleet,
                requests,
                target,
                policy=chosen,
                scale=scale,
                seed=seed,
                max_workers=max_workers,
                progress=progress,
            )
        except ValueError as exc:
            raise _error(str(exc)) from None
        output["find_min"] = {
            "counts": plan.counts,
            "met": plan.met,
            "p99": plan.summary,
            "tried": [{"counts": c, "met": m, "p99": s} for c, m, s in plan.tried],
        }
        verdict = "meets" if plan.met else "does NOT meet (search limit reached)"
        console.print(
            f"smallest fleet found: {plan.counts} {verdict} {target.describe()}; p99 {plan.summary}",
            highlight=False,
        )
        _write(json_out, output)
        if not plan.met:
            raise typer.Exit(EXIT_NOT_MET)
        return
    policies = [PolicyName.XPUFLOW, *BASELINES] if compare else [chosen]
    results = []
    summaries = []
    for name in policies:
        began = time.perf_counter()
        try:
            result = Simulation(
                fleet, requests, policy=name, seed=seed, scale=scale, faults=faults, sample=sample
            ).run()
        except (ConfigError, ValueError) as exc:
            raise _error(str(exc)) from None
        wall = time.perf_counter() - began
        summary = summarize(result, target)
        summary["wall_s"] = wall
        results.append(result)
        summaries.append(summary)
    console.print(
        render_table(
            summaries,
            title=f"Simulated {trace} x{scale:g}, SLO {target.describe()} (ms)",
        )
    )
    if faults:
        console.print("faults: " + "; ".join(f.describe() for f in faults), highlight=False)
    output["policies"] = summaries
    _write(json_out, output)
    if plot is not None:
        write_plot(plot, results)


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _write(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def simulate_fit(
    files: Annotated[list[Path], typer.Argument(help="xpuflow bench --json runs, or backends.json.")],
    out: Annotated[Path, typer.Option("--out", help="Device model file to write (.yaml or .json).")],
    backend: Annotated[
        str | None, typer.Option("--backend", help="With backends.json: which backend.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Name of the device model.")] = None,
    prompt_tokens: Annotated[
        int | None,
        typer.Option("--prompt-tokens", help="Prompt length when runs lack it."),
    ] = None,
    prefill_ratio: Annotated[
        float,
        typer.Option("--prefill-ratio", help="backends.json: prefill / decode speed."),
    ] = 10.0,
    max_batch_size: Annotated[
        int | None,
        typer.Option("--max-batch-size", help="Largest batch the device runs."),
    ] = None,
    memory_gb: Annotated[float | None, typer.Option("--memory-gb", help="Device memory, GiB.")] = None,
) -> None:
    """Fit a device model (prefill and decode tokens/s per batch size) from measurements."""
    from xpuflow.simulate import fit_backends_json, fit_bench_runs, save_device_model

    memory = None if memory_gb is None else int(memory_gb * (1 << 30))
    try:
        if backend is not None:
            if len(files) != 1:
                raise ConfigError("--backend reads one backends.json file", field="--backend")
            model = fit_backends_json(
                files[0], backend, name=name, prefill_ratio=prefill_ratio, max_batch_size=max_batch_size,
                memory_bytes=memory,
            )  # fmt: skip
        else:
            model = fit_bench_runs(
                files,
                name=name or out.stem,
                prompt_tokens_guess=prompt_tokens,
                max_batch_size=max_batch_size,
                memory_bytes=memory,
            )
        save_device_model(model, out)
    except ConfigError as exc:
        raise _error(str(exc)) from None
    typer.echo(
        f"wrote {out}: prefill {dict(model.prefill_tokens_per_s)} tok/s, "
        f"decode {dict(model.decode_tokens_per_s)} tok/s"
    )


def register(app: typer.Typer) -> None:
    app.command(name="simulate")(simulate)
    app.command(name="simulate-fit")(simulate_fit)
