"""``xpuflow build`` and ``xpuflow artifacts ls|gc`` on a config whose backends are test plugins."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from xpuflow.artifacts.profile import BuildArtifact, BuildProfile
from xpuflow.backends import registry
from xpuflow.backends.base import Availability, ModelConfig, Session
from xpuflow.cli.artifacts import register
from xpuflow.discovery.inventory import Inventory
from xpuflow.types import Capability, Resource, ResourceType

BUILDS: list[str] = []


class BuildFakePlugin:
    """Runs on CPUs only; its one build step writes the model's bytes upper-cased."""

    name = "buildfake"

    def availability(self) -> Availability:
        return Availability(True, "test plugin")

    def probe(self, resources: Sequence[Resource]) -> list[Resource]:
        return [r for r in resources if r.type is ResourceType.CPU]

    def required_build_profiles(
        self, resources: Sequence[Resource], config: ModelConfig
    ) -> list[BuildProfile]:
        return [BuildProfile(name="engine", target=ResourceType.CPU, compiler="upcc", compiler_version="1")]

    def build(self, profile: BuildProfile, config: ModelConfig, out_dir: Path) -> None:
        BUILDS.append(config.model_id)
        assert config.path is not None
        (out_dir / "engine.bin").write_bytes(config.path.read_bytes().upper())

    def get_capability(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Capability:
        return Capability()

    async def create_session(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Session:
        return Session(config.model_id, resources)


class MissingStackPlugin(BuildFakePlugin):
    name = "missingstack"

    def availability(self) -> Availability:
        return Availability(False, "libvendor.so not found; install the vendor SDK")


@pytest.fixture(autouse=True)
def fake_backends(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(registry.BUILTIN_BACKENDS, "buildfake", f"{__name__}:BuildFakePlugin")
    monkeypatch.setitem(registry.BUILTIN_BACKENDS, "missingstack", f"{__name__}:MissingStackPlugin")
    registry.get_backend.cache_clear()
    BUILDS.clear()
    yield
    registry.get_backend.cache_clear()


def fixed_inventory(declared: Sequence[Mapping[str, Any]]) -> Inventory:
    return Inventory.of([Resource("cpu", ResourceType.CPU), Resource("npu:0", ResourceType.NPU)])


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app, detect_inventory=fixed_inventory)
    return app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200"})


def write_config(tmp_path: Path, deployments: str) -> Path:
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "tiny.bin").write_bytes(b"tiny model")
    config = tmp_path / "xpuflow.yaml"
    config.write_text(f"artifact_dir: store\ndeployments:\n{deployments}")
    return config


ONE = """
  - {name: small, backend: buildfake, model: models/tiny.bin, device: auto}
"""


def test_build_then_hit(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    config = write_config(tmp_path, ONE)
    first = runner.invoke(app, ["build", str(config)])
    assert first.exit_code == 0, first.output
    assert "miss" in first.stdout
    assert "small" in first.stdout
    assert BUILDS == ["small"]
    second = runner.invoke(app, ["build", str(config)])
    assert second.exit_code == 0, second.output
    assert "hit" in second.stdout
    assert "miss" not in second.stdout
    assert BUILDS == ["small"]
    # the config's artifact_dir is relative to the config file, like its model paths
    engines = list((tmp_path / "store" / "objects").glob("*/*/engine.bin"))
    assert [e.read_bytes() for e in engines] == [b"TINY MODEL"]


def test_store_option_wins_over_the_config(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    config = write_config(tmp_path, ONE)
    result = runner.invoke(app, ["build", str(config), "--store", str(tmp_path / "other")])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "other" / "objects").glob("*/*/engine.bin"))
    assert not (tmp_path / "store").exists()


def test_unavailable_backend_is_reported_and_exits_1(
    app: typer.Typer, runner: CliRunner, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        ONE
        + """  - {name: vendor, backend: missingstack, model: models/tiny.bin}
  - {name: pinned, backend: buildfake, model: models/tiny.bin, device: "npu:0"}
  - {name: nowhere, backend: buildfake, model: models/tiny.bin, device: "cuda:7"}
""",
    )
    result = runner.invoke(app, ["build", str(config)])
    assert result.exit_code == 1
    assert BUILDS == ["small"]  # the good deployment still built
    assert "libvendor.so not found; install the vendor SDK" in result.stderr
    assert "vendor:" in result.stderr
    assert "cannot run on 'npu:0'" in result.stderr
    assert "device 'cuda:7' was not found (found: cpu, npu:0)" in result.stderr
    assert "Traceback" not in result.output


def test_a_failing_build_is_reported_and_exits_1(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    config = write_config(tmp_path, ONE)
    (tmp_path / "models" / "tiny.bin").unlink()
    (tmp_path / "models" / "tiny.bin").mkdir()  # an empty folder where the model should be
    result = runner.invoke(app, ["build", str(config)])
    assert result.exit_code == 2  # the model path is bad input
    assert "holds no files" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("deployments: [\n", "not valid YAML"),
        ("deployments:\n  - {name: x, backend: buildfake, replicas: 0}\n", "deployments.0.replicas"),
        ("deployments:\n  - {name: x, backend: nosuchbackend}\n", "unknown backend 'nosuchbackend'"),
    ],
    ids=["missing-file", "bad-yaml", "bad-field", "unknown-backend"],
)
def test_bad_input_exits_2_without_a_traceback(
    app: typer.Typer, runner: CliRunner, tmp_path: Path, content: str | None, message: str
) -> None:
    config = tmp_path / "xpuflow.yaml"
    if content is not None:
        config.write_text(content)
    result = runner.invoke(app, ["build", str(config)])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "error:" in result.stderr
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_empty_config_builds_nothing(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "xpuflow.yaml"
    config.write_text("deployments: []\n")
    result = runner.invoke(app, ["build", str(config)])
    assert result.exit_code == 0
    assert "nothing to build" in result.stdout


def test_artifacts_ls_and_gc(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    store = tmp_path / "store"
    empty = runner.invoke(app, ["artifacts", "ls", "--json", "--store", str(store)])
    assert empty.exit_code == 0, empty.output
    assert json.loads(empty.stdout) == []

    assert runner.invoke(app, ["build", str(write_config(tmp_path, ONE))]).exit_code == 0
    listed = runner.invoke(app, ["artifacts", "ls", "--json", "--store", str(store)])
    assert listed.exit_code == 0, listed.output
    [item] = json.loads(listed.stdout)
    assert item["model_id"] == "small"
    assert item["profile"]["name"] == "engine"
    assert item["profile"]["backend"] == "buildfake"
    assert item["metadata"]["sizes"] == {"engine.bin": 10}
    assert "hit" not in item["metadata"]

    table = runner.invoke(app, ["artifacts", "ls", "--store", str(store)])
    assert table.exit_code == 0
    assert item["id"][:12] in table.stdout
    assert "1 artifact," in table.stdout

    kept = runner.invoke(app, ["artifacts", "gc", "--older-than-days", "1", "--store", str(store)])
    assert kept.exit_code == 0
    assert "removed nothing" in kept.stdout

    dry = runner.invoke(app, ["artifacts", "gc", "--max-bytes", "0", "--dry-run", "--store", str(store)])
    assert dry.exit_code == 0
    assert "would remove 1 artifact " in dry.stdout
    assert (
        len(json.loads(runner.invoke(app, ["artifacts", "ls", "--json", "--store", str(store)]).stdout)) == 1
    )

    gone = runner.invoke(app, ["artifacts", "gc", "--max-bytes", "0", "--store", str(store)])
    assert gone.exit_code == 0
    assert "removed 1 artifact " in gone.stdout
    assert json.loads(runner.invoke(app, ["artifacts", "ls", "--json", "--store", str(store)]).stdout) == []


def test_gc_rejects_negative_limits(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["artifacts", "gc", "--max-bytes", "-1", "--store", str(tmp_path)])
    assert result.exit_code == 2


def _crashed_build(store: Path) -> Path:
    """What a build killed mid-way leaves: its work folder under tmp/, never renamed into objects/."""
    work = store / "tmp" / f"{'ab' * 32}.4242.0badc0de"
    work.mkdir(parents=True)
    (work / "engine.bin").write_bytes(b"x" * 2048)
    return work


def test_gc_reports_and_dry_run_lists_crashed_builds(
    app: typer.Typer, runner: CliRunner, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    work = _crashed_build(store)

    dry = runner.invoke(app, ["artifacts", "gc", "--dry-run", "--store", str(store)])
    assert dry.exit_code == 0, dry.output
    assert "would remove 1 leftover" in dry.stdout
    assert "crashed build" in dry.stdout
    assert "2.0 KiB" in dry.stdout
    assert "nothing" not in dry.stdout
    assert work.exists()

    done = runner.invoke(app, ["artifacts", "gc", "--store", str(store)])
    assert done.exit_code == 0, done.output
    assert "removed 1 leftover" in done.stdout
    assert "crashed build" in done.stdout
    assert "removed nothing" not in done.stdout
    assert not work.exists()

    again = runner.invoke(app, ["artifacts", "gc", "--store", str(store)])
    assert "removed nothing" in again.stdout
