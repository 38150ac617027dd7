"""``xpuflow build`` and ``xpuflow artifacts ls|gc``: build what a config needs, inspect and trim the cache.

    xpuflow build xpuflow.yaml [--store PATH]
    xpuflow artifacts ls [--json] [--store PATH]
    xpuflow artifacts gc [--older-than-days N] [--max-bytes N] [--dry-run] [--store PATH]

Exit codes: 0 when every deployment built, 1 when one could not (backend unavailable, no usable device,
build failed; each is reported with its reason), 2 for bad input (config file missing or invalid).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from xpuflow.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

    from xpuflow.artifacts.profile import BuildArtifact
    from xpuflow.artifacts.store import ArtifactStore
    from xpuflow.backends.base import BackendPlugin
    from xpuflow.discovery.inventory import Inventory
    from xpuflow.types import Resource

__all__ = ["InventoryFactory", "register"]

log = logging.getLogger(__name__)

#: Finds the resources for a config's declared ones; tests pass one that returns a fixed inventory.
InventoryFactory = Callable[[Sequence[Mapping[str, Any]]], "Inventory"]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

StoreOption = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="Artifact store folder (default: the config's artifact_dir, $XPUFLOW_CACHE_DIR, "
        "or ~/.cache/xpuflow/artifacts).",
        file_okay=False,
    ),
]


def _detect_inventory(declared: Sequence[Mapping[str, Any]]) -> Inventory:
    from xpuflow.discovery.inventory import Inventory

    return Inventory.detect(declared=declared)


def _consoles() -> tuple[Console, Console]:
    from rich.console import Console

    return Console(), Console(stderr=True)


def _error(console: Console, message: str) -> None:
    from rich.text import Text

    console.print(Text.assemble(("error: ", "bold red"), (message, "red")), soft_wrap=True)


def _human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _artifacts(count: int) -> str:
    return f"{count} artifact" if count == 1 else f"{count} artifacts"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _when(epoch_s: float | None) -> str:
    return datetime.fromtimestamp(epoch_s).strftime("%Y-%m-%d %H:%M") if epoch_s else "-"


def _open_store(store_path: Path | None) -> ArtifactStore:
    from xpuflow.artifacts.store import ArtifactStore

    return ArtifactStore(store_path)


# -- build --------------------------------------------------------------------------------------------


def _resolve_device(plugin: BackendPlugin, device: str, inventory: Inventory) -> tuple[list[Resource], str]:
    """The resources to build for, or none and the reason. 'auto' takes the plugin's first usable one."""
    try:
        if device == "auto":
            usable = plugin.probe(list(inventory.resources))
            if not usable:
                found = ", ".join(r.id for r in inventory.resources) or "none"
                return [], f"backend '{plugin.name}' can use none of the resources found ({found})"
            return usable[:1], ""
        resource = inventory.get(device)
        if resource is None:
            found = ", ".join(r.id for r in inventory.resources) or "none"
            return [], f"device '{device}' was not found (found: {found}); use one of them or device: auto"
        if not plugin.probe([resource]):
            return [], f"backend '{plugin.name}' cannot run on '{device}'; choose another device or auto"
        return [resource], ""
    except Exception as exc:  # probes must not raise; if one does, report it instead of crashing
        return [], f"backend '{plugin.name}' failed to probe devices: {type(exc).__name__}: {exc}"


def _run_build(config_path: Path, store_path: Path | None, detect: InventoryFactory) -> int:
    from rich.table import Table

    from xpuflow.artifacts.builder import RichProgress, build_all
    from xpuflow.artifacts.store import ArtifactStore
    from xpuflow.backends.registry import get_backend
    from xpuflow.config import load_config
    from xpuflow.errors import BackendUnavailable, XpuflowError

    out, err = _consoles()
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        _error(err, str(exc))
        return EXIT_BAD_INPUT
    base_dir = config_path.resolve().parent
    if store_path is None and cfg.artifact_dir:
        configured = Path(cfg.artifact_dir).expanduser()
        store_path = configured if configured.is_absolute() else base_dir / configured
    store = ArtifactStore(store_path)
    if not cfg.deployments:
        out.print(f"{config_path} has no deployments; nothing to build")
        return 0

    inventory = detect(cfg.declared_resources())
    table = Table(title=f"artifacts in {store.root}")
    for column in ("deployment", "backend", "device", "profile", "artifact", "result", "time", "size"):
        table.add_column(
            column,
            justify="right" if column in ("time", "size") else "left",
            no_wrap=column in ("artifact", "result", "time", "size"),
        )
    failures: list[str] = []
    exit_code = 0
    with RichProgress(console=err) as progress:
        for dep in cfg.deployments:
            try:
                plugin = get_backend(dep.backend)
                availability = plugin.availability()
                if not availability.available:
                    raise BackendUnavailable(f"backend '{dep.backend}' is unavailable: {availability.reason}")
                resources, reason = _resolve_device(plugin, dep.device, inventory)
                if not resources:
                    raise BackendUnavailable(reason)
                start = time.perf_counter()
                artifacts = build_all(
                    plugin, resources, dep.to_model_config(base_dir), store, progress=progress
                )
            except ConfigError as exc:
                failures.append(f"{dep.name}: {exc}")
                exit_code = EXIT_BAD_INPUT
                continue
            except Exception as exc:
                detail = str(exc) if isinstance(exc, XpuflowError) else f"{type(exc).__name__}: {exc}"
                log.debug("deployment %s failed", dep.name, exc_info=True)
                failures.append(f"{dep.name}: {detail}")
                exit_code = max(exit_code, EXIT_FAILED)
                continue
            device = ", ".join(r.id for r in resources)
            if not artifacts:
                elapsed = time.perf_counter() - start
                table.add_row(
                    dep.name, dep.backend, device, "-", "-", "nothing to build", _duration(elapsed), "-"
                )
            for name, artifact in artifacts.items():
                table.add_row(*_artifact_row(dep.name, dep.backend, device, name, artifact))
    out.print(table)
    for failure in failures:
        _error(err, failure)
    return exit_code


