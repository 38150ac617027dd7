"""Build everything a deployment needs: one artifact per build profile its plugin declares.

    store = ArtifactStore()
    with RichProgress() as progress:
        artifacts = build_all(plugin, [cpu], config, store, progress=progress)
    session = await plugin.create_session([cpu], config, artifacts)

A plugin whose ``required_build_profiles`` is not empty implements::

    def build(self, profile: BuildProfile, config: ModelConfig, out_dir: Path) -> Mapping | None:
        # write the outputs into out_dir (an empty folder); return JSON-able metadata or None

``build`` runs only on a store miss, once per key across processes, and its outputs become an
immutable, checksummed artifact (see ``store.py``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from xpuflow.artifacts.digest import digest_text, model_digest
from xpuflow.artifacts.profile import BuildArtifact, BuildProfile
from xpuflow.errors import BuildError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from xpuflow.artifacts.store import ArtifactStore
    from xpuflow.backends.base import BackendPlugin, ModelConfig
    from xpuflow.types import Resource

__all__ = ["BuildProgress", "NullProgress", "RichProgress", "build_all", "config_digest"]


@runtime_checkable
class BuildProgress(Protocol):
    """Reports long build steps: ``start`` a step (``total`` None when its length is unknown, shown as a
    spinner), ``advance`` it, ``finish`` it with a short message ("built in 3.2 s", "failed").
    Steps are named by strings; advancing or finishing an unknown step must not raise."""

    def start(self, step: str, total: float | None = None) -> None: ...

    def advance(self, step: str, amount: float = 1.0) -> None: ...

    def finish(self, step: str, message: str = "") -> None: ...


class NullProgress:
    """Reports nothing: the default for library callers and tests."""

    def start(self, step: str, total: float | None = None) -> None:
        pass

    def advance(self, step: str, amount: float = 1.0) -> None:
        pass

    def finish(self, step: str, message: str = "") -> None:
        pass


class RichProgress:
    """Progress bars on the terminal (stderr by default, so stdout stays clean for tables and JSON).

    A context manager: the live display runs between ``__enter__`` and ``__exit__``. Steps of unknown
    length show a pulsing bar and the elapsed time.
    """

    def __init__(self, console: Console | None = None, *, transient: bool = False) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress: Progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=transient,
        )
        self._tasks: dict[str, TaskID] = {}
        self._totals: dict[str, float | None] = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, step: str, total: float | None = None) -> None:
        self._totals[step] = total
        if step in self._tasks:
            self._progress.reset(self._tasks[step], total=total, description=step)
        else:
            self._tasks[step] = self._progress.add_task(step, total=total)

    def advance(self, step: str, amount: float = 1.0) -> None:
        if step in self._tasks:
            self._progress.advance(self._tasks[step], amount)

    def finish(self, step: str, message: str = "") -> None:
        if step not in self._tasks:
            self._tasks[step] = self._progress.add_task(step, total=None)
        task_id = self._tasks[step]
        total = self._totals.get(step) or 1.0
        description = f"{step}: {message}" if message else step
        self._progress.update(task_id, total=total, completed=total, description=description)
        self._progress.stop_task(task_id)


def config_digest(config: ModelConfig, *, index_path: Path | None = None) -> str:
    """The content digest of a model: ``model_digest(config.path)`` for local models, else the digest of
    the remote identity (``options["base_url"]`` and ``options["model"]``, defaulting to the model id)."""
    if config.path is not None:
        return model_digest(config.path, index_path=index_path)
    identity = {
        "base_url": str(config.option("base_url", "")),
        "model": str(config.option("model", config.model_id)),
    }
    return digest_text(json.dumps(identity, sort_keys=True))


def build_all(
    plugin: BackendPlugin,
    resources: Sequence[Resource],
    config: ModelConfig,
    store: ArtifactStore,
    *,
    progress: BuildProgress | None = None,
) -> dict[str, BuildArtifact]:
    """Every artifact ``plugin`` needs to run ``config`` on ``resources``, by profile name.

    Builds what the store lacks (each key once, even across processes) and reuses the rest. A profile
    without ``backend`` gets the plugin's name, so two stacks never share an artifact by accident.
    Raises BuildError when a build fails or the plugin declares profiles but has no ``build`` method,
    and ConfigError when the model path does not exist.
    """
    reporter: BuildProgress = progress if progress is not None else NullProgress()
    profiles = [
        p if p.backend else dataclasses.replace(p, backend=plugin.name)
        for p in plugin.required_build_profiles(resources, config)
    ]
    if not profiles:
        return {}
    names = [p.name for p in profiles]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BuildError(
            f"backend '{plugin.name}' declared build profiles with the same name: {', '.join(duplicates)}; "
            "profile names must be unique per model"
        )
    build_fn = getattr(plugin, "build", None)
    if not callable(build_fn):
        raise BuildError(
            f"backend '{plugin.name}' declares build profiles but has no "
            "build(profile, config, out_dir) method; implement it or return no profiles"
        )

    overall = f"{config.model_id} ({plugin.name})"
    reporter.start(overall, len(profiles) + 1)
    try:
        digest = config_digest(config, index_path=store.digest_index_path)
    except BaseException:
        reporter.finish(overall, "failed")
        raise
    reporter.advance(overall)
    artifacts: dict[str, BuildArtifact] = {}
    hits = 0
    try:
        for profile in profiles:
            artifacts[profile.name] = store.get_or_build(
                config.model_id,
                digest,
                profile,
                _bound_build(build_fn, profile, config),
                progress=reporter,
            )
            hits += bool(artifacts[profile.name].metadata.get("hit"))
            reporter.advance(overall)
    except BaseException:
        reporter.finish(overall, "failed")
        raise
    reporter.finish(overall, f"{hits} cached, {len(profiles) - hits} built")
    return artifacts


def _bound_build(build_fn: Any, profile: BuildProfile, config: ModelConfig) -> Any:
    def build(out_dir: Path) -> Mapping[str, Any] | None:
        result: Mapping[str, Any] | None = build_fn(profile, config, out_dir)
        return result

    return build
