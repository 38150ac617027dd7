"""The ``xpuflow`` command.

Every sub-command prints a readable table, or stable JSON with ``--json`` (documented in docs/cli.md).
Bad input exits 2 with a one-line message and no traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, NoReturn

import typer

from xpuflow.errors import XpuflowError

app = typer.Typer(
    name="xpuflow",
    help="Serve ML and LLM workloads across heterogeneous hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print an error for a person (no traceback) and exit."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@app.command()
def info(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (see docs/cli.md).")] = False,
    cluster: Annotated[
        bool, typer.Option("--cluster", help="Every node of a Ray cluster (docs/cluster.md).")
    ] = False,
    address: Annotated[
        str, typer.Option("--address", help="With --cluster: auto, local, ray://host:port or host:port.")
    ] = "auto",
) -> None:
    """Show the hardware xpuflow found, how each probe fared, and which backends are usable."""
    if cluster:
        from xpuflow.cli.cluster import cluster_inventory, render_cluster

        try:
            found = cluster_inventory(address)
        except XpuflowError as exc:
            fail(str(exc))
        if as_json:
            print_json(found.to_dict())
        else:
            render_cluster(found)
        return
    from xpuflow.backends.registry import list_backends
    from xpuflow.discovery.inventory import Inventory

    inventory = Inventory.detect()
    backends = list_backends()
    if as_json:
        from xpuflow import __version__

        print_json(
            {"xpuflow": __version__, **inventory.to_dict(), "backends": [b.to_dict() for b in backends]}
        )
        return
    from xpuflow.cli.render import render_info

    render_info(inventory, backends)


@app.command()
def advise(
    params: Annotated[float, typer.Option("--params", help="Model size in parameters, e.g. 7e9.")],
    batch: Annotated[int, typer.Option("--batch", help="Batch size.")] = 1,
    precision: Annotated[str, typer.Option(help="fp32, fp16, bf16, fp8, int8 or int4.")] = "fp32",
    strategy: Annotated[str, typer.Option(help="auto, latency, throughput or power.")] = "auto",
    task: Annotated[str, typer.Option(help="inference or training.")] = "inference",
    model_format: Annotated[
        str | None, typer.Option("--format", help="Model format, e.g. onnx or gguf.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (see docs/cli.md).")] = False,
) -> None:
    """Advise which device fits a workload, why, and why not the others."""
    from xpuflow.workload import advise as run_advise

    try:
        decision = run_advise(
            params,
            batch_size=batch,
            precision=precision,
            strategy=strategy,
            task=task,
            model_format=model_format,
        )
    except XpuflowError as exc:
        fail(str(exc))
    if as_json:
        print_json(decision.to_dict())
        return
    from xpuflow.cli.render import render_decision

    render_decision(decision)


def _register_subcommands() -> None:
    """Sub-commands that live in their own modules (each imports its heavy parts lazily)."""
    from xpuflow.cli import artifacts, bench, score, serve, simulate

    serve.register(app)
    artifacts.register(app)
    score.register(app)
    bench.register(app)
    simulate.register(app)


_register_subcommands()


def main() -> None:
    try:
        app()
    except XpuflowError as exc:  # a last guard: never a traceback for a user error
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