def _artifact_row(
    deployment: str, backend: str, device: str, name: str, artifact: BuildArtifact
) -> list[str]:
    meta = artifact.metadata
    return [
        deployment,
        backend,
        device,
        name,
        artifact.id[:12],
        "hit" if meta.get("hit") else "miss",
        _duration(meta.get("elapsed_s", 0.0)),
        _human_bytes(meta.get("total_bytes", 0)),
    ]


# -- artifacts ls / gc --------------------------------------------------------------------------------


def _artifact_json(artifact: BuildArtifact) -> dict[str, Any]:
    data = artifact.to_dict()
    data["metadata"] = {k: v for k, v in data["metadata"].items() if k not in ("hit", "elapsed_s")}
    return data


def _artifacts_table(title: str, artifacts: Sequence[BuildArtifact]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("id", "model", "profile", "backend", "size", "last used"):
        table.add_column(
            column,
            justify="right" if column == "size" else "left",
            no_wrap=column in ("id", "size", "last used"),
        )
    for a in artifacts:
        table.add_row(
            a.id[:12],
            a.model_id,
            f"{a.profile.name} ({a.profile.target.value})",
            a.profile.backend,
            _human_bytes(a.metadata.get("total_bytes", 0)),
            _when(a.metadata.get("last_used")),
        )
    return table


def _ls(store_path: Path | None, as_json: bool) -> None:
    store = _open_store(store_path)
    artifacts = store.list()
    if as_json:
        typer.echo(json.dumps([_artifact_json(a) for a in artifacts], indent=2))
        return
    out, _ = _consoles()
    total = sum(int(a.metadata.get("total_bytes", 0)) for a in artifacts)
    out.print(
        _artifacts_table(f"{_artifacts(len(artifacts))}, {_human_bytes(total)} in {store.root}", artifacts)
    )


def _gc(store_path: Path | None, older_than_days: float | None, max_bytes: int | None, dry_run: bool) -> None:
    from rich.table import Table

    store = _open_store(store_path)
    # Leftovers first: gc removes them too, and this way both runs name each one it (would) remove.
    leftovers = store.leftovers(remove=not dry_run)
    removed = store.gc(
        older_than_s=older_than_days * 86400.0 if older_than_days is not None else None,
        max_total_bytes=max_bytes,
        dry_run=dry_run,
    )
    out, _ = _consoles()
    verb = "would remove" if dry_run else "removed"
    if removed:
        freed = sum(int(a.metadata.get("total_bytes", 0)) for a in removed)
        out.print(_artifacts_table(f"{verb} {_artifacts(len(removed))} ({_human_bytes(freed)})", removed))
    if leftovers:
        freed = sum(item.size_bytes for item in leftovers)
        count = f"{len(leftovers)} leftover" + ("" if len(leftovers) == 1 else "s")
        table = Table(title=f"{verb} {count} of crashed builds or deletions ({_human_bytes(freed)})")
        for column in ("path", "why", "size"):
            table.add_column(column, justify="right" if column == "size" else "left")
        for item in leftovers:
            table.add_row(str(item.path), item.reason, _human_bytes(item.size_bytes))
        out.print(table)
    if not removed and not leftovers:
        out.print(f"{verb} nothing; {_human_bytes(store.total_bytes())} in {store.root}", soft_wrap=True)


def register(app: typer.Typer, *, detect_inventory: InventoryFactory | None = None) -> None:
    """Add ``build`` and the ``artifacts`` group to ``app``. ``detect_inventory`` replaces hardware
    discovery (default: ``Inventory.detect`` with the config's declared resources)."""
    detect = detect_inventory or _detect_inventory

    @app.command("build")
    def build(
        config: Annotated[Path, typer.Argument(help="The YAML config whose deployments to build.")],
        store: StoreOption = None,
    ) -> None:
        """Build (or find in the cache) every artifact the config's deployments need."""
        code = _run_build(config, store, detect)
        if code:
            raise typer.Exit(code)

    artifacts_app = typer.Typer(help="Inspect and trim the artifact store.", no_args_is_help=True)

    @artifacts_app.command("ls")
    def ls(
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
        store: StoreOption = None,
    ) -> None:
        """List artifacts, most recently used first."""
        _ls(store, as_json)

    @artifacts_app.command("gc")
    def gc(
        older_than_days: Annotated[
            float | None, typer.Option("--older-than-days", min=0, help="Remove artifacts unused this long.")
        ] = None,
        max_bytes: Annotated[
            int | None,
            typer.Option("--max-bytes", min=0, help="Then remove the least recently used until this fits."),
        ] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be removed.")] = False,
        store: StoreOption = None,
    ) -> None:
        """Remove unused artifacts and leftovers of crashed builds."""
        _gc(store, older_than_days, max_bytes, dry_run)

    app.add_typer(artifacts_app, name="artifacts")
