"""build_all: one artifact per profile a plugin declares, built on a miss and reused after."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from xpuflow.artifacts.builder import BuildProgress, NullProgress, RichProgress, build_all, config_digest
from xpuflow.artifacts.digest import digest_text, model_digest
from xpuflow.artifacts.profile import BuildArtifact, BuildProfile
from xpuflow.artifacts.store import ArtifactStore
from xpuflow.backends.base import Availability, ModelConfig, Session
from xpuflow.errors import BuildError, ConfigError
from xpuflow.types import Capability, Resource, ResourceType

CPU = Resource("cpu", ResourceType.CPU)


class CompilingPlugin:
    """Declares two build steps and 'compiles' by reversing the model's bytes."""

    name = "compiling"

    def __init__(self, profiles: Sequence[BuildProfile] | None = None) -> None:
        self.profiles = list(
            profiles
            if profiles is not None
            else [
                BuildProfile(name="engine", target=ResourceType.CPU, compiler="revcc", compiler_version="1"),
                BuildProfile(name="tokenizer", target=ResourceType.CPU, compiler="tok", compiler_version="2"),
            ]
        )
        self.built: list[str] = []

    def availability(self) -> Availability:
        return Availability(True, "always here")

    def probe(self, resources: Sequence[Resource]) -> list[Resource]:
        return list(resources)

    def required_build_profiles(
        self, resources: Sequence[Resource], config: ModelConfig
    ) -> list[BuildProfile]:
        return list(self.profiles)

    def build(self, profile: BuildProfile, config: ModelConfig, out_dir: Path) -> Mapping[str, Any]:
        self.built.append(profile.name)
        data = config.path.read_bytes() if config.path is not None else b"remote"
        (out_dir / f"{profile.name}.bin").write_bytes(data[::-1])
        return {"profile": profile.name}

    def get_capability(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Capability:
        return Capability()

    async def create_session(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Session:
        return Session(config.model_id, resources)


class RecordingProgress:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def start(self, step: str, total: float | None = None) -> None:
        self.events.append(("start", step, str(total)))

    def advance(self, step: str, amount: float = 1.0) -> None:
        self.events.append(("advance", step))

    def finish(self, step: str, message: str = "") -> None:
        self.events.append(("finish", step, message))


@pytest.fixture
def model(tmp_path: Path) -> ModelConfig:
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights" * 100)
    return ModelConfig(model_id="tiny", path=path)


def test_builds_every_profile_once_and_reuses_them(model: ModelConfig, tmp_path: Path) -> None:
    plugin = CompilingPlugin()
    store = ArtifactStore(tmp_path / "store")
    first = build_all(plugin, [CPU], model, store)
    assert set(first) == {"engine", "tokenizer"}
    assert plugin.built == ["engine", "tokenizer"]
    assert first["engine"].file("engine.bin").read_bytes() == (b"weights" * 100)[::-1]
    assert first["engine"].metadata["info"] == {"profile": "engine"}
    assert first["engine"].profile.backend == "compiling"  # filled in so stacks never share artifacts
    assert first["engine"].metadata["model_digest"] == model_digest(model.path or Path())

    second = build_all(plugin, [CPU], model, store)
    assert plugin.built == ["engine", "tokenizer"]
    assert all(a.metadata["hit"] for a in second.values())
    assert {k: a.id for k, a in second.items()} == {k: a.id for k, a in first.items()}


def test_a_changed_model_builds_again(model: ModelConfig, tmp_path: Path) -> None:
    plugin = CompilingPlugin()
    store = ArtifactStore(tmp_path / "store")
    build_all(plugin, [CPU], model, store)
    assert model.path is not None
    model.path.write_bytes(b"new weights")
    rebuilt = build_all(plugin, [CPU], model, store)
    assert plugin.built == ["engine", "tokenizer"] * 2
    assert rebuilt["engine"].file("engine.bin").read_bytes() == b"new weights"[::-1]


def test_remote_models_are_keyed_on_their_identity(tmp_path: Path) -> None:
    a = ModelConfig(model_id="r", options={"base_url": "http://127.0.0.1:9/v1", "model": "llama"})
    b = ModelConfig(model_id="r", options={"base_url": "http://127.0.0.1:9/v1", "model": "qwen"})
    assert config_digest(a) != config_digest(b)
    assert config_digest(a) == digest_text('{"base_url": "http://127.0.0.1:9/v1", "model": "llama"}')
    artifacts = build_all(CompilingPlugin(), [CPU], a, ArtifactStore(tmp_path))
    assert artifacts["engine"].file("engine.bin").read_bytes() == b"etomer"


def test_no_profiles_means_nothing_to_hash(tmp_path: Path) -> None:
    missing = ModelConfig(model_id="m", path=tmp_path / "not-there.gguf")
    assert build_all(CompilingPlugin(profiles=[]), [CPU], missing, ArtifactStore(tmp_path)) == {}
    with pytest.raises(ConfigError, match="does not exist"):
        build_all(CompilingPlugin(), [CPU], missing, ArtifactStore(tmp_path))


def test_plugin_mistakes_are_build_errors(model: ModelConfig, tmp_path: Path) -> None:
    twice = BuildProfile(name="engine", target=ResourceType.CPU, compiler="cc", compiler_version="1")
    with pytest.raises(BuildError, match="same name: engine"):
        build_all(CompilingPlugin([twice, twice]), [CPU], model, ArtifactStore(tmp_path))

    class NoBuild(CompilingPlugin):
        build = None  # type: ignore[assignment]

    with pytest.raises(BuildError, match="no build"):
        build_all(NoBuild(), [CPU], model, ArtifactStore(tmp_path))


def test_progress_reports_each_step(model: ModelConfig, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    progress = RecordingProgress()
    assert isinstance(progress, BuildProgress)
    build_all(CompilingPlugin(), [CPU], model, store, progress=progress)
    kinds = [e[0] for e in progress.events]
    assert kinds[0] == "start"
    assert ("start", "build tiny/engine", "None") in progress.events
    assert progress.events[-1] == ("finish", "tiny (compiling)", "0 cached, 2 built")
    assert kinds.count("advance") == 3  # the digest, then each profile

    progress = RecordingProgress()
    build_all(CompilingPlugin(), [CPU], model, store, progress=progress)
    assert progress.events[-1] == ("finish", "tiny (compiling)", "2 cached, 0 built")


def test_progress_sees_a_failure(model: ModelConfig, tmp_path: Path) -> None:
    class Failing(CompilingPlugin):
        def build(self, profile: BuildProfile, config: ModelConfig, out_dir: Path) -> Mapping[str, Any]:
            raise RuntimeError("segfault in the compiler")

    progress = RecordingProgress()
    with pytest.raises(BuildError, match="segfault"):
        build_all(Failing(), [CPU], model, ArtifactStore(tmp_path), progress=progress)
    assert ("finish", "build tiny/engine", "failed") in progress.events
    assert progress.events[-1] == ("finish", "tiny (compiling)", "failed")


def test_rich_and_null_progress_follow_the_protocol(model: ModelConfig, tmp_path: Path) -> None:
    assert isinstance(NullProgress(), BuildProgress)
    buffer = io.StringIO()
    with RichProgress(Console(file=buffer, width=100)) as progress:
        assert isinstance(progress, BuildProgress)
        build_all(CompilingPlugin(), [CPU], model, ArtifactStore(tmp_path), progress=progress)
        progress.advance("unknown step")  # ignored, never raises
        progress.finish("never started", "done")
    assert "tiny (compiling): 0 cached, 2 built" in buffer.getvalue()
